// Per-node view state of TrainLoRA: a reducer over the websocket messages and the
// executed output, a compact JSON form saved in node.properties (so the chart and
// gallery come back when the workflow is reloaded), and the status-line text.
// Reducer functions never modify their input state; they return a new one, or the
// same object when a message changes nothing.

import { OUTPUT_LOSSES_KEY, OUTPUT_SAMPLES_KEY, OUTPUT_SAVED_KEY, OUTPUT_VALIDATION_KEY } from "./constants.js";
import { MAX_NAME_CHARS, isSafeImageRef } from "./gallery.js";
import { HISTORY_MAX_POINTS, appendLoss, downsampleHistory } from "./loss_chart.js";

const STOP_REASONS = ["interrupted", "error"];

/** Bumped when the saved shape changes; other versions restore as an empty view. */
export const SAVED_FORMAT_VERSION = 1;

export const LIMITS = Object.freeze({
  /** History points kept in memory while a run streams in. */
  historyPoints: HISTORY_MAX_POINTS,
  /** History points saved in the workflow file (keeps the file small). */
  savedHistoryPoints: 400,
  /** Sample images kept (one sample set: the latest). */
  images: 16,
  /** Characters kept per caption. */
  captionChars: 500,
});

/** @returns the state of a node that has not trained yet */
export function createViewState() {
  return {
    run: 0, // incremented whenever a new run starts streaming; part of image cache keys
    step: 0,
    total: 0,
    loss: null,
    lr: null,
    etaS: null,
    elapsedS: null,
    finished: false,
    stopped: null, // "interrupted" | "error" when the run ended without output
    logScale: false,
    history: [], // [[step, loss], ...] sorted by step
    validation: [], // [[step, validation loss], ...] sorted by step (step 0: before training)
    samples: null, // {step, items: [{image: {filename, subfolder, type} | null, caption}]}
    saved: null, // file name of the finished run's adapter in models/loras
  };
}

