"""The pack imports the way ComfyUI imports it, and the engine never imports ComfyUI."""

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "latent_preview", "nodes"}


def test_pack_imports_under_a_path_derived_module_name():
    # ComfyUI: sys.modules name = the folder's full path with '.' replaced by '_x_'.
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert module.WEB_DIRECTORY == "./web"
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        engine = importlib.import_module(f"{name}.training.models.zimage")  # relative imports resolve
        assert engine.ZImageDiT.architecture == "zimage"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_engine_and_kernels_never_import_comfyui():
    offenders = []
    for folder in ("training", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert not offenders, offenders
