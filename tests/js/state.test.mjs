import test from "node:test";
import assert from "node:assert/strict";

import {
  LIMITS,
  SAVED_FORMAT_VERSION,
  applyExecuted,
  applyProgress,
  applySamples,
  applyStopped,
  createViewState,
  formatDuration,
  formatStatus,
  reduceMessage,
  restoreViewState,
  serializeViewState,
  sanitizeFileName,
  toggleLogScale,
} from "../../web/lib/state.js";

const progress = (step, extra = {}) => ({
  node: "7",
  step,
  total: 10,
  loss: 1 / (step + 1),
  lr: 0.0001,
  eta_s: 65,
  elapsed_s: 12,
  ...extra,
});
const temp = (filename) => ({ filename, subfolder: "", type: "temp" });
const samplesMessage = (step, names, captions) => ({
  node: "7",
  step,
  images: names.map(temp),
  captions,
});

function run(messages, state = createViewState()) {
  return messages.reduce((current, [kind, data]) => reduceMessage(current, kind, data), state);
}

test("progress updates the numbers and appends one history point per step", () => {
  const state = run([["progress", progress(1)], ["progress", progress(2)]]);
  assert.equal(state.step, 2);
  assert.equal(state.total, 10);
  assert.equal(state.loss, 1 / 3);
  assert.equal(state.lr, 0.0001);
  assert.equal(state.etaS, 65);
  assert.equal(state.elapsedS, 12);
  assert.deepEqual(state.history, [[1, 0.5], [2, 1 / 3]]);
});

test("malformed progress changes nothing", () => {
  const state = run([["progress", progress(3)]]);
  for (const bad of [null, {}, { step: "4" }, { step: -1 }, { step: NaN }]) {
    assert.equal(applyProgress(state, bad), state, JSON.stringify(bad));
  }
});

test("a skipped non-finite step advances the counter without a point", () => {
  const state = run([["progress", progress(1)], ["progress", progress(2, { loss: null })]]);
  assert.equal(state.step, 2);
  assert.equal(state.loss, null);
  assert.deepEqual(state.history, [[1, 0.5]]);
});

test("a lower step starts a new run with an empty chart", () => {
  const first = run([["progress", progress(5)], ["progress", progress(6)]]);
  const second = applyProgress(toggleLogScale(first), progress(1));
  assert.equal(second.run, first.run + 1);
  assert.deepEqual(second.history, [[1, 0.5]]);
  assert.equal(second.logScale, true, "axis choice survives a new run");
});

test("samples keep captions aligned with images, unsafe images become null", () => {
  const state = applySamples(
    createViewState(),
    samplesMessage(4, ["a.png", "../evil.png", "c.png"], ["cap a", "cap evil"]),
  );
  assert.deepEqual(state.samples, {
    step: 4,
    items: [
      { image: temp("a.png"), caption: "cap a" },
      { image: null, caption: "cap evil" },
      { image: temp("c.png"), caption: "" },
    ],
  });
  assert.equal(applySamples(state, { step: 5, images: [] }), state, "empty set ignored");
  assert.equal(applySamples(state, { images: [temp("x.png")] }), state, "no step: ignored");
});

test("baseline samples of a new run survive its first progress message", () => {
  const finished = applyExecuted(run([["progress", progress(9)]]), {
    dit_trainer_losses: [[9, 0.1]],
  });
  const state = run(
    [["samples", samplesMessage(0, ["base.png"], ["before"])], ["progress", progress(1)]],
    finished,
  );
  assert.equal(state.run, finished.run + 1);
  assert.equal(state.finished, false);
  assert.equal(state.samples.step, 0);
  assert.deepEqual(state.history, [[1, 0.5]]);
});

test("samples after a finished run start a new run even at a later step", () => {
  const finished = applyExecuted(run([["progress", progress(9)]]), {
    dit_trainer_losses: [[9, 0.1]],
  });
  // A run resumed from a later checkpoint sends its first samples at step 20.
  const state = applySamples(finished, samplesMessage(20, ["r.png"], ["resumed"]));
  assert.equal(state.run, finished.run + 1);
  assert.equal(state.finished, false);
  assert.deepEqual(state.history, []);
  assert.equal(state.samples.step, 20);
});