function finiteOrNull(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function countOrZero(value) {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? Math.floor(value) : 0;
}

/**
 * Keep only well-formed [step, loss] pairs with strictly increasing finite steps.
 * @returns {Array<[number, number]>}
 */
export function sanitizeHistory(raw, maxPoints) {
  if (!Array.isArray(raw)) return [];
  const clean = [];
  for (const pair of raw) {
    if (!Array.isArray(pair) || pair.length < 2) continue;
    const [step, loss] = pair;
    if (!Number.isFinite(step) || !Number.isFinite(loss)) continue;
    if (clean.length > 0 && step <= clean[clean.length - 1][0]) continue;
    clean.push([step, loss]);
  }
  return downsampleHistory(clean, maxPoints);
}

function sanitizeImage(raw) {
  if (!raw || typeof raw !== "object") return null;
  const image = { filename: raw.filename, subfolder: raw.subfolder ?? "", type: raw.type };
  return isSafeImageRef(image) ? image : null;
}

function sanitizeCaption(raw) {
  return typeof raw === "string" ? raw.slice(0, LIMITS.captionChars) : "";
}

/** A plain file name (shown as text), or null. */
export function sanitizeFileName(raw) {
  if (typeof raw !== "string" || raw.length === 0 || raw.length > MAX_NAME_CHARS) return null;
  return /[\u0000-\u001f\u007f/\\]/.test(raw) ? null : raw;
}

/**
 * Normalize one sample set, from a message ({step, images, captions}) or from a
 * saved state ({step, items}). Images that fail validation become null but keep
 * their caption, so captions stay aligned with their images.
 * @returns {{step: number, items: Array<{image: object | null, caption: string}>} | null}
 */
export function sanitizeSamples(raw) {
  if (!raw || typeof raw !== "object" || !Number.isFinite(raw.step)) return null;
  let items;
  if (Array.isArray(raw.items)) {
    items = raw.items
      .slice(0, LIMITS.images)
      .map((item) => ({ image: sanitizeImage(item?.image), caption: sanitizeCaption(item?.caption) }));
  } else if (Array.isArray(raw.images)) {
    const captions = Array.isArray(raw.captions) ? raw.captions : [];
    items = raw.images
      .slice(0, LIMITS.images)
      .map((image, i) => ({ image: sanitizeImage(image), caption: sanitizeCaption(captions[i]) }));
  } else {
    return null;
  }
  return items.length > 0 ? { step: countOrZero(raw.step), items } : null;
}

/** True once the shown run has ended, so the next message belongs to a new run. */
function runEnded(state) {
  return state.finished || state.stopped !== null;
}

/** Empty view for a new run; the user's axis choice is kept. */
function startNewRun(state) {
  return { ...createViewState(), run: state.run + 1, logScale: state.logScale };
}

/**
 * Apply a "dit_trainer.progress" message. A step lower than the last one, or any
 * progress after the run ended, means a new run: its chart starts empty.
 */
export function applyProgress(state, message) {
  const step = message?.step;
  if (typeof step !== "number" || !Number.isFinite(step) || step < 0) return state;
  const base = runEnded(state) || step < state.step ? startNewRun(state) : state;
  const loss = finiteOrNull(message.loss);
  return {
    ...base,
    step,
    total: countOrZero(message.total) || base.total,
    loss,
    lr: finiteOrNull(message.lr),
    etaS: finiteOrNull(message.eta_s),
    elapsedS: finiteOrNull(message.elapsed_s),
    // A skipped NaN/inf step still advances the step counter but adds no point.
    history: loss === null ? base.history : appendLoss(base.history, step, loss, LIMITS.historyPoints),
    validation: appendValidation(base.validation, message.validation),
  };
}

/** Add the [step, loss] pairs of a progress message (malformed ones are ignored). */
function appendValidation(validation, points) {
  if (!Array.isArray(points)) return validation;
  return points.reduce(
    (next, point) =>
      Array.isArray(point) ? appendLoss(next, point[0], point[1], LIMITS.historyPoints) : next,
    validation,
  );
}

/**
 * Apply a "dit_trainer.samples" message: the newest sample set replaces the shown one.
 * Samples can come before the first progress message of a run (a baseline at step 0),
 * so they start a new run by the same rule as progress does.
 */
export function applySamples(state, message) {
  const samples = sanitizeSamples(message);
  if (!samples) return state;
  const base = runEnded(state) || samples.step < state.step ? startNewRun(state) : state;
  return { ...base, samples };
}

/**
 * Apply the node's UI output from the core "executed" event (node.onExecuted):
 * the full loss history and the latest sample set of the finished run.
 */
export function applyExecuted(state, output) {
  if (!output || typeof output !== "object") return state;
  const hasLosses = Array.isArray(output[OUTPUT_LOSSES_KEY]);
  const sampleSets = Array.isArray(output[OUTPUT_SAMPLES_KEY])
    ? output[OUTPUT_SAMPLES_KEY].map(sanitizeSamples).filter(Boolean)
    : [];
  if (!hasLosses && sampleSets.length === 0) return state;
  const history = hasLosses
    ? sanitizeHistory(output[OUTPUT_LOSSES_KEY], LIMITS.historyPoints)
    : state.history;
  const lastPoint = history[history.length - 1];
  const latestSamples = sampleSets.reduce(
    (latest, set) => (latest === null || set.step >= latest.step ? set : latest),
    null,
  );
  const saved = Array.isArray(output[OUTPUT_SAVED_KEY]) ? sanitizeFileName(output[OUTPUT_SAVED_KEY][0]) : null;
  return {
    ...state,
    history,
    validation: Array.isArray(output[OUTPUT_VALIDATION_KEY])
      ? sanitizeHistory(output[OUTPUT_VALIDATION_KEY], LIMITS.historyPoints)
      : state.validation,
    step: lastPoint ? Math.max(state.step, lastPoint[0]) : state.step,
    loss: lastPoint ? lastPoint[1] : state.loss,
    etaS: null,
    finished: true,
    stopped: null,
    samples: latestSamples ?? state.samples,
    saved: saved ?? state.saved,
  };
}

/**
 * The run ended without output: the core "execution_interrupted" or
 * "execution_error" event named this node.
 * @param {"interrupted" | "error"} reason
 */
export function applyStopped(state, reason) {
  if (runEnded(state)) return state;
  return { ...state, stopped: reason, etaS: null };
}

/**
 * One entry point for the extension.
 * @param {"progress" | "samples" | "executed" | "stopped"} kind
 * @param data the message detail, the executed output, or the stop reason
 */
export function reduceMessage(state, kind, data) {
  if (kind === "progress") return applyProgress(state, data);
  if (kind === "samples") return applySamples(state, data);
  if (kind === "executed") return applyExecuted(state, data);
  if (kind === "stopped") return applyStopped(state, data);
  throw new Error(
    `unknown TrainLoRA view message kind "${kind}" (expected progress, samples, executed or stopped)`,
  );
}

/** Toggle between linear and log loss axis (the chart falls back to linear if a loss is <= 0). */
export function toggleLogScale(state) {
  return { ...state, logScale: !state.logScale };
}

/** Six significant digits: plenty for a chart, and keeps the saved JSON short. */
function roundForSaving(value) {
  return value === null ? null : Number(value.toPrecision(6));
}

/**
 * The JSON-able form saved in node.properties, bounded in size by LIMITS
 * (a few tens of kB at most, even with hostile captions).
 */
export function serializeViewState(state) {
  return {
    v: SAVED_FORMAT_VERSION,
    run: state.run,
    step: state.step,
    total: state.total,
    loss: roundForSaving(state.loss),
    lr: roundForSaving(state.lr),
    etaS: roundForSaving(state.etaS),
    elapsedS: roundForSaving(state.elapsedS),
    finished: state.finished,
    stopped: state.stopped,
    logScale: state.logScale,
    history: downsampleHistory(state.history, LIMITS.savedHistoryPoints).map(([step, loss]) => [
      roundForSaving(step),
      roundForSaving(loss),
    ]),
    validation: downsampleHistory(state.validation, LIMITS.savedHistoryPoints).map(([step, loss]) => [
      roundForSaving(step),
      roundForSaving(loss),
    ]),
    samples: state.samples && {
      step: state.samples.step,
      items: state.samples.items.map(({ image, caption }) => ({ image, caption })),
    },
    saved: state.saved,
  };
}

/**
 * Rebuild a view state from what serializeViewState saved. The saved object comes
 * from a workflow file that may have been edited or shared, so every field is
 * validated again; anything unusable falls back to the empty state's value.
 */
export function restoreViewState(saved) {
  const empty = createViewState();
  if (!saved || typeof saved !== "object" || saved.v !== SAVED_FORMAT_VERSION) return empty;
  return {
    run: countOrZero(saved.run),
    step: countOrZero(saved.step),
    total: countOrZero(saved.total),
    loss: finiteOrNull(saved.loss),
    lr: finiteOrNull(saved.lr),
    etaS: finiteOrNull(saved.etaS),
    elapsedS: finiteOrNull(saved.elapsedS),
    finished: saved.finished === true,
    stopped: STOP_REASONS.includes(saved.stopped) ? saved.stopped : null,
    logScale: saved.logScale === true,
    history: sanitizeHistory(saved.history, LIMITS.savedHistoryPoints),
    validation: sanitizeHistory(saved.validation, LIMITS.savedHistoryPoints),
    samples: sanitizeSamples(saved.samples),
    saved: sanitizeFileName(saved.saved),
  };
}

/**
 * "42s", "3m 05s", "1h 02m", "2d 03h"; "?" when unknown.
 * @param {number | null} seconds
 */
export function formatDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "?";
  const total = Math.round(seconds);
  const pad = (n) => String(n).padStart(2, "0");
  if (total < 60) return `${total}s`;
  if (total < 3600) return `${Math.floor(total / 60)}m ${pad(total % 60)}s`;
  if (total < 86400) return `${Math.floor(total / 3600)}h ${pad(Math.floor((total % 3600) / 60))}m`;
  return `${Math.floor(total / 86400)}d ${pad(Math.floor((total % 86400) / 3600))}h`;
}

