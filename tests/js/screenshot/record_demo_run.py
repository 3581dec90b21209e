"""Record a real run of the embedded demo for the web view's screenshot harness.

    .venv/bin/python tests/js/screenshot/record_demo_run.py OUT_DIR [--steps 300] [--sample-every 50]

Runs the TrainLoRA part of example_workflows/demo_embedded_dora.json node by node on the fake
ComfyUI host of the tests (tests/fake_comfy), then writes into OUT_DIR:
  messages.json   {"messages": [[event, data], ...], "executed": {node id: TrainLoRA's UI output}}
                  (the websocket messages PromptServer.send_sync got, in order)
  images/<subfolder>/<filename>   the preview PNGs the messages name (copied from ComfyUI's temp folder)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TESTS))

import build_example_workflows as builder  # noqa: E402
import fake_comfy  # noqa: E402
from fake_comfy.executor import execute, is_link  # noqa: E402


def train_prompt(steps: int, sample_every: int) -> tuple[dict, str]:
    """The shipped demo workflow in API format, cut to TrainLoRA and what it needs."""
    workflow = json.loads((builder.OUT / "demo_embedded_dora.json").read_text(encoding="utf-8"))
    prompt = builder.validate_workflow.ui_to_api(workflow, builder.object_info())
    (train,) = [k for k, n in prompt.items() if n["class_type"] == "TrainLoRA"]
    prompt[train]["inputs"].update({"steps": steps, "sample_every": sample_every,
                                    "save_every": sample_every})
    needed, todo = set(), [train]
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo += [v[0] for v in prompt[key]["inputs"].values() if is_link(v)]
    return {k: prompt[k] for k in needed}, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (messages.json and images/)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sample-every", type=int, default=50)
    args = parser.parse_args(argv)

    prompt, train = train_prompt(args.steps, args.sample_every)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        host = fake_comfy.install(Path(tmp))
        try:
            run = execute(prompt, fake_comfy.import_pack().NODE_CLASS_MAPPINGS)
        finally:
            fake_comfy.unload_pack()
            fake_comfy.uninstall(host)
        messages = [[event, data] for event, data in host.messages if event.startswith("dit_trainer.")]
        copied = 0
        for event, data in messages:
            if event != "dit_trainer.samples":
                continue
            for image in data["images"]:
                source = host.root / image["type"] / image["subfolder"] / image["filename"]
                target = args.out / "images" / image["subfolder"] / image["filename"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                copied += 1
    ui = {k: v for k, v in run.ui[train].items() if k.startswith("dit_trainer_") or k == "images"}
    record = {"node": train, "messages": messages, "executed": {train: ui}}
    (args.out / "messages.json").write_text(json.dumps(record), encoding="utf-8")
    print(f"{len(messages)} messages, {copied} images, {time.perf_counter() - start:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
