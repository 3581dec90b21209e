import test from "node:test";
import assert from "node:assert/strict";
import { register } from "node:module";

import { EXTENSION_NAME, NODE_CLASS, PROGRESS_EVENT, SAMPLES_EVENT } from "../../web/lib/constants.js";

register("./fixtures/core_scripts_hooks.mjs", import.meta.url);

test("web/dit_trainer.js registers the extension with the core app and api", async () => {
  await import("../../web/dit_trainer.js");
  const { registered } = await import("./fixtures/fake_app.mjs");
  const { api } = await import("./fixtures/fake_api.mjs");
  assert.equal(registered.length, 1);
  const [extension] = registered;
  assert.equal(extension.name, EXTENSION_NAME);
  await extension.setup();
  assert.ok(api.listenedTypes.has(PROGRESS_EVENT));
  assert.ok(api.listenedTypes.has(SAMPLES_EVENT));
  // Loading the module touched no DOM: it only registered the hooks.
  const nodeType = { prototype: {} };
  await extension.beforeRegisterNodeDef(nodeType, { name: NODE_CLASS });
  assert.equal(typeof nodeType.prototype.onNodeCreated, "function");
});
