import test from "node:test";
import assert from "node:assert/strict";

import {
  EXTENSION_NAME,
  NODE_CLASS,
  PROGRESS_EVENT,
  PROPERTY_KEY,
  SAMPLES_EVENT,
  WIDGET_NAME,
} from "../../web/lib/constants.js";
import { createExtension } from "../../web/lib/extension.js";
import { DEFAULT_THEME } from "../../web/lib/loss_chart.js";
import {
  FakeApi,
  FakeCanvas,
  FakeDocument,
  FakeGraph,
  createNode,
  makeNodeType,
  viewParts,
  viewWidget,
} from "./fakes.mjs";
import { PROMPTS_MIN_HEIGHT, WIDGET_MARGIN } from "../../web/lib/extension.js";
import { CHART_HEIGHT, VIEW_MIN_HEIGHT } from "../../web/lib/view.js";

const temp = (filename) => ({ filename, subfolder: "", type: "temp" });
const progress = (node, step, loss = 0.5) => ({
  node,
  step,
  total: 100,
  loss,
  lr: 0.0001,
  eta_s: 30,
  elapsed_s: 10,
});

/** A fresh frontend: graph, api, extension set up and TrainLoRA registered. */
async function setUp() {
  const graph = new FakeGraph();
  const app = { rootGraph: graph, canvas: new FakeCanvas(graph) };
  const api = new FakeApi();
  const extension = createExtension({
    app,
    api,
    document: new FakeDocument(),
    scheduleFrame: (callback) => callback(), // draw synchronously
  });
  await extension.setup();
  const TrainNode = makeNodeType(NODE_CLASS);
  await extension.beforeRegisterNodeDef(TrainNode, { name: NODE_CLASS });
  return { app, api, graph, extension, TrainNode };
}

const status = (node) => viewParts(node).status.textContent;

test("the extension is namespaced and listens to the trainer's websocket events", async () => {
  const { api, extension } = await setUp();
  assert.equal(extension.name, EXTENSION_NAME);
  for (const event of [PROGRESS_EVENT, SAMPLES_EVENT, "execution_interrupted", "execution_error"]) {
    assert.ok(api.listenedTypes.has(event), event);
  }
});

test("the node-def hook changes only TrainLoRA", async () => {
  const { extension } = await setUp();
  const Other = makeNodeType("KSampler");
  const before = Object.getOwnPropertyNames(Other.prototype);
  await extension.beforeRegisterNodeDef(Other, { name: "KSampler" });
  assert.deepEqual(Object.getOwnPropertyNames(Other.prototype), before);
  const node = createNode(Other, 3);
  assert.equal(node.widgets.length, 0);
});

test("a TrainLoRA node gets one non-serialized DOM widget and a readable width", async () => {
  const { graph, TrainNode } = await setUp();
  const node = createNode(TrainNode, 7, graph);
  assert.equal(node.widgets.length, 1);
  const [widget] = node.widgets;
  assert.equal(widget.name, WIDGET_NAME);
  assert.equal(widget.serialize, false, "kept out of widgets_values");
  assert.equal(widget.options.serialize, false, "kept out of the prompt");
  assert.ok(widget.options.getMinHeight() > 0);
  assert.ok(node.size[0] >= 400);
  assert.deepEqual(node.serialize().widgets_values, []);
  assert.equal(status(node), "waiting for training to start");
});

test("messages update the node they name, by string or number id", async () => {
  const { api, graph, TrainNode } = await setUp();
  const seven = createNode(TrainNode, 7, graph);
  const eight = createNode(TrainNode, 8, graph);
  api.emit(PROGRESS_EVENT, progress("7", 3, 0.25));
  assert.match(status(seven), /^step 3\/100 · loss 0.25/);
  assert.equal(status(eight), "waiting for training to start");
  api.emit(PROGRESS_EVENT, progress(8, 4));
  assert.match(status(eight), /^step 4\/100/);
  assert.match(status(seven), /^step 3\/100/);
  // The chart was drawn with the curve.
  const ctx = viewParts(seven).canvas.context;
  assert.ok(ctx.strokes.some((stroke) => stroke.style === DEFAULT_THEME.smooth));
});

test("messages for other nodes or unknown ids are ignored", async () => {
  const { api, graph, TrainNode } = await setUp();
  const train = createNode(TrainNode, 7, graph);
  const sampler = createNode(makeNodeType("KSampler"), 9, graph);
  for (const node of [9, "9", 99, "7:1", null, { id: 7 }]) api.emit(PROGRESS_EVENT, progress(node, 5));
  assert.equal(status(train), "waiting for training to start");
  assert.equal(sampler.widgets.length, 0);
});

