// Loss chart: a bounded [step, loss] history, its EMA-smoothed curve, axes with
// nice ticks (linear or log) and drawing on a CanvasRenderingContext2D.
// No DOM access here: drawLossChart only calls methods of the context it is given,
// so tests drive it with a recording fake context.

/** Points kept in memory while a run streams in; the history is halved beyond this. */
export const HISTORY_MAX_POINTS = 1000;

/** EMA weight of the smoothed curve (TensorBoard-style, debiased). */
export const EMA_WEIGHT = 0.9;

/** Plot margins in CSS pixels: room for y labels on the left, x labels below. */
export const CHART_MARGIN = { left: 46, right: 10, top: 8, bottom: 18 };

export const DEFAULT_THEME = {
  background: "#1e1e1e",
  grid: "#3a3a3a",
  text: "#b0b0b0",
  raw: "rgba(120, 160, 255, 0.35)",
  smooth: "#6fa8ff",
  validation: "#ff9a3c",
  font: "10px sans-serif",
};

/**
 * Thin a step-sorted history to at most `target` points, spread evenly over the
 * step range. The first and last points are always kept, and every kept point
 * is a real measurement (no averaging), so the raw curve stays honest.
 * @param {Array<[number, number]>} points sorted by step, strictly increasing
 * @param {number} target at least 2
 * @returns {Array<[number, number]>}
 */
export function downsampleHistory(points, target) {
  if (points.length <= target) return points.slice();
  const first = points[0];
  const last = points[points.length - 1];
  const span = last[0] - first[0];
  const kept = [first];
  let cursor = 1;
  let lastKept = 0;
  for (let slot = 1; slot < target - 1; slot++) {
    const wanted = first[0] + (slot * span) / (target - 1);
    // Points are sorted, so the nearest one to each increasing target only moves right.
    while (
      cursor < points.length - 2 &&
      Math.abs(points[cursor + 1][0] - wanted) <= Math.abs(points[cursor][0] - wanted)
    ) {
      cursor++;
    }
    if (cursor > lastKept && cursor < points.length - 1) {
      kept.push(points[cursor]);
      lastKept = cursor;
    }
  }
  kept.push(last);
  return kept;
}

/**
 * Add one step's loss. A repeated or earlier step replaces the tail so the history
 * stays sorted; beyond `maxPoints` the history is thinned to half, which keeps the
 * cost of appending constant on average.
 * @param {Array<[number, number]>} history
 * @param {number} step
 * @param {number} loss
 * @param {number} [maxPoints]
 * @returns {Array<[number, number]>} a new array (the input is not modified)
 */
export function appendLoss(history, step, loss, maxPoints = HISTORY_MAX_POINTS) {
  if (!Number.isFinite(step) || !Number.isFinite(loss)) return history;
  const last = history[history.length - 1];
  const next = last && step <= last[0] ? history.filter(([s]) => s < step) : history.slice();
  next.push([step, loss]);
  return next.length > maxPoints ? downsampleHistory(next, Math.ceil(maxPoints / 2)) : next;
}

/**
 * Debiased exponential moving average: acc = w·acc + (1−w)·v, out = acc / (1 − wⁿ),
 * so the first points are not pulled towards zero.
 * @param {number[]} values
 * @param {number} [weight] in [0, 1)
 * @returns {number[]}
 */
export function emaSeries(values, weight = EMA_WEIGHT) {
  const out = [];
  let acc = 0;
  let decay = 1;
  for (const value of values) {
    acc = weight * acc + (1 - weight) * value;
    decay *= weight;
    out.push(acc / (1 - decay));
  }
  return out;
}

/**
 * Heckbert's "nice number": 1, 2, 5 or 10 times a power of ten.
 * @param {number} x > 0
 * @param {boolean} round nearest nice number if true, else the next one up
 */
export function niceNumber(x, round) {
  const exponent = Math.floor(Math.log10(x));
  const fraction = x / 10 ** exponent;
  let nice;
  if (round) nice = fraction < 1.5 ? 1 : fraction < 3 ? 2 : fraction < 7 ? 5 : 10;
  else nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
  return nice * 10 ** exponent;
}

/** Removes binary noise such as 0.30000000000000004 from computed tick values. */
function cleanNumber(value) {
  return Number(value.toPrecision(12));
}

/**
 * Tick values inside [lo, hi] at a nice spacing, about `target` of them.
 * @returns {number[]}
 */
