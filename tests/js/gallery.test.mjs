import test from "node:test";
import assert from "node:assert/strict";

import {
  SHOWN_CAPTION_CHARS,
  escapeHtml,
  galleryHtml,
  isPageRelativeUrl,
  isSafeImageRef,
  viewUrl,
} from "../../web/lib/gallery.js";

const apiURL = (route) => `/api${route}`;
const image = (filename, extra = {}) => ({ filename, subfolder: "", type: "temp", ...extra });
const samplesOf = (pairs, step = 40) => ({
  step,
  items: pairs.map(([img, caption]) => ({ image: img, caption })),
});

/** The src attributes of <img> tags, HTML entities decoded back to the URL. */
function imgSources(html) {
  return [...html.matchAll(/<img src="([^"]*)"/g)].map(([, src]) => src.replaceAll("&amp;", "&"));
}

test("escapeHtml escapes every markup character", () => {
  assert.equal(
    escapeHtml(`<img src=x onerror="alert('1')">&`),
    "&lt;img src=x onerror=&quot;alert(&#39;1&#39;)&quot;&gt;&amp;",
  );
  assert.equal(escapeHtml(42), "42");
});

test("a hostile caption is shown as text, never as markup", () => {
  const hostile = `<img src=x onerror=alert(1)>"><script>alert(2)</script>`;
  const html = galleryHtml(samplesOf([[image("s0.png"), hostile]]), apiURL, "r");
  assert.ok(!html.includes("<script"), html);
  assert.ok(!html.includes("<img src=x"), html);
  assert.equal((html.match(/<img /g) ?? []).length, 1, "only our own image tag");
  assert.ok(html.includes("&lt;img src=x onerror=alert(1)&gt;&quot;&gt;&lt;script&gt;"));
  // The caption is also in the alt and title attributes: no raw quote may end them early.
  for (const [, value] of html.matchAll(/(?:alt|title)="([^"]*)"/g)) {
    assert.ok(!/[<>"']/.test(value), `attribute value ${value}`);
  }
});

test("quotes and specials in file names are percent-encoded in the /view URL", () => {
  const name = `a"b'c <d>&e.png`;
  const html = galleryHtml(samplesOf([[image(name, { subfolder: "run 1" }), "cap"]]), apiURL, "tok");
  const [src] = imgSources(html);
  assert.ok(src.startsWith("/api/view?"), src);
  const params = new URLSearchParams(src.slice(src.indexOf("?") + 1));
  assert.equal(params.get("filename"), name);
  assert.equal(params.get("subfolder"), "run 1");
  assert.equal(params.get("type"), "temp");
  assert.equal(params.get("rand"), "tok");
  assert.ok(!/["'<>]/.test(src), "no raw quote or bracket reaches the attribute");
});

test("path traversal and unknown folders are rejected before any URL is built", () => {
  const bad = [
    image("../secret.png"),
    image("a/b.png"),
    image("a\\b.png"),
    image(".."),
    image(""),
    image("x.png", { subfolder: "../outside" }),
    image("x.png", { subfolder: "ok/../../outside" }),
    image("x.png", { subfolder: "/etc" }),
    image("x.png", { subfolder: "a\\b" }),
    image("x.png", { type: "input" }),
    image("x.png", { type: "https" }),
    image("x\u0000.png"),
    image("x".repeat(256)),
    { subfolder: "", type: "temp" },
    null,
  ];
  for (const ref of bad) {
    assert.equal(isSafeImageRef(ref), false, JSON.stringify(ref));
    assert.equal(viewUrl(ref, apiURL, "r"), null);
  }
  assert.equal(isSafeImageRef(image("ok.png", { subfolder: "dit_trainer/run_1" })), true);
  assert.equal(isSafeImageRef(image("..ok.png", { type: "output" })), true, "dots inside a name are fine");
});

test("an unusable image keeps its caption and loads nothing", () => {
  const html = galleryHtml(samplesOf([[image("../secret.png"), "kept caption"]]), apiURL, "r");
  assert.equal(imgSources(html).length, 0);
  assert.ok(html.includes("image unavailable"));
  assert.ok(html.includes("kept caption"));
  // A sanitized state stores such an image as null: same result.
  assert.equal(imgSources(galleryHtml(samplesOf([[null, "c"]]), apiURL, "r")).length, 0);
});

test("only page-relative URLs are used, whatever apiURL returns", () => {
  const ref = image("s.png");
  for (const remote of ["http://evil.example", "https://evil.example", "//evil.example", "/\\evil.example"]) {
    assert.equal(viewUrl(ref, (route) => `${remote}${route}`, "r"), null, remote);
    assert.equal(isPageRelativeUrl(`${remote}/view`), false, remote);
  }
  const behindProxy = viewUrl(ref, (route) => `/comfy/api${route}`, "r");
  assert.ok(behindProxy.startsWith("/comfy/api/view?filename=s.png"), behindProxy);
});

test("gallery shows the step and one figure per image, long captions cut", () => {
  const long = "x".repeat(SHOWN_CAPTION_CHARS + 50);
  const html = galleryHtml(
    samplesOf([[image("a.png"), "first"], [image("b.png"), long]], 1200),
    apiURL,
    "r",
  );
  assert.ok(html.includes("samples at step 1200"));
  assert.equal((html.match(/<figure /g) ?? []).length, 2);
  assert.deepEqual(
    imgSources(html).map((src) => new URLSearchParams(src.split("?")[1]).get("filename")),
    ["a.png", "b.png"],
  );
  assert.ok(html.includes(`title="${long}"`), "full caption in the tooltip");
  assert.ok(html.includes(`>${"x".repeat(SHOWN_CAPTION_CHARS - 1)}…<`), "cut caption shown");
  assert.equal(galleryHtml(null, apiURL, "r"), "");
});