test("a node inside a subgraph is found by its execution id path", async () => {
  const { api, graph, TrainNode } = await setUp();
  const outer = createNode(TrainNode, 5, graph); // same local id, root graph
  const subgraph = new FakeGraph();
  graph.add({ id: 12, type: "some-subgraph-uuid", subgraph });
  const inner = createNode(TrainNode, 5, subgraph);
  api.emit(PROGRESS_EVENT, progress("12:5", 6));
  assert.match(status(inner), /^step 6\/100/);
  assert.equal(status(outer), "waiting for training to start");
});

test("samples fill the gallery with escaped captions and /view URLs", async () => {
  const { api, graph, TrainNode } = await setUp();
  const node = createNode(TrainNode, 7, graph);
  api.emit(SAMPLES_EVENT, {
    node: "7",
    step: 20,
    images: [temp("s0.png")],
    captions: ["<img src=x onerror=alert(1)>"],
  });
  const html = viewParts(node).gallery.innerHTML;
  assert.ok(html.includes("samples at step 20"));
  assert.ok(html.includes('<img src="/api/view?filename=s0.png&amp;subfolder=&amp;type=temp&amp;rand='));
  assert.ok(html.includes("&lt;img src=x onerror=alert(1)&gt;"));
  assert.ok(!html.includes("<img src=x"));
});

test("onExecuted shows the finished run, still calling the original hook", async () => {
  const { graph, extension } = await setUp();
  const TrainNode = makeNodeType(NODE_CLASS);
  const seen = [];
  TrainNode.prototype.onExecuted = function (output) {
    seen.push(output);
  };
  await extension.beforeRegisterNodeDef(TrainNode, { name: NODE_CLASS });
  const node = createNode(TrainNode, 7, graph);
  const output = {
    images: [temp("loss.png")],
    dit_trainer_losses: [[1, 0.8], [50, 0.3], [100, 0.125]],
    dit_trainer_samples: [{ step: 100, images: [temp("final.png")], captions: ["final"] }],
  };
  node.onExecuted(output);
  assert.deepEqual(seen, [output]);
  assert.equal(status(node), "finished 100 steps · final loss 0.125");
  assert.ok(viewParts(node).gallery.innerHTML.includes("filename=final.png"));
});

test("the view is saved in the workflow and restored on load", async () => {
  const { api, graph, TrainNode } = await setUp();
  const original = createNode(TrainNode, 7, graph);
  api.emit(PROGRESS_EVENT, progress("7", 1, 0.5));
  api.emit(SAMPLES_EVENT, { node: "7", step: 1, images: [temp("a.png")], captions: ["a"] });
  api.emit(PROGRESS_EVENT, progress("7", 2, 0.25));
  viewParts(original).canvas.dispatch("click"); // switch to log scale
  const workflowNode = JSON.parse(JSON.stringify(original.serialize()));
  const saved = workflowNode.properties[PROPERTY_KEY];
  assert.deepEqual(saved.history, [[1, 0.5], [2, 0.25]]);
  assert.equal(saved.logScale, true);

  // Reload: a new page builds the node from the workflow JSON.
  const reloaded = await setUp();
  const restored = new reloaded.TrainNode();
  restored.onNodeCreated();
  restored.configure(workflowNode);
  assert.equal(status(restored), status(original));
  assert.deepEqual(restored.serialize().properties[PROPERTY_KEY], saved);
  const html = viewParts(restored).gallery.innerHTML;
  assert.ok(html.includes("filename=a.png"));
  assert.ok(viewParts(restored).canvas.context.texts.some((t) => t.text === "log"));
});

test("interrupt and error events stop only a TrainLoRA node's view", async () => {
  const { api, graph, TrainNode } = await setUp();
  const node = createNode(TrainNode, 7, graph);
  api.emit(PROGRESS_EVENT, progress("7", 10));
  api.emit("execution_error", { node_id: "7", node_type: "KSampler" });
  assert.match(status(node), /^step 10\/100/);
  api.emit("execution_interrupted", { node_id: "7", node_type: NODE_CLASS, prompt_id: "p" });
  assert.match(status(node), /^interrupted at step 10\/100/);
});

test("nothing is fetched: the gallery only sets <img> sources on the page's origin", async () => {
  const calls = [];
  const saved = { fetch: globalThis.fetch, XMLHttpRequest: globalThis.XMLHttpRequest };
  globalThis.fetch = (...args) => calls.push(["fetch", ...args]);
  globalThis.XMLHttpRequest = function XMLHttpRequest() {
    calls.push(["xhr"]);
  };
  try {
    const { api, graph, TrainNode } = await setUp();
    const node = createNode(TrainNode, 7, graph);
    api.emit(PROGRESS_EVENT, progress("7", 1));
    api.emit(SAMPLES_EVENT, { node: "7", step: 1, images: [temp("a.png")], captions: ["a"] });
    node.onExecuted({ dit_trainer_losses: [[1, 0.5]] });
    node.configure(JSON.parse(JSON.stringify(node.serialize())));
    for (const [, src] of viewParts(node).gallery.innerHTML.matchAll(/src="([^"]*)"/g)) {
      assert.ok(src.startsWith("/api/view?"), src);
    }
  } finally {
    Object.assign(globalThis, saved);
  }
  assert.deepEqual(calls, []);
});