test("executed output replaces the history and shows the latest sample set", () => {
  const live = run([["progress", progress(1)], ["samples", samplesMessage(1, ["s1.png"], ["one"])]]);
  const state = applyExecuted(live, {
    images: [temp("loss.png")],
    dit_trainer_losses: [[1, 0.9], [5, 0.5], [10, 0.25]],
    dit_trainer_samples: [
      { step: 10, images: [temp("s10.png")], captions: ["ten"] },
      { step: 5, images: [temp("s5.png")], captions: ["five"] },
    ],
  });
  assert.deepEqual(state.history, [[1, 0.9], [5, 0.5], [10, 0.25]]);
  assert.equal(state.finished, true);
  assert.equal(state.step, 10);
  assert.equal(state.loss, 0.25);
  assert.equal(state.etaS, null);
  assert.deepEqual(state.samples, { step: 10, items: [{ image: temp("s10.png"), caption: "ten" }] });
  assert.equal(applyExecuted(live, { images: [temp("x.png")] }), live, "output of another kind");
});

test("interrupt or error marks a running view as stopped, never a finished one", () => {
  const running = run([["progress", progress(5)]]);
  const stopped = applyStopped(running, "interrupted");
  assert.equal(stopped.stopped, "interrupted");
  assert.equal(stopped.etaS, null);
  assert.match(formatStatus(stopped), /^interrupted at step 5\/10/);
  const finished = applyExecuted(running, { dit_trainer_losses: [[5, 0.1]] });
  assert.equal(applyStopped(finished, "error"), finished);
  assert.equal(applyProgress(stopped, progress(6)).run, stopped.run + 1, "next run starts fresh");
});

test("progress -> samples -> executed -> save -> reload gives the same view", () => {
  const state = toggleLogScale(
    run([
      ["progress", progress(1)],
      ["samples", samplesMessage(1, ["s1.png", "s2.png"], ["a <b>", "c"])],
      ["progress", progress(2, { loss: 0.125 })],
      [
        "executed",
        {
          dit_trainer_losses: [[1, 0.5], [2, 0.125]],
          dit_trainer_samples: [{ step: 2, images: [temp("f.png")], captions: ["final"] }],
          dit_trainer_saved: ["run_2.safetensors"],
        },
      ],
    ]),
  );
  assert.equal(state.saved, "run_2.safetensors");
  const saved = JSON.parse(JSON.stringify(serializeViewState(state)));
  assert.equal(saved.v, SAVED_FORMAT_VERSION);
  const restored = restoreViewState(saved);
  assert.deepEqual(restored, state);
  assert.equal(formatStatus(restored), formatStatus(state));
  assert.deepEqual(serializeViewState(restored), saved);
});

test("saved state is bounded even for huge histories and hostile sample sets", () => {
  let state = createViewState();
  for (let step = 1; step <= 5000; step++) state = applyProgress(state, progress(step, { total: 5000 }));
  const huge = "<img onerror=x>".repeat(1000);
  state = applySamples(state, {
    step: 5000,
    images: Array.from({ length: 100 }, (_, i) => temp(`${"n".repeat(250)}${i}.png`.slice(0, 255))),
    captions: Array.from({ length: 100 }, () => huge),
  });
  assert.ok(state.history.length <= LIMITS.historyPoints);
  const saved = serializeViewState(state);
  assert.ok(saved.history.length <= LIMITS.savedHistoryPoints);
  assert.equal(saved.history[0][0], 1);
  assert.equal(saved.history[saved.history.length - 1][0], 5000);
  assert.equal(saved.samples.items.length, LIMITS.images);
  for (const item of saved.samples.items) assert.ok(item.caption.length <= LIMITS.captionChars);
  const bytes = JSON.stringify(saved).length;
  assert.ok(bytes < 40_000, `saved view is ${bytes} characters`);
});

