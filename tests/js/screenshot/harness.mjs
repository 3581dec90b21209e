// Replays a recorded demo run (record_demo_run.py) through the view's reducer and renders
// the TrainLoRA view. Query: ?run=<folder with messages.json, relative to this page>
// (default "run"), &upto=<step> to stop the replay mid-run (default: the whole run,
// then the node's executed output, as ComfyUI sends it at the end).

import { createTrainView } from "../../../web/lib/view.js";
import { createViewState, reduceMessage } from "../../../web/lib/state.js";

const KINDS = { "dit_trainer.progress": "progress", "dit_trainer.samples": "samples" };

async function main() {
  const query = new URLSearchParams(location.search);
  const run = (query.get("run") || "run").replace(/\/+$/, "");
  const upto = query.has("upto") ? Number(query.get("upto")) : Infinity;
  const record = await (await fetch(`${run}/messages.json`)).json();

  let state = createViewState();
  for (const [event, data] of record.messages) {
    if (!(event in KINDS) || data.step > upto) continue;
    state = reduceMessage(state, KINDS[event], data);
  }
  if (upto === Infinity) state = reduceMessage(state, "executed", record.executed[record.node]);

  // The ComfyUI server's /view route, mapped onto the copied preview files.
  const apiURL = (route) => {
    const params = new URLSearchParams(route.slice(route.indexOf("?") + 1));
    const file = `${run}/images/${params.get("subfolder")}/${params.get("filename")}`;
    return new URL(file, location.href).pathname; // page-relative, as the view requires
  };
  const view = createTrainView(document, { apiURL, cacheToken: "demo", onToggleLogScale() {} });
  document.getElementById("host").appendChild(view.element);
  view.render(state);

  await Promise.all([...document.images].map((img) => img.decode().catch(() => {})));
  document.body.dataset.ready = "1";
}

main().catch((error) => {
  document.body.textContent = `harness error: ${error}`;
  document.body.style.color = "#f66";
});