export function niceTicks(lo, hi, target = 5) {
  if (!(hi > lo)) return Number.isFinite(lo) ? [lo] : [];
  const spacing = niceNumber(niceNumber(hi - lo, false) / Math.max(1, target - 1), true);
  const eps = 1e-9;
  const ticks = [];
  for (let k = Math.ceil(lo / spacing - eps); k <= Math.floor(hi / spacing + eps); k++) {
    ticks.push(cleanNumber(k * spacing));
  }
  return ticks;
}

/**
 * Ticks for a log axis over [lo, hi] (lo > 0): powers of ten when two or more fit,
 * else 1/2/5 multiples, else linear nice ticks (a narrow range on a log axis).
 * @returns {number[]}
 */
export function logTicks(lo, hi, target = 5) {
  const decades = [];
  for (let k = Math.ceil(Math.log10(lo) - 1e-9); k <= Math.floor(Math.log10(hi) + 1e-9); k++) {
    decades.push(cleanNumber(10 ** k));
  }
  if (decades.length >= 2) {
    const stride = Math.ceil(decades.length / target);
    return decades.filter((_, i) => i % stride === 0);
  }
  const multiples = [];
  for (let k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k++) {
    for (const mantissa of [1, 2, 5]) {
      const value = cleanNumber(mantissa * 10 ** k);
      if (value >= lo && value <= hi) multiples.push(value);
    }
  }
  if (multiples.length >= 2 && multiples.length <= target + 1) return multiples;
  return niceTicks(lo, hi, target);
}

/** A log axis is only possible when every value is positive. */
export function canUseLogScale(values) {
  return values.length > 0 && values.every((v) => v > 0);
}

/**
 * Loss axis range: the data range plus 5% padding on each side (in log10 space for
 * a log axis); a flat series gets a visible band around its value.
 * @param {number[]} values finite
 * @param {boolean} log
 * @returns {[number, number]}
 */
export function lossRange(values, log) {
  if (values.length === 0) return log ? [0.1, 1] : [0, 1];
  const transform = log ? Math.log10 : (v) => v;
  const inverse = log ? (v) => 10 ** v : (v) => v;
  const lo = transform(Math.min(...values));
  const hi = transform(Math.max(...values));
  const span = hi - lo;
  const pad = span > 0 ? span * 0.05 : log ? 0.5 : Math.abs(lo) * 0.1 || 1;
  return [inverse(lo - pad), inverse(hi + pad)];
}

/**
 * Step axis range: from the first recorded step to the run's total when known, so
 * the curve grows across the chart as training progresses.
 * @returns {[number, number]}
 */
export function stepRange(history, total) {
  if (history.length === 0) return [0, total > 0 ? total : 1];
  const first = history[0][0];
  const end = Math.max(history[history.length - 1][0], total > 0 ? total : -Infinity);
  return end > first ? [first, end] : [first, first + 1];
}

/**
 * A function mapping a value in `domain` to a pixel in `range` (linear or log10).
 * @param {[number, number]} domain
 * @param {[number, number]} range
 * @param {boolean} [log]
 */
export function makeScale(domain, range, log = false) {
  const f = log ? Math.log10 : (v) => v;
  const d0 = f(domain[0]);
  const width = f(domain[1]) - d0;
  return (value) => range[0] + ((f(value) - d0) / width) * (range[1] - range[0]);
}

/**
 * Everything drawLossChart needs, in pixels: plot box, axis domains and ticks,
 * the raw and smoothed polylines and the validation series. null when there is nothing to plot.
 * @param {{history: Array<[number, number]>, validation?: Array<[number, number]>, total: number,
 *   logScale: boolean}} state
 * @param {number} width CSS pixels
 * @param {number} height CSS pixels
 */
