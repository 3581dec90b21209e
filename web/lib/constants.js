// Names shared by the TrainLoRA web extension and the Python nodes that feed it.
// The Python side sends these exact strings; change both sides together.

/** Node type (key in NODE_CLASS_MAPPINGS) that gets the live chart and gallery. */
export const NODE_CLASS = "TrainLoRA";

/** Namespaced extension name passed to app.registerExtension. */
export const EXTENSION_NAME = "dit_trainer.TrainLoRA";

/**
 * Websocket event: {node, step, total, loss, lr, eta_s, elapsed_s, validation}; validation is
 * [[step, loss], ...], the validation losses evaluated since the last event (often empty).
 */
export const PROGRESS_EVENT = "dit_trainer.progress";

/** Websocket event: {node, step, images: [{filename, subfolder, type}], captions: [str]}. */
export const SAMPLES_EVENT = "dit_trainer.samples";

/** Keys of the node's UI output (the core "executed" event, node.onExecuted). */
export const OUTPUT_LOSSES_KEY = "dit_trainer_losses";
export const OUTPUT_SAMPLES_KEY = "dit_trainer_samples";
/** [file name] of the adapter in models/loras (a "_2" name when the asked-for one belonged to someone else). */
export const OUTPUT_SAVED_KEY = "dit_trainer_saved";
/** [[step, validation loss], ...] of the finished run. */
export const OUTPUT_VALIDATION_KEY = "dit_trainer_validation";

/** The TrainLoRA input whose textarea must show several prompt lines. */
export const PROMPTS_WIDGET = "sample_prompts";

/** node.properties key under which the view state is saved in the workflow. */
export const PROPERTY_KEY = "dit_trainer_view";

/** Name of the DOM widget that holds the chart, status line and gallery. */
export const WIDGET_NAME = "dit_trainer_view";
