// Sample gallery: validated image references, /view URLs and escaped HTML.
// Captions and file names come from datasets and shared workflow files, so they
// are untrusted: every one is escaped before it reaches innerHTML, and images are
// only ever loaded from ComfyUI's own /view route on the page's origin.

/** Image folders of ComfyUI's /view route that the TrainLoRA node writes to. */
export const IMAGE_TYPES = Object.freeze(["temp", "output"]);

/** Longest file name or subfolder accepted (the common file-system limit). */
export const MAX_NAME_CHARS = 255;

/** Captions longer than this are cut in the figure; the full text stays in the tooltip. */
export const SHOWN_CAPTION_CHARS = 160;

const HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Escape text for use in HTML element content and in quoted attribute values. */
export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (char) => HTML_ESCAPES[char]);
}

// Control characters (including NUL) never appear in names our node writes.
const CONTROL_CHARS = /[\u0000-\u001f\u007f]/;

/**
 * True for a {filename, subfolder, type} that names a file inside one of ComfyUI's
 * image folders. The server checks paths itself; this rejects traversal (`..`,
 * absolute paths, separators in the file name) before a request is ever made.
 */
export function isSafeImageRef(ref) {
  if (!ref || typeof ref !== "object") return false;
  const { filename, subfolder = "", type } = ref;
  if (typeof filename !== "string" || typeof subfolder !== "string") return false;
  if (!IMAGE_TYPES.includes(type)) return false;
  if (filename.length === 0 || filename.length > MAX_NAME_CHARS) return false;
  if (subfolder.length > MAX_NAME_CHARS) return false;
  if (CONTROL_CHARS.test(filename) || CONTROL_CHARS.test(subfolder)) return false;
  if (/[/\\]/.test(filename) || filename === "." || filename === "..") return false;
  if (subfolder.includes("\\") || subfolder.startsWith("/")) return false;
  return !subfolder.split("/").some((part) => part === "..");
}

/**
 * A URL on the page's own origin: an absolute path, not a protocol-relative `//host`
 * (browsers also read `/\host` as `//host`, hence no backslash at all).
 */
export function isPageRelativeUrl(url) {
  return (
    typeof url === "string" && url.startsWith("/") && !url.startsWith("//") && !url.includes("\\")
  );
}

/**
 * The /view URL of an image, built like the core frontend does
 * (`api.apiURL('/view?' + URLSearchParams)`) so names are percent-encoded.
 * @param {{filename: string, subfolder: string, type: string}} ref
 * @param {(route: string) => string} apiURL the frontend's api.apiURL
 * @param {string} [rand] cache-busting token: temp file names repeat across runs
 * @returns {string | null} null if the reference or the resulting URL is not safe
 */
export function viewUrl(ref, apiURL, rand) {
  if (!isSafeImageRef(ref)) return null;
  const params = new URLSearchParams({
    filename: ref.filename,
    subfolder: ref.subfolder ?? "",
    type: ref.type,
  });
  if (rand) params.set("rand", rand);
  const url = apiURL(`/view?${params}`);
  return isPageRelativeUrl(url) ? url : null;
}

/**
 * Pair each sample image with its caption and URL.
 * @param {{step: number, items: Array<{image: object | null, caption: string}>} | null} samples
 * @returns {Array<{url: string | null, caption: string}>}
 */
export function galleryItems(samples, apiURL, rand) {
  if (!samples) return [];
  return samples.items.map(({ image, caption }) => ({
    url: image ? viewUrl(image, apiURL, rand) : null,
    caption,
  }));
}

function shortCaption(caption) {
  return caption.length > SHOWN_CAPTION_CHARS
    ? `${caption.slice(0, SHOWN_CAPTION_CHARS - 1)}…`
    : caption;
}

/**
 * HTML of the gallery: a heading with the step, then one figure per sample.
 * Every interpolated value is escaped; an unusable image shows its caption only.
 * @returns {string} "" when there are no samples
 */
export function galleryHtml(samples, apiURL, rand) {
  const items = galleryItems(samples, apiURL, rand);
  if (items.length === 0) return "";
  const figures = items.map(({ url, caption }) => {
    const picture = url
      ? `<img src="${escapeHtml(url)}" alt="${escapeHtml(caption)}" loading="lazy" decoding="async">`
      : `<div class="ditt-noimage">image unavailable</div>`;
    const label = caption
      ? `<figcaption title="${escapeHtml(caption)}">${escapeHtml(shortCaption(caption))}</figcaption>`
      : "";
    return `<figure class="ditt-sample">${picture}${label}</figure>`;
  });
  const heading = `<div class="ditt-samples-head">samples at step ${escapeHtml(samples.step)}</div>`;
  return `${heading}<div class="ditt-grid">${figures.join("")}</div>`;
}