export function chartGeometry(state, width, height) {
  const history = state.history ?? [];
  const validation = state.validation ?? [];
  const plot = {
    x: CHART_MARGIN.left,
    y: CHART_MARGIN.top,
    width: width - CHART_MARGIN.left - CHART_MARGIN.right,
    height: height - CHART_MARGIN.top - CHART_MARGIN.bottom,
  };
  if (history.length === 0 || plot.width <= 0 || plot.height <= 0) return null;
  const losses = history.map(([, loss]) => loss);
  const validationLosses = validation.map(([, loss]) => loss);
  const smoothed = emaSeries(losses);
  const log = Boolean(state.logScale) && canUseLogScale(losses.concat(validationLosses));
  // The validation baseline at step 0 widens the step axis to the left so it is visible.
  const startsEarlier = validation.length > 0 && validation[0][0] < history[0][0];
  const xDomain = stepRange(startsEarlier ? [validation[0], ...history] : history, state.total ?? 0);
  const yDomain = lossRange(losses.concat(smoothed, validationLosses), log);
  const xScale = makeScale(xDomain, [plot.x, plot.x + plot.width]);
  const yScale = makeScale(yDomain, [plot.y + plot.height, plot.y], log);
  return {
    plot,
    log,
    xDomain,
    yDomain,
    xTicks: niceTicks(xDomain[0], xDomain[1], 5),
    yTicks: log ? logTicks(yDomain[0], yDomain[1], 5) : niceTicks(yDomain[0], yDomain[1], 5),
    xScale,
    yScale,
    raw: history.map(([step, loss]) => [xScale(step), yScale(loss)]),
    smooth: history.map(([step], i) => [xScale(step), yScale(smoothed[i])]),
    validation: validation.map(([step, loss]) => [xScale(step), yScale(loss)]),
  };
}

/** Short tick label: 1.2e-4 for tiny or huge values, else up to 3 significant digits. */
export function formatTick(value) {
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e4)) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

/** Step label: 12k from ten thousand up. */
export function formatStep(step) {
  return step >= 1e4 ? `${Number((step / 1000).toPrecision(3))}k` : String(Math.round(step));
}

function strokePolyline(ctx, points, style, lineWidth) {
  ctx.strokeStyle = style;
  ctx.lineWidth = lineWidth;
  ctx.beginPath();
  points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y)));
  ctx.stroke();
}

/**
 * Draw the loss chart into a 2D context already scaled to CSS pixels.
 * @param {CanvasRenderingContext2D} ctx
 * @param {{history: Array<[number, number]>, validation?: Array<[number, number]>, total: number,
 *   logScale: boolean}} state
 * @param {number} width CSS pixels
 * @param {number} height CSS pixels
 * @param {typeof DEFAULT_THEME} [theme]
 */
export function drawLossChart(ctx, state, width, height, theme = DEFAULT_THEME) {
  ctx.save();
  ctx.fillStyle = theme.background;
  ctx.fillRect(0, 0, width, height);
  ctx.font = theme.font;
  const geometry = chartGeometry(state, width, height);
  if (!geometry) {
    ctx.fillStyle = theme.text;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("loss curve appears once training starts", width / 2, height / 2);
    ctx.restore();
    return;
  }
  const { plot, xScale, yScale } = geometry;

  ctx.strokeStyle = theme.grid;
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (const tick of geometry.yTicks) {
    const y = Math.round(yScale(tick)) + 0.5; // half pixel: crisp 1px lines
    ctx.moveTo(plot.x, y);
    ctx.lineTo(plot.x + plot.width, y);
  }
  ctx.stroke();
  ctx.strokeRect(plot.x, plot.y, plot.width, plot.height);

  ctx.fillStyle = theme.text;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const tick of geometry.yTicks) ctx.fillText(formatTick(tick), plot.x - 4, yScale(tick));
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const tick of geometry.xTicks) {
    ctx.fillText(formatStep(tick), xScale(tick), plot.y + plot.height + 3);
  }
  if (geometry.log) {
    ctx.textAlign = "left";
    ctx.fillText("log", plot.x + 3, plot.y + 2);
  }

  ctx.beginPath();
  ctx.rect(plot.x, plot.y, plot.width, plot.height);
  ctx.clip();
  strokePolyline(ctx, geometry.raw, theme.raw, 1);
  strokePolyline(ctx, geometry.smooth, theme.smooth, 2);
  if (geometry.validation.length > 0) {
    // Validation: evaluated every N steps, so a dot per evaluation shows where the measurements are.
    strokePolyline(ctx, geometry.validation, theme.validation, 2);
    ctx.fillStyle = theme.validation;
    for (const [x, y] of geometry.validation) ctx.fillRect(x - 2.5, y - 2.5, 5, 5);
  }
  // A marker on the newest point, so a single-step history is visible too.
  const [lastX, lastY] = geometry.raw[geometry.raw.length - 1];
  ctx.fillStyle = theme.smooth;
  ctx.fillRect(lastX - 2, lastY - 2, 4, 4);
  ctx.restore();
}
