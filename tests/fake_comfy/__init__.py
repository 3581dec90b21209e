"""A small fake of the ComfyUI modules the pack imports, faithful to the ComfyUI notes.

Modules (built as module objects, put into sys.modules by the `comfy_host` fixture):
  folder_paths            model folders, input / output / temp directories, rooted in a tmp dir
  comfy.utils             ProgressBar; like ComfyUI's global hook (main.hijack_progress) every
                          update first checks the interrupt flag, then is recorded with its preview
                          and the node executing at the time
  comfy.model_management  the interrupt flag and InterruptProcessingException; unload_all_models and
                          soft_empty_cache, recorded in `memory_calls` in the order they come
  server                  PromptServer.instance.send_sync, recorded; like the server's websocket it
                          only carries JSON, and NaN / Infinity fail here as the browser's JSON.parse
                          fails on them

Node code must run the way ComfyUI runs it: `executor.PromptExecutor` for whole prompts
(caching across prompts, output nodes only) and `executor.call_node` for one node
function (worker thread, inference mode).

`comfy_pack` imports the pack the way ComfyUI does: the folder under a module name
derived from its path (dots -> '_x_'), so only relative imports resolve.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HOST_MODULES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server")
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "loras", "vae", "text_encoders")
SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


@dataclass
class ProgressUpdate:
    value: int
    total: int
    preview: tuple | None  # ("JPEG" | "PNG", PIL.Image, max_size | None), as latent_preview sends it
    node: str | None = None  # the node executing when it was sent


def json_for_browser(data: Any) -> str:
    """Serialize as the server does, refusing what a browser could not parse."""
    return json.dumps(data, allow_nan=False)


@dataclass
class FakeHost:
    root: Path
    updates: list[ProgressUpdate] = field(default_factory=list)
    messages: list[tuple[str, Any]] = field(default_factory=list)
    # Called after each recorded update; a test sets the interrupt flag from here, as a user's
    # Cancel click would land between two steps.
    on_update: Callable[[ProgressUpdate], None] | None = None
    modules: dict[str, types.ModuleType] = field(default_factory=dict)
    executing: str | None = None  # the node the executor is running (ComfyUI's executing context)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def folder(self, kind: str) -> Path:
        return self.models_dir / kind

    def interrupt(self) -> None:
        self.modules["comfy.model_management"].interrupt_current_processing(True)

    def events(self, name: str) -> list[dict]:
        return [data for event, data in self.messages if event == name]


def _folder_paths(host: FakeHost) -> types.ModuleType:
    mod = types.ModuleType("folder_paths")
    mod.models_dir = str(host.models_dir)
    mod.supported_pt_extensions = SUPPORTED_PT_EXTENSIONS
    mod.folder_names_and_paths = {k: ([str(host.folder(k))], SUPPORTED_PT_EXTENSIONS) for k in MODEL_FOLDERS}
    directories = {name: host.root / name for name in ("input", "output", "temp")}
    for path in [*directories.values(), *(host.folder(k) for k in MODEL_FOLDERS)]:
        path.mkdir(parents=True, exist_ok=True)

    def get_folder_paths(folder_name: str) -> list[str]:
        return mod.folder_names_and_paths[folder_name][0][:]

    def get_filename_list(folder_name: str) -> list[str]:
        folders, extensions = mod.folder_names_and_paths[folder_name]
        names = set()
        for folder in folders:
            for dirpath, _, files in os.walk(folder, followlinks=True):
                for name in files:
                    if os.path.splitext(name)[1].lower() in extensions:
                        names.add(os.path.relpath(os.path.join(dirpath, name), folder))
        return sorted(names)

    def get_full_path(folder_name: str, filename: str) -> str | None:
        # As ComfyUI: the name is made relative first, so it cannot leave the folder.
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in mod.folder_names_and_paths[folder_name][0]:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
        return None

    mod.get_folder_paths = get_folder_paths
    mod.get_filename_list = get_filename_list
    mod.get_full_path = get_full_path
    mod.get_input_directory = lambda: str(directories["input"])
    mod.get_output_directory = lambda: str(directories["output"])
    mod.get_temp_directory = lambda: str(directories["temp"])
    return mod


def _model_management() -> types.ModuleType:
    mod = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    mod.InterruptProcessingException = InterruptProcessingException
    mod.interrupt_processing = False

    def interrupt_current_processing(value: bool = True) -> None:
        mod.interrupt_processing = value

    def processing_interrupted() -> bool:
        return mod.interrupt_processing

    def throw_exception_if_processing_interrupted() -> None:
        if mod.interrupt_processing:
            mod.interrupt_processing = False  # ComfyUI clears the flag as it raises
            raise InterruptProcessingException()

    mod.interrupt_current_processing = interrupt_current_processing
    mod.processing_interrupted = processing_interrupted
    mod.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mod.get_torch_device = lambda: torch.device("cpu")
    mod.memory_calls = []  # what the pack asked of ComfyUI's model management, in order
    mod.unload_all_models = lambda: mod.memory_calls.append("unload_all_models")
    mod.soft_empty_cache = lambda force=False: mod.memory_calls.append("soft_empty_cache")
    return mod


def _utils(host: FakeHost, model_management: types.ModuleType) -> types.ModuleType:
    mod = types.ModuleType("comfy.utils")

    def hook(value: int, total: int, preview: tuple | None, node_id: str | None = None) -> None:
        model_management.throw_exception_if_processing_interrupted()
        update = ProgressUpdate(value, total, preview, node_id or host.executing)
        host.updates.append(update)
        if host.on_update is not None:
            host.on_update(update)

    class ProgressBar:
        def __init__(self, total: int, node_id: str | None = None):
            self.total = total
            self.current = 0
            self.hook = mod.PROGRESS_BAR_HOOK
            self.node_id = node_id

        def update_absolute(self, value: int, total: int | None = None, preview: tuple | None = None) -> None:
            if total is not None:
                self.total = total
            value = min(value, self.total)
            self.current = value
            if self.hook is not None:
                self.hook(self.current, self.total, preview, node_id=self.node_id)

        def update(self, value: int) -> None:
            self.update_absolute(self.current + value)

    mod.PROGRESS_BAR_HOOK = hook
    mod.ProgressBar = ProgressBar
    return mod


def _server(host: FakeHost) -> types.ModuleType:
    mod = types.ModuleType("server")

    class PromptServer:
        instance: "PromptServer"
        client_id: str | None = "fake-client"
        last_node_id: str | None = None

        def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
            json_for_browser(data)
            host.messages.append((event, data))

    PromptServer.instance = PromptServer()
    mod.PromptServer = PromptServer
    return mod


def install(root: Path) -> FakeHost:
    host = FakeHost(Path(root))
    model_management = _model_management()
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so `import comfy.utils` resolves through sys.modules
    comfy.model_management = model_management
    comfy.utils = _utils(host, model_management)
    host.modules = {
        "folder_paths": _folder_paths(host),
        "comfy": comfy,
        "comfy.utils": comfy.utils,
        "comfy.model_management": model_management,
        "server": _server(host),
    }
    sys.modules.update(host.modules)
    return host


def uninstall(host: FakeHost) -> None:
    for name in HOST_MODULES:
        if sys.modules.get(name) is host.modules.get(name):
            del sys.modules[name]


def pack_module_name(root: Path = ROOT) -> str:
    """ComfyUI's sys.modules name for a custom-node folder: its full path with '.' -> '_x_'."""
    return str(root).replace(".", "_x_")


def import_pack(root: Path = ROOT) -> types.ModuleType:
    name = pack_module_name(root)
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unload_pack(root: Path = ROOT) -> None:
    name = pack_module_name(root)
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


@pytest.fixture
def comfy_host(tmp_path):
    host = install(tmp_path / "comfyui")
    try:
        yield host
    finally:
        uninstall(host)


@pytest.fixture
def comfy_pack(comfy_host):
    """The pack as ComfyUI imports it, against the fake host."""
    try:
        yield import_pack()
    finally:
        unload_pack()