function formatLoss(loss) {
  return Number(loss.toPrecision(4)).toString();
}

/** The status line under the chart. */
export function formatStatus(state) {
  if (state.finished) {
    const parts = [`finished ${state.step} steps`];
    if (state.elapsedS !== null) parts.push(`in ${formatDuration(state.elapsedS)}`);
    if (state.loss !== null) parts.push(`· final loss ${formatLoss(state.loss)}`);
    const lastValidation = state.validation[state.validation.length - 1];
    if (lastValidation) parts.push(`· validation ${formatLoss(lastValidation[1])}`);
    if (state.saved !== null) parts.push(`· saved ${state.saved}`);
    return parts.join(" ");
  }
  if (state.step === 0 && state.history.length === 0 && state.stopped === null) {
    return "waiting for training to start";
  }
  const position = state.total > 0 ? `step ${state.step}/${state.total}` : `step ${state.step}`;
  const parts = [state.stopped === null ? position : `${state.stopped} at ${position}`];
  if (state.loss !== null) parts.push(`loss ${formatLoss(state.loss)}`);
  const lastValidation = state.validation[state.validation.length - 1];
  if (lastValidation) parts.push(`val ${formatLoss(lastValidation[1])}`);
  if (state.lr !== null) parts.push(`lr ${state.lr.toExponential(2)}`);
  if (state.etaS !== null) parts.push(`ETA ${formatDuration(state.etaS)}`);
  if (state.elapsedS !== null) parts.push(`${formatDuration(state.elapsedS)} elapsed`);
  return parts.join(" · ");
}
