// Finding the graph node a websocket message is about.
// The server names a node by its execution id: "7" for a node of the root graph,
// "12:5" for node 5 inside the subgraph instance 12 (one segment per nesting level).
// Ids arrive as strings or numbers. This follows the core frontend's
// getNodeByExecutionId (graphTraversalUtil.ts), which routes the "executed" event.

import { NODE_CLASS } from "./constants.js";

/**
 * The id as a string, or null for anything that cannot be a node id.
 * @param {unknown} id
 */
export function normalizeExecutionId(id) {
  if (typeof id === "number" && Number.isInteger(id)) return String(id);
  if (typeof id === "string" && /^[^:]+(:[^:]+)*$/.test(id)) return id;
  return null;
}

/**
 * Walk the subgraph path of an execution id from the root graph.
 * @param {{getNodeById: (id: string) => object | null | undefined}} rootGraph
 * @param {string | number} executionId
 * @returns {object | null} the node, or null if any segment is missing
 */
export function getNodeByExecutionId(rootGraph, executionId) {
  const id = normalizeExecutionId(executionId);
  if (!rootGraph || id === null) return null;
  const segments = id.split(":");
  let graph = rootGraph;
  for (const segment of segments.slice(0, -1)) {
    const container = graph.getNodeById(segment);
    if (!container?.subgraph) return null;
    graph = container.subgraph;
  }
  return graph.getNodeById(segments[segments.length - 1]) ?? null;
}

/** True for a node of our TrainLoRA type (node ids repeat between workflows and subgraphs). */
export function isTrainNode(node) {
  return Boolean(node) && (node.type === NODE_CLASS || node.constructor?.comfyClass === NODE_CLASS);
}

/**
 * The TrainLoRA node a message is about, or null.
 * Prefers `display_node` when the message has one (as the core does for "executed"),
 * then the full subgraph path from the root graph. If the path cannot be walked
 * (a frontend without subgraphs, or a subgraph removed since the run started),
 * the last segment is looked up in the graph currently shown on the canvas.
 * A node that is not a TrainLoRA is never returned.
 * @param {{rootGraph?: object, graph?: object, canvas?: {graph?: object}}} app
 * @param {{node?: string | number, display_node?: string | number}} message
 */
export function findTrainNode(app, message) {
  const rootGraph = app.rootGraph ?? app.graph;
  const id = normalizeExecutionId(message?.display_node ?? message?.node);
  if (id === null) return null;
  const byPath = getNodeByExecutionId(rootGraph, id);
  if (byPath) return isTrainNode(byPath) ? byPath : null;
  const shownGraph = app.canvas?.graph;
  if (!id.includes(":") || !shownGraph) return null;
  const byLastSegment = shownGraph.getNodeById(id.slice(id.lastIndexOf(":") + 1));
  return isTrainNode(byLastSegment) ? byLastSegment : null;
}