test("the view is exactly as tall as its content, so captions are never cut and spare room goes elsewhere", async () => {
  const { app, api, graph, TrainNode } = await setUp();
  const node = createNode(TrainNode, 7, graph);
  const widget = viewWidget(node);
  assert.equal(widget.options.margin, WIDGET_MARGIN);
  assert.equal(widget.options.getMinHeight(), VIEW_MIN_HEIGHT + 2 * WIDGET_MARGIN); // nothing to show yet
  const { gallery, status: line } = viewParts(node);
  const loaded = [];
  gallery.querySelectorAll = () => [{ addEventListener: (type, listener) => loaded.push([type, listener]) }];
  const before = app.canvas.redraws;
  gallery.scrollHeight = 420; // four samples with two-line captions, as the browser measures them
  api.emit(SAMPLES_EVENT, { node: "7", step: 5, images: [temp("a.png")], captions: ["a long caption"] });
  assert.equal(app.canvas.redraws, before + 1, "a taller gallery lays the node out again");
  line.offsetHeight = 28; // the status line wrapped
  api.emit(PROGRESS_EVENT, progress("7", 6));
  assert.equal(app.canvas.redraws, before + 2, "so does a taller status line");
  api.emit(PROGRESS_EVENT, progress("7", 7));
  assert.equal(app.canvas.redraws, before + 2, "nothing changed size: no extra layout");
  assert.equal(widget.options.getMinHeight(), CHART_HEIGHT + 4 + 28 + 4 + 420 + 2 * WIDGET_MARGIN);
  // Zoomed far out the frontend hides the view: nothing measures, and the last height stands.
  gallery.scrollHeight = 0;
  line.offsetHeight = 0;
  assert.equal(widget.options.getMinHeight(), CHART_HEIGHT + 4 + 28 + 4 + 420 + 2 * WIDGET_MARGIN);
  assert.equal(widget.options.getMaxHeight(), widget.options.getMinHeight());
  const [type, onLoad] = loaded.find(([t]) => t === "load");
  const redraws = app.canvas.redraws;
  gallery.scrollHeight = 460; // visible again, and an image finished loading: taller
  line.offsetHeight = 28;
  onLoad();
  assert.equal(type, "load");
  assert.equal(app.canvas.redraws, redraws + 1, "an image that finished loading lays the node out again");
});

test("the sample_prompts box is tall enough for several prompt lines", async () => {
  const { graph, extension } = await setUp();
  const TrainNode = makeNodeType(NODE_CLASS, ["steps", "sample_prompts", "extra_options"]);
  await extension.beforeRegisterNodeDef(TrainNode, { name: NODE_CLASS });
  const node = createNode(TrainNode, 7, graph);
  const prompts = node.widgets.find((w) => w.name === "sample_prompts");
  assert.ok(PROMPTS_MIN_HEIGHT >= 5 * 13, "five lines of the 10 px textarea font");
  assert.equal(prompts.options.getMinHeight(), PROMPTS_MIN_HEIGHT);
  assert.equal(node.widgets.find((w) => w.name === "extra_options").options.getMinHeight, undefined);
});

test("the status line shows no ETA until the trainer sends a steady one, and names the saved file", async () => {
  const { api, graph, TrainNode } = await setUp();
  const node = createNode(TrainNode, 7, graph);
  api.emit(PROGRESS_EVENT, { ...progress("7", 1), eta_s: null, elapsed_s: 1 });
  assert.equal(status(node), "step 1/100 · loss 0.5 · lr 1.00e-4 · 1s elapsed");
  api.emit(PROGRESS_EVENT, { ...progress("7", 4), eta_s: 30 });
  assert.match(status(node), /ETA 30s/);
  node.onExecuted({ dit_trainer_losses: [[100, 0.2]], dit_trainer_saved: ["my_lora_2.safetensors"] });
  assert.equal(status(node), "finished 100 steps in 10s · final loss 0.2 · saved my_lora_2.safetensors");
  node.onExecuted({ dit_trainer_losses: [[100, 0.2]], dit_trainer_saved: ["../../etc/passwd"] });
  assert.doesNotMatch(status(node), /passwd/);
});

