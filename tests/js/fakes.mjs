// Small stand-ins for the browser and the ComfyUI frontend, enough to drive web/lib.
// Not a test file itself (node --test only picks up *.test.mjs).

/** Records what is drawn: every stroke with its style and path, every text and rect. */
export class RecordingContext2D {
  constructor() {
    this.fillStyle = "";
    this.strokeStyle = "";
    this.lineWidth = 1;
    this.font = "";
    this.textAlign = "start";
    this.textBaseline = "alphabetic";
    this.strokes = [];
    this.texts = [];
    this.fillRects = [];
    this.ops = [];
    this.path = [];
  }
  save() { this.ops.push("save"); }
  restore() { this.ops.push("restore"); }
  setTransform(...args) { this.ops.push(["setTransform", ...args]); }
  beginPath() { this.path = []; }
  moveTo(x, y) { this.path.push(["M", x, y]); }
  lineTo(x, y) { this.path.push(["L", x, y]); }
  rect(x, y, w, h) { this.path.push(["R", x, y, w, h]); }
  clip() { this.ops.push("clip"); }
  stroke() {
    this.strokes.push({ style: this.strokeStyle, lineWidth: this.lineWidth, path: this.path.slice() });
  }
  strokeRect(x, y, w, h) { this.ops.push(["strokeRect", x, y, w, h]); }
  fillRect(x, y, w, h) { this.fillRects.push({ style: this.fillStyle, x, y, w, h }); }
  fillText(text, x, y) {
    this.texts.push({ text, x, y, style: this.fillStyle, align: this.textAlign });
  }
}

class FakeClassList {
  constructor() { this.names = new Set(); }
  add(name) { this.names.add(name); }
  contains(name) { return this.names.has(name); }
}

export class FakeElement {
  constructor(tagName, ownerDocument) {
    this.tagName = tagName.toUpperCase();
    this.ownerDocument = ownerDocument;
    this.children = [];
    this.style = {};
    this.className = "";
    this.classList = new FakeClassList();
    this.id = "";
    this.title = "";
    this.textContent = "";
    this.innerHTML = "";
    this.listeners = {};
    this.clientWidth = 320;
    this.clientHeight = 0;
    this.width = 300;
    this.height = 150;
    this.context = tagName === "canvas" ? new RecordingContext2D() : null;
  }
  appendChild(child) {
    this.children.push(child);
    child.parentElement = this;
    return child;
  }
  addEventListener(type, listener) {
    (this.listeners[type] ??= []).push(listener);
  }
  dispatch(type) {
    for (const listener of this.listeners[type] ?? []) listener({ type, target: this });
  }
  querySelectorAll() {
    return [];
  }
  getContext(kind) {
    return kind === "2d" ? this.context : null;
  }
  /** First descendant with this class name (the view's parts). */
  find(className) {
    for (const child of this.children) {
      if (child.className === className) return child;
      const found = child.find(className);
      if (found) return found;
    }
    return null;
  }
}

export class FakeDocument {
  constructor() {
    this.head = new FakeElement("head", this);
    this.defaultView = null; // no getComputedStyle: the view uses its default theme
  }
  createElement(tagName) {
    return new FakeElement(tagName, this);
  }
  getElementById(id) {
    return this.head.children.find((child) => child.id === id) ?? null;
  }
}

/** The frontend's api: an EventTarget with apiURL, as in scripts/api.ts. */
export class FakeApi extends EventTarget {
  constructor(apiBase = "") {
    super();
    this.apiBase = apiBase;
    this.listenedTypes = new Set();
  }
  addEventListener(type, listener, options) {
    this.listenedTypes.add(type);
    super.addEventListener(type, listener, options);
  }
  apiURL(route) {
    return `${this.apiBase}/api${route}`;
  }
  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** app.canvas: setDirty(true, true) redraws, which lays every visible node out again. */
export class FakeCanvas {
  constructor(graph) {
    this.graph = graph;
    this.redraws = 0;
  }
  setDirty(foreground, background) {
    if (foreground && background) this.redraws += 1;
  }
}

export class FakeGraph {
  constructor() {
    this.nodesById = new Map();
  }
  add(node) {
    this.nodesById.set(String(node.id), node);
    node.graph = this;
    return node;
  }
  // Like litegraph: ids are object keys, so "7" and 7 find the same node.
  getNodeById(id) {
    return this.nodesById.get(String(id)) ?? null;
  }
}

/**
 * A node class shaped like the frontend's registered node types: prototype hooks,
 * addDOMWidget, and serialize/configure that call onSerialize/onConfigure the way
 * litegraph's LGraphNode does. `inputWidgets` are the widgets the frontend makes from
 * INPUT_TYPES before onNodeCreated runs (name and an options object each).
 */
export function makeNodeType(comfyClass, inputWidgets = []) {
  class FakeNode {
    static comfyClass = comfyClass;
    constructor() {
      this.id = -1;
      this.type = comfyClass;
      this.size = [300, 120];
      this.properties = {};
      this.widgets = inputWidgets.map((name) => ({ name, options: {}, value: "", serialize: true }));
    }
    addDOMWidget(name, type, element, options = {}) {
      const widget = { name, type, element, options, value: "" };
      this.widgets.push(widget);
      return widget;
    }
    setSize(size) {
      this.size = size;
    }
    serialize() {
      const serialized = {
        id: this.id,
        type: this.type,
        properties: structuredClone(this.properties),
        widgets_values: this.widgets.filter((w) => w.serialize !== false).map((w) => w.value),
      };
      this.onSerialize?.(serialized);
      return serialized;
    }
    configure(info) {
      this.id = info.id;
      this.properties = structuredClone(info.properties ?? {});
      this.onConfigure?.(info);
    }
  }
  return FakeNode;
}

/** LiteGraph.createNode: construct, then onNodeCreated. */
export function createNode(NodeType, id, graph) {
  const node = new NodeType();
  node.onNodeCreated?.();
  node.id = id;
  graph?.add(node);
  return node;
}

/** The view's DOM widget of a node. */
export function viewWidget(node) {
  return node.widgets.find((w) => w.type === "dit_trainer_view");
}

/** The view's parts inside a node's DOM widget. */
export function viewParts(node) {
  const element = viewWidget(node).element;
  return {
    element,
    canvas: element.find("ditt-chart"),
    status: element.find("ditt-status"),
    gallery: element.find("ditt-gallery"),
  };
}
