// The DOM inside the TrainLoRA node: loss chart canvas, status line, sample gallery.
// `doc` is injected (the page's document in ComfyUI, a fake in tests).

import { DEFAULT_THEME, drawLossChart } from "./loss_chart.js";
import { galleryHtml } from "./gallery.js";
import { formatStatus } from "./state.js";

/** Chart height in CSS pixels; the gallery takes the rest of the widget. */
export const CHART_HEIGHT = 150;

/** Smallest widget height ComfyUI lays out for the view (chart, status, a row of samples). */
export const VIEW_MIN_HEIGHT = 300;

/** Vertical gap between the view's parts (the `gap` of .ditt-view), in CSS pixels. */
const GAP = 4;

const STYLE_ID = "dit-trainer-view-style";

// Colours come from ComfyUI's palette variables so light and dark themes both work.
const VIEW_CSS = `
.ditt-view { display: flex; flex-direction: column; gap: ${GAP}px; overflow: hidden;
  font: 11px sans-serif; color: var(--fg-color, #ddd); box-sizing: border-box; }
.ditt-chart { width: 100%; height: ${CHART_HEIGHT}px; flex: none; cursor: pointer;
  border-radius: 4px; }
.ditt-status { flex: none; overflow-wrap: anywhere; color: var(--descrip-text, #aaa); }
.ditt-gallery { flex: 1 1 auto; overflow-y: auto; min-height: 0; }
.ditt-samples-head { color: var(--descrip-text, #aaa); margin-bottom: 2px; }
.ditt-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); gap: 4px; }
.ditt-sample { margin: 0; display: flex; flex-direction: column; gap: 2px; min-width: 0; }
.ditt-sample img { width: 100%; height: auto; border-radius: 3px; background: var(--comfy-input-bg, #222); }
.ditt-sample figcaption { font-size: 10px; line-height: 1.2; max-height: 3.6em; overflow: hidden;
  overflow-wrap: anywhere; color: var(--descrip-text, #aaa); }
.ditt-noimage, .ditt-missing::before { display: flex; align-items: center; justify-content: center;
  aspect-ratio: 1; border: 1px dashed var(--border-color, #555); border-radius: 3px;
  color: var(--descrip-text, #aaa); font-size: 10px; text-align: center; }
.ditt-missing::before { content: "image no longer available"; }
.ditt-missing img { display: none; }
`;

function ensureStyle(doc) {
  if (doc.getElementById(STYLE_ID)) return;
  const style = doc.createElement("style");
  style.id = STYLE_ID;
  style.textContent = VIEW_CSS;
  doc.head.appendChild(style);
}

/** Chart colours read from the palette variables on `element`, with dark-theme fallbacks. */
export function cssTheme(element) {
  const view = element.ownerDocument?.defaultView;
  if (!view?.getComputedStyle) return DEFAULT_THEME;
  const styles = view.getComputedStyle(element);
  const read = (name, fallback) => styles.getPropertyValue(name).trim() || fallback;
  return {
    ...DEFAULT_THEME,
    background: read("--comfy-input-bg", DEFAULT_THEME.background),
    grid: read("--border-color", DEFAULT_THEME.grid),
    text: read("--descrip-text", DEFAULT_THEME.text),
  };
}

/**
 * Build the view. Call render(state) after each state change (cheap: the gallery
 * HTML is only rebuilt when the sample set changes) and dispose() on node removal.
 * contentHeight() is the height the view needs to show all of it (chart, status and
 * every sample with its caption); onContentResize is called when that may have changed
 * (a new sample set, an image that finished loading), so the node can be laid out again.
 * @param {Document} doc
 * @param {{apiURL: (route: string) => string, cacheToken: string,
 *          onToggleLogScale: () => void, onContentResize?: () => void,
 *          theme?: (element: HTMLElement) => object}} options
 */
export function createTrainView(
  doc,
  { apiURL, cacheToken, onToggleLogScale, onContentResize = () => {}, theme = cssTheme },
) {
  ensureStyle(doc);
  const element = doc.createElement("div");
  element.className = "ditt-view";
  const canvas = doc.createElement("canvas");
  canvas.className = "ditt-chart";
  canvas.title = "Click to switch the loss axis between linear and log scale";
  const status = doc.createElement("div");
  status.className = "ditt-status";
  const gallery = doc.createElement("div");
  gallery.className = "ditt-gallery";
  element.appendChild(canvas);
  element.appendChild(status);
  element.appendChild(gallery);
  canvas.addEventListener("click", () => onToggleLogScale());

  let shownSamples;
  let lastState = null;

  function renderGallery(state) {
    if (state.samples === shownSamples) return;
    shownSamples = state.samples;
    // Cache key per run and step: temp file names repeat between runs.
    const rand = state.samples ? `${cacheToken}-${state.run}-${state.samples.step}` : "";
    gallery.innerHTML = galleryHtml(state.samples, apiURL, rand);
    for (const img of gallery.querySelectorAll("img")) {
      // Temp images vanish when ComfyUI restarts; show a placeholder instead of a broken icon.
      img.addEventListener("error", () => img.parentElement?.classList.add("ditt-missing"), {
        once: true,
      });
      // An image only has its height once loaded: the node may need to grow for it.
      img.addEventListener("load", () => reportHeight(), { once: true });
    }
  }

  let measured = VIEW_MIN_HEIGHT;

  /**
   * Chart, status line and the gallery's full content, never less than VIEW_MIN_HEIGHT.
   * While the frontend hides the view (zoomed far out) nothing can be measured: the last
   * measurement stands, so the node does not shrink and then cut the gallery off.
   */
  function contentHeight() {
    const statusHeight = status.offsetHeight || 0;
    const galleryHeight = gallery.scrollHeight || 0;
    if (statusHeight > 0 || galleryHeight > 0) {
      measured = Math.max(VIEW_MIN_HEIGHT, Math.ceil(CHART_HEIGHT + GAP + statusHeight + GAP + galleryHeight));
    }
    return measured;
  }

  let shownHeight = null;

  /** Tell the node when the height the view needs has changed. */
  function reportHeight() {
    const height = contentHeight();
    if (height !== shownHeight) {
      shownHeight = height;
      onContentResize();
    }
  }

  function renderChart(state) {
    const width = canvas.clientWidth || element.clientWidth || 300;
    const height = CHART_HEIGHT;
    const ratio = globalThis.devicePixelRatio || 1;
    // Backing store in device pixels for a sharp chart; drawing stays in CSS pixels.
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    drawLossChart(ctx, state, width, height, theme(element));
  }

  function render(state) {
    lastState = state;
    status.textContent = formatStatus(state);
    renderChart(state);
    renderGallery(state);
    reportHeight(); // a wrapped status line or a new sample set changes the height the view needs
  }

  // The node's size changes the canvas width, and a view shown again after being hidden can be
  // measured again: redraw the chart and re-check the height whenever the element is resized.
  const observer =
    typeof globalThis.ResizeObserver === "function"
      ? new globalThis.ResizeObserver(() => {
          if (lastState) renderChart(lastState);
          reportHeight();
        })
      : null;
  observer?.observe(element);

  return {
    element,
    render,
    contentHeight,
    dispose() {
      observer?.disconnect();
    },
  };
}
