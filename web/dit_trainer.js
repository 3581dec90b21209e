// Live loss chart and sample gallery inside the TrainLoRA node (logic: ./lib/).
// Served as /extensions/<pack folder>/dit_trainer.js, so ../../scripts/ is the core frontend's.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { createExtension } from "./lib/extension.js";

app.registerExtension(createExtension({ app, api }));
