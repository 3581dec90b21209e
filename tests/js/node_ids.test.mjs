import test from "node:test";
import assert from "node:assert/strict";

import { NODE_CLASS } from "../../web/lib/constants.js";
import {
  findTrainNode,
  getNodeByExecutionId,
  isTrainNode,
  normalizeExecutionId,
} from "../../web/lib/node_ids.js";
import { FakeGraph } from "./fakes.mjs";

const train = (id) => ({ id, type: NODE_CLASS });
const other = (id) => ({ id, type: "KSampler" });

/** Root graph with train node 7, sampler 9 and subgraph instance 12 holding train node 5. */
function graphs() {
  const root = new FakeGraph();
  const subgraph = new FakeGraph();
  root.add(train(7));
  root.add(other(9));
  root.add({ id: 12, type: "subgraph-uuid", subgraph });
  subgraph.add(train(5));
  subgraph.add(other(6));
  return { root, subgraph };
}

test("execution ids are strings or integers, colon-separated for subgraphs", () => {
  assert.equal(normalizeExecutionId(7), "7");
  assert.equal(normalizeExecutionId("12:5"), "12:5");
  for (const bad of [7.5, "", ":5", "12:", "1::2", null, undefined, {}, ["7"]]) {
    assert.equal(normalizeExecutionId(bad), null, JSON.stringify(bad));
  }
});

test("getNodeByExecutionId walks subgraph instances from the root", () => {
  const { root, subgraph } = graphs();
  assert.equal(getNodeByExecutionId(root, "7"), root.getNodeById(7));
  assert.equal(getNodeByExecutionId(root, 7), root.getNodeById(7));
  assert.equal(getNodeByExecutionId(root, "12:5"), subgraph.getNodeById(5));
  assert.equal(getNodeByExecutionId(root, "9:5"), null, "9 is not a subgraph instance");
  assert.equal(getNodeByExecutionId(root, "12:99"), null);
  assert.equal(getNodeByExecutionId(null, "7"), null);
});

test("findTrainNode returns TrainLoRA nodes only", () => {
  const { root, subgraph } = graphs();
  const app = { rootGraph: root, canvas: { graph: root } };
  assert.equal(findTrainNode(app, { node: "7" }), root.getNodeById(7));
  assert.equal(findTrainNode(app, { node: 9 }), null);
  assert.equal(findTrainNode(app, { node: "12:6" }), null);
  assert.equal(findTrainNode(app, { node: "12:5" }), subgraph.getNodeById(5));
  assert.equal(findTrainNode(app, {}), null);
  assert.equal(isTrainNode({ type: "x", constructor: { comfyClass: NODE_CLASS } }), true);
});

test("display_node wins over node, as in the core executed handler", () => {
  const { root } = graphs();
  const app = { rootGraph: root };
  assert.equal(findTrainNode(app, { node: "9", display_node: "7" }), root.getNodeById(7));
});

test("an unwalkable path falls back to the last segment in the shown graph", () => {
  const { root, subgraph } = graphs();
  // The root graph no longer has instance 40 (older frontend or removed subgraph),
  // but the canvas shows a graph that holds node 5.
  assert.equal(findTrainNode({ rootGraph: root, canvas: { graph: subgraph } }, { node: "40:5" }), subgraph.getNodeById(5));
  assert.equal(findTrainNode({ rootGraph: root, canvas: { graph: subgraph } }, { node: "40:6" }), null);
  assert.equal(findTrainNode({ rootGraph: root, canvas: { graph: root } }, { node: "40:5" }), null);
  // A plain id never falls back: it names a root-graph node.
  assert.equal(findTrainNode({ rootGraph: root, canvas: { graph: subgraph } }, { node: "5" }), null);
});

test("the deprecated app.graph is used when rootGraph is absent", () => {
  const { root } = graphs();
  assert.equal(findTrainNode({ graph: root }, { node: 7 }), root.getNodeById(7));
});
