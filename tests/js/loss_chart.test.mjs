import test from "node:test";
import assert from "node:assert/strict";

import {
  CHART_MARGIN,
  DEFAULT_THEME,
  appendLoss,
  chartGeometry,
  downsampleHistory,
  drawLossChart,
  emaSeries,
  formatStep,
  formatTick,
  logTicks,
  lossRange,
  makeScale,
  niceTicks,
  stepRange,
} from "../../web/lib/loss_chart.js";
import { RecordingContext2D } from "./fakes.mjs";

const steps = (points) => points.map(([step]) => step);

function assertClose(actual, expected, tolerance = 1e-9) {
  assert.ok(Math.abs(actual - expected) <= tolerance, `${actual} != ${expected}`);
}

function assertPointsClose(actual, expected) {
  assert.equal(actual.length, expected.length);
  actual.forEach((point, i) => point.forEach((v, j) => assertClose(v, expected[i][j], 1e-6)));
}

test("downsampleHistory keeps first and last and spreads points evenly over steps", () => {
  const points = Array.from({ length: 11 }, (_, i) => [i, i * 10]);
  assert.deepEqual(steps(downsampleHistory(points, 6)), [0, 2, 4, 6, 8, 10]);
  // Dense early steps and sparse late ones: picks follow step, not index.
  const uneven = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 40, 60, 80, 100].map((s) => [s, 1]);
  assert.deepEqual(steps(downsampleHistory(uneven, 6)), [0, 20, 40, 60, 80, 100]);
  // Kept points are real measurements, not averages.
  for (const point of downsampleHistory(points, 4)) assert.equal(point[1], point[0] * 10);
  assert.deepEqual(downsampleHistory(points.slice(0, 3), 6), points.slice(0, 3));
});

test("appendLoss stays bounded, sorted and keeps the first and newest step", () => {
  let history = [];
  for (let step = 0; step <= 2500; step++) {
    history = appendLoss(history, step, 1 / (step + 1), 100);
    assert.ok(history.length <= 100, `length ${history.length} at step ${step}`);
  }
  assert.equal(history[0][0], 0);
  assert.equal(history[history.length - 1][0], 2500);
  for (let i = 1; i < history.length; i++) assert.ok(history[i][0] > history[i - 1][0]);
});

test("appendLoss ignores non-finite values and replaces a repeated step", () => {
  const history = [[1, 0.5], [2, 0.4]];
  assert.equal(appendLoss(history, 3, NaN), history);
  assert.equal(appendLoss(history, 3, Infinity), history);
  assert.deepEqual(appendLoss(history, 2, 0.3), [[1, 0.5], [2, 0.3]]);
  assert.deepEqual(history, [[1, 0.5], [2, 0.4]], "input not modified");
});

test("emaSeries is the debiased EMA", () => {
  // w=0.5: acc 0.5, 0.25, 0.125 divided by 1-0.5, 1-0.25, 1-0.125
  const smoothed = emaSeries([1, 0, 0], 0.5);
  [1, 1 / 3, 1 / 7].forEach((expected, i) => assertClose(smoothed[i], expected));
  emaSeries([2, 2, 2, 2], 0.9).forEach((v) => assertClose(v, 2));
  assert.deepEqual(emaSeries([], 0.9), []);
});

