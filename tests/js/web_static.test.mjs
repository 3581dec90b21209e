// Checks on the source of web/: the frontend imports every .js file there, so
// what those files may contain is part of the pack's safety contract.
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const WEB_DIR = fileURLToPath(new URL("../../web/", import.meta.url));

function listFiles(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) =>
    entry.isDirectory() ? listFiles(join(dir, entry.name)) : [join(dir, entry.name)],
  );
}

const files = listFiles(WEB_DIR);
const sources = files
  .filter((file) => file.endsWith(".js"))
  .map((file) => ({ name: relative(WEB_DIR, file), text: readFileSync(file, "utf8") }));

test("web/ holds only extension modules, no tests", () => {
  assert.ok(sources.some(({ name }) => name === "dit_trainer.js"));
  for (const file of files) {
    const name = relative(WEB_DIR, file);
    assert.ok(name.endsWith(".js"), `unexpected file ${name}`);
    assert.ok(!/test/i.test(name), `${name}: tests would be loaded by the frontend`);
  }
});

test("no remote hosts and no network or eval APIs in web/", () => {
  const forbidden = [
    "http://",
    "https://",
    "fetch(",
    "fetchApi(",
    "XMLHttpRequest",
    "WebSocket",
    "sendBeacon",
    "EventSource",
    "eval(",
    "new Function",
    "import(",
    "document.write",
    "insertAdjacentHTML",
    "outerHTML",
  ];
  for (const { name, text } of sources) {
    for (const needle of forbidden) assert.ok(!text.includes(needle), `${name} contains ${needle}`);
  }
});

test("innerHTML only ever receives the escaping gallery builder's output", () => {
  const assignments = sources.flatMap(({ name, text }) =>
    [...text.matchAll(/innerHTML\s*=\s*([^;]+);/g)].map(([, value]) => [name, value.trim()]),
  );
  assert.deepEqual(assignments, [["lib/view.js", "galleryHtml(state.samples, apiURL, rand)"]]);
});

test("imports are relative; only the entry module reaches the core frontend", () => {
  for (const { name, text } of sources) {
    for (const [, specifier] of text.matchAll(/^\s*import\s[^"']*["']([^"']+)["']/gm)) {
      if (name === "dit_trainer.js" && specifier.startsWith("../../scripts/")) {
        assert.ok(["../../scripts/app.js", "../../scripts/api.js"].includes(specifier), specifier);
      } else {
        assert.ok(specifier.startsWith("./"), `${name} imports ${specifier}`);
      }
    }
  }
});

test("library modules load without a browser and without side effects", async () => {
  const globalsBefore = Object.keys(globalThis).sort();
  for (const { name } of sources.filter(({ name }) => name.startsWith("lib/"))) {
    const module = await import(new URL(`../../web/${name}`, import.meta.url).href);
    assert.ok(Object.keys(module).length > 0, `${name} exports nothing`);
  }
  assert.deepEqual(Object.keys(globalThis).sort(), globalsBefore);
});
