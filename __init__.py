"""comfyui-dit-trainer: LoRA / DoRA training for diffusion transformers inside ComfyUI.

ComfyUI imports this folder under a path-derived module name; the engine
(`training/`, `kernels/`) never imports ComfyUI, so the same package also runs
headless as `dit_trainer` (CLI, tests).
"""

try:  # present only when ComfyUI is the host
    import folder_paths  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