test("niceTicks use 1-2-5 spacings inside the range", () => {
  assert.deepEqual(niceTicks(0.0123, 0.0871, 5), [0.02, 0.04, 0.06, 0.08]);
  assert.deepEqual(niceTicks(0, 1, 5), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  assert.deepEqual(niceTicks(0, 1000, 5), [0, 200, 400, 600, 800, 1000]);
  assert.deepEqual(niceTicks(3, 3, 5), [3]);
});

test("logTicks use decades, then 1-2-5 multiples, then linear ticks", () => {
  assert.deepEqual(logTicks(0.003, 2), [0.01, 0.1, 1]);
  assert.deepEqual(logTicks(0.15, 0.9), [0.2, 0.5]);
  assert.deepEqual(logTicks(0.31, 0.45), [0.35, 0.4, 0.45]);
});

test("lossRange pads 5% per side, in log10 space for a log axis", () => {
  assert.deepEqual(lossRange([1, 3], false), [0.9, 3.1]);
  const [lo, hi] = lossRange([0.01, 1], true);
  assertClose(lo, 10 ** -2.1);
  assertClose(hi, 10 ** 0.1);
  const [flatLo, flatHi] = lossRange([2, 2], false);
  assertClose(flatLo, 1.8);
  assertClose(flatHi, 2.2);
});

test("stepRange runs to the total when it is known", () => {
  assert.deepEqual(stepRange([[10, 1], [20, 1]], 100), [10, 100]);
  assert.deepEqual(stepRange([[10, 1], [20, 1]], 0), [10, 20]);
  assert.deepEqual(stepRange([[5, 1]], 0), [5, 6]);
});

test("makeScale maps linearly or in log10, with inverted pixel ranges", () => {
  assert.equal(makeScale([0, 10], [0, 100])(5), 50);
  assert.equal(makeScale([0, 10], [100, 0])(2), 80);
  assertClose(makeScale([0.01, 1], [0, 200], true)(0.1), 100);
});

// Plot box 100x100 at (46, 8): width = 46 + 100 + 10, height = 8 + 100 + 18.
const WIDTH = CHART_MARGIN.left + 100 + CHART_MARGIN.right;
const HEIGHT = CHART_MARGIN.top + 100 + CHART_MARGIN.bottom;
const TWO_POINTS = { history: [[0, 1], [10, 3]], total: 0, logScale: false };
// EMA(0.9) of [1, 3]: 1, then (0.09 + 0.3) / 0.19. Loss domain of [1, 3, 1, ema] is [0.9, 3.1].
const EMA_SECOND = 0.39 / 0.19;
const yPixel = (loss) => 108 - ((loss - 0.9) / 2.2) * 100;
const EXPECTED_RAW = [[46, yPixel(1)], [146, yPixel(3)]];
const EXPECTED_SMOOTH = [[46, yPixel(1)], [146, yPixel(EMA_SECOND)]];

test("chartGeometry maps points into the plot box", () => {
  const geometry = chartGeometry(TWO_POINTS, WIDTH, HEIGHT);
  assert.deepEqual(geometry.plot, { x: 46, y: 8, width: 100, height: 100 });
  assert.deepEqual(geometry.xDomain, [0, 10]);
  assertClose(geometry.yDomain[0], 0.9);
  assertClose(geometry.yDomain[1], 3.1);
  assertPointsClose(geometry.raw, EXPECTED_RAW);
  assertPointsClose(geometry.smooth, EXPECTED_SMOOTH);
  assert.equal(chartGeometry({ history: [], total: 5 }, WIDTH, HEIGHT), null);
  assert.equal(chartGeometry(TWO_POINTS, 20, 20), null, "too small to plot");
});

test("log scale only when every loss is positive", () => {
  assert.equal(chartGeometry({ ...TWO_POINTS, logScale: true }, WIDTH, HEIGHT).log, true);
  const withZero = { history: [[0, 0], [10, 3]], total: 0, logScale: true };
  assert.equal(chartGeometry(withZero, WIDTH, HEIGHT).log, false);
});

test("drawLossChart strokes the raw and smoothed polylines through the mapped points", () => {
  const ctx = new RecordingContext2D();
  drawLossChart(ctx, TWO_POINTS, WIDTH, HEIGHT, DEFAULT_THEME);
  const pathPoints = (stroke) => stroke.path.map(([, x, y]) => [x, y]);
  const raw = ctx.strokes.find((s) => s.style === DEFAULT_THEME.raw);
  const smooth = ctx.strokes.find((s) => s.style === DEFAULT_THEME.smooth);
  assert.ok(raw && smooth, "both curves drawn");
  assert.deepEqual(raw.path.map(([op]) => op), ["M", "L"]);
  assertPointsClose(pathPoints(raw), EXPECTED_RAW);
  assertPointsClose(pathPoints(smooth), EXPECTED_SMOOTH);
  assert.ok(smooth.lineWidth > raw.lineWidth, "smoothed curve is the prominent one");
  // Every y tick gets a label.
  const labels = ctx.texts.map((t) => t.text);
  for (const tick of chartGeometry(TWO_POINTS, WIDTH, HEIGHT).yTicks) {
    assert.ok(labels.includes(formatTick(tick)), `label for ${tick}`);
  }
  assert.ok(labels.includes("0") && labels.includes("10"), "step labels");
  assert.equal(ctx.ops.filter((op) => op === "save").length, ctx.ops.filter((op) => op === "restore").length);
});

test("drawLossChart with no history draws a hint and no curve", () => {
  const ctx = new RecordingContext2D();
  drawLossChart(ctx, { history: [], total: 10, logScale: false }, WIDTH, HEIGHT);
  assert.equal(ctx.strokes.length, 0);
  assert.equal(ctx.texts.length, 1);
  assert.match(ctx.texts[0].text, /training starts/);
  assert.deepEqual(ctx.fillRects[0], { style: DEFAULT_THEME.background, x: 0, y: 0, w: WIDTH, h: HEIGHT });
});

test("tick labels are short", () => {
  assert.equal(formatTick(0.0001), "1.0e-4");
  assert.equal(formatTick(0.25), "0.25");
  assert.equal(formatTick(0.123456), "0.123");
  assert.equal(formatTick(12345), "1.2e+4");
  assert.equal(formatTick(0), "0");
  assert.equal(formatStep(12000), "12k");
  assert.equal(formatStep(950), "950");
});

test("the validation series is drawn through its own points and widens both axes", () => {
  // Baseline at step 0 below the training curve's range, one point above it at step 10.
  const state = { history: [[2, 1], [10, 3]], validation: [[0, 0.5], [10, 3.5]], total: 0, logScale: false };
  const geometry = chartGeometry(state, WIDTH, HEIGHT);
  assert.deepEqual(geometry.xDomain, [0, 10], "step 0 of the baseline is on the axis");
  // Loss domain [0.5, 3.5] padded by 5%: [0.35, 3.65].
  assertClose(geometry.yDomain[0], 0.35);
  assertClose(geometry.yDomain[1], 3.65);
  const y = (loss) => 108 - ((loss - 0.35) / 3.3) * 100;
  assertPointsClose(geometry.validation, [[46, y(0.5)], [146, y(3.5)]]);
  const ctx = new RecordingContext2D();
  drawLossChart(ctx, state, WIDTH, HEIGHT, DEFAULT_THEME);
  const stroke = ctx.strokes.find((s) => s.style === DEFAULT_THEME.validation);
  assert.ok(stroke, "validation curve drawn");
  assertPointsClose(stroke.path.map(([, px, py]) => [px, py]), geometry.validation);
  const dots = ctx.fillRects.filter((r) => r.style === DEFAULT_THEME.validation);
  assert.equal(dots.length, 2, "a dot per evaluation");
  // Without validation points nothing is drawn in its colour.
  const plain = new RecordingContext2D();
  drawLossChart(plain, TWO_POINTS, WIDTH, HEIGHT, DEFAULT_THEME);
  assert.equal(plain.strokes.filter((s) => s.style === DEFAULT_THEME.validation).length, 0);
});
