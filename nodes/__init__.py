"""ComfyUI node classes: the only code in the pack that imports ComfyUI modules."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