test("restoring garbage or a future format gives an empty view", () => {
  const empty = createViewState();
  for (const saved of [undefined, null, "x", [], { v: SAVED_FORMAT_VERSION + 1, step: 3 }]) {
    assert.deepEqual(restoreViewState(saved), empty, JSON.stringify(saved));
  }
  const restored = restoreViewState({
    v: SAVED_FORMAT_VERSION,
    step: "12",
    loss: "0.1",
    finished: "yes",
    stopped: "exploded",
    history: [[1, 0.5], ["2", 0.4], [3, null], [3, 0.3], [2, 0.2], [4]],
    samples: { step: 3, items: [{ image: { filename: "../../x.png", type: "temp" }, caption: 7 }] },
  });
  assert.equal(restored.step, 0);
  assert.equal(restored.loss, null);
  assert.equal(restored.finished, false);
  assert.equal(restored.stopped, null);
  assert.deepEqual(restored.history, [[1, 0.5], [3, 0.3]]);
  assert.deepEqual(restored.samples, { step: 3, items: [{ image: null, caption: "" }] });
});

test("durations read like a clock", () => {
  const cases = [
    [0, "0s"],
    [42.4, "42s"],
    [185, "3m 05s"],
    [3720, "1h 02m"],
    [183600, "2d 03h"],
    [null, "?"],
    [-1, "?"],
    [Infinity, "?"],
  ];
  for (const [seconds, text] of cases) assert.equal(formatDuration(seconds), text, String(seconds));
});

test("status line for waiting, running and finished", () => {
  assert.equal(formatStatus(createViewState()), "waiting for training to start");
  const running = run([["progress", progress(3, { loss: 0.123456, lr: 0.0002, eta_s: 185, elapsed_s: 42 })]]);
  assert.equal(formatStatus(running), "step 3/10 · loss 0.1235 · lr 2.00e-4 · ETA 3m 05s · 42s elapsed");
  const finished = applyExecuted(running, { dit_trainer_losses: [[3, 0.0987654]] });
  assert.equal(formatStatus(finished), "finished 3 steps in 42s · final loss 0.09877");
});

test("unknown message kinds are a programming error", () => {
  assert.throws(() => reduceMessage(createViewState(), "progres", {}), /unknown TrainLoRA view message kind "progres"/);
});

test("only plain file names are kept as the saved adapter's name", () => {
  assert.equal(sanitizeFileName("my_lora_2.safetensors"), "my_lora_2.safetensors");
  for (const bad of ["", "a/b.safetensors", "..\\x", "x\u0000y", "n".repeat(300), 7, null]) {
    assert.equal(sanitizeFileName(bad), null, String(bad));
  }
  const restored = restoreViewState({ ...serializeViewState(createViewState()), saved: "../x" });
  assert.equal(restored.saved, null);
});


test("validation points of progress messages build the second series, the step-0 baseline first", () => {
  const state = run([
    ["progress", progress(1, { validation: [[0, 0.9], [1, 0.8]] })],
    ["progress", progress(2, { validation: [] })],
    ["progress", progress(3)], // older servers send no validation field
    ["progress", progress(4, { validation: [[4, 0.7], "junk", [5, NaN]] })],
  ]);
  assert.deepEqual(state.validation, [[0, 0.9], [1, 0.8], [4, 0.7]]);
  assert.deepEqual(state.history.map(([step]) => step), [1, 2, 3, 4], "training series unchanged");
  assert.match(formatStatus(state), /val 0\.7/);
  // A new run (lower step) starts both series empty.
  assert.deepEqual(run([["progress", progress(1)]], state).validation, []);
});

test("executed output replaces the validation series, and it survives save and reload", () => {
  const state = run([
    ["progress", progress(1, { validation: [[0, 0.9]] })],
    [
      "executed",
      {
        dit_trainer_losses: [[1, 0.5], [2, 0.4]],
        dit_trainer_validation: [[0, 0.9], [2, 0.95]],
        dit_trainer_saved: ["run.safetensors"],
      },
    ],
  ]);
  assert.deepEqual(state.validation, [[0, 0.9], [2, 0.95]]);
  assert.match(formatStatus(state), /validation 0\.95/);
  const restored = restoreViewState(JSON.parse(JSON.stringify(serializeViewState(state))));
  assert.deepEqual(restored.validation, state.validation);
  assert.deepEqual(restoreViewState({ ...serializeViewState(state), validation: "bad" }).validation, []);
});
