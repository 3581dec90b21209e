// The TrainLoRA frontend extension, built from injected `app` and `api` objects so
// tests can drive it without a browser; web/dit_trainer.js passes the real ones.
//
// Data flow: websocket messages ("dit_trainer.progress", "dit_trainer.samples") and
// the core "executed" / "execution_interrupted" / "execution_error" events go through
// the reducer in state.js into a per-node view state; the view redraws at most once
// per animation frame. The state is written into the node's serialized properties
// (onSerialize) and read back on load (onConfigure), so a saved workflow reopens
// with its last loss curve and samples.

import {
  EXTENSION_NAME,
  NODE_CLASS,
  PROGRESS_EVENT,
  PROMPTS_WIDGET,
  PROPERTY_KEY,
  SAMPLES_EVENT,
  WIDGET_NAME,
} from "./constants.js";
import { findTrainNode } from "./node_ids.js";
import {
  createViewState,
  reduceMessage,
  restoreViewState,
  serializeViewState,
  toggleLogScale,
} from "./state.js";
import { createTrainView } from "./view.js";

/** Nodes narrower than this get widened on creation so the chart is readable. */
const NODE_MIN_WIDTH = 400;

/** Height of the sample_prompts textarea: five lines of ComfyUI's 10 px monospace, plus padding. */
export const PROMPTS_MIN_HEIGHT = 84;

/** Space the frontend keeps above and below a DOM widget's element (its DEFAULT_MARGIN), in CSS pixels. */
export const WIDGET_MARGIN = 10;

/** Wrap prototype[name] so `after` runs after the original (other extensions may patch it too). */
function chainMethod(prototype, name, after) {
  const original = prototype[name];
  prototype[name] = function chained(...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function defaultScheduleFrame(callback) {
  if (typeof globalThis.requestAnimationFrame === "function") {
    globalThis.requestAnimationFrame(callback);
  } else {
    setTimeout(callback, 16);
  }
}

/**
 * @param {{app: object, api: object, document?: Document,
 *          scheduleFrame?: (callback: () => void) => void}} deps
 *   app/api: the frontend's scripts/app.js and scripts/api.js exports;
 *   scheduleFrame: how redraws are deferred (tests pass a synchronous one).
 * @returns the object to pass to app.registerExtension
 */
export function createExtension({ app, api, document: doc, scheduleFrame = defaultScheduleFrame }) {
  const states = new WeakMap(); // node -> view state
  const views = new WeakMap(); // node -> view
  const pendingRender = new WeakSet();
  // Differs per page load, so a restored gallery never shows a stale cached image.
  const cacheToken = Math.random().toString(36).slice(2, 10);

  const stateOf = (node) => states.get(node) ?? createViewState();

  function requestRender(node) {
    if (!views.has(node) || pendingRender.has(node)) return;
    pendingRender.add(node);
    scheduleFrame(() => {
      pendingRender.delete(node);
      views.get(node)?.render(stateOf(node));
    });
  }

  function setState(node, next) {
    if (next === states.get(node)) return;
    states.set(node, next);
    requestRender(node);
  }

  function onMessage(kind, detail, data = detail) {
    const node = findTrainNode(app, detail);
    if (node) setState(node, reduceMessage(stateOf(node), kind, data));
  }

  function attachView(node) {
    const view = createTrainView(doc ?? globalThis.document, {
      apiURL: (route) => api.apiURL(route),
      cacheToken,
      onToggleLogScale: () => setState(node, toggleLogScale(stateOf(node))),
      // Redraw the canvas, which lays the node out again: it grows when the view needs more room.
      // (app.canvas, not node.setDirtyCanvas: a graph loaded from a template may list no canvas.)
      onContentResize: () => app.canvas?.setDirty?.(true, true),
    });
    // The view is exactly as tall as its content (min = max), so the frontend gives the
    // node's spare height to the textareas instead, and a caption is never cut off.
    const height = () => view.contentHeight() + 2 * WIDGET_MARGIN;
    const widget = node.addDOMWidget(WIDGET_NAME, "dit_trainer_view", view.element, {
      serialize: false, // not an input: keep it out of the prompt sent to the server
      margin: WIDGET_MARGIN,
      getMinHeight: height,
      getMaxHeight: height,
    });
    const prompts = node.widgets?.find((w) => w.name === PROMPTS_WIDGET);
    if (prompts?.options) prompts.options.getMinHeight = () => PROMPTS_MIN_HEIGHT;
    // Not in widgets_values either, so saved workflows keep the node's input layout.
    widget.serialize = false;
    views.set(node, view);
    if (Array.isArray(node.size) && node.size[0] < NODE_MIN_WIDTH) {
      node.setSize?.([NODE_MIN_WIDTH, node.size[1]]);
    }
    requestRender(node);
  }

  return {
    name: EXTENSION_NAME,

    setup() {
      api.addEventListener(PROGRESS_EVENT, ({ detail }) => onMessage("progress", detail));
      api.addEventListener(SAMPLES_EVENT, ({ detail }) => onMessage("samples", detail));
      // The run ended without an "executed" event; {node_id, node_type, ...}.
      const onStopped = (reason) => ({ detail }) => {
        if (detail?.node_type === NODE_CLASS) onMessage("stopped", { node: detail.node_id }, reason);
      };
      api.addEventListener("execution_interrupted", onStopped("interrupted"));
      api.addEventListener("execution_error", onStopped("error"));
    },

    beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== NODE_CLASS) return;
      const proto = nodeType.prototype;
      chainMethod(proto, "onNodeCreated", function () {
        attachView(this);
      });
      // The core "executed" handler finds the node (subgraph paths included) and calls this.
      chainMethod(proto, "onExecuted", function (output) {
        setState(this, reduceMessage(stateOf(this), "executed", output));
      });
      chainMethod(proto, "onConfigure", function (info) {
        setState(this, restoreViewState(info?.properties?.[PROPERTY_KEY]));
      });
      chainMethod(proto, "onSerialize", function (serialized) {
        serialized.properties = {
          ...serialized.properties,
          [PROPERTY_KEY]: serializeViewState(stateOf(this)),
        };
      });
      chainMethod(proto, "onResize", function () {
        requestRender(this);
      });
      chainMethod(proto, "onRemoved", function () {
        views.get(this)?.dispose();
        views.delete(this);
      });
    },
  };
}
