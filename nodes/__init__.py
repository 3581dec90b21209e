"""ComfyUI node classes: the only code in the pack that imports ComfyUI modules (through host.py)."""

from ..training.signals import install_host_handlers
from .build_lora_network import BuildLoRANetwork
from .dataset_from_folder import DatasetFromFolder
from .ema_merge import EMAMerge
from .load_dit import LoadDiT
from .sample_with_lora import SampleWithLoRA
from .train_lora import TrainLoRA
from .weighted_mask import WeightedMask

# Node id (the web extension matches "TrainLoRA") -> (class, display name), in graph order.
NODES = {
    "LoadDiT": (LoadDiT, "Load DiT (trainer)"),
    "BuildLoRANetwork": (BuildLoRANetwork, "Build LoRA / DoRA Network"),
    "DatasetFromFolder": (DatasetFromFolder, "Dataset From Folder"),
    "WeightedMask": (WeightedMask, "Weighted Mask (loss)"),
    "TrainLoRA": (TrainLoRA, "Train LoRA / DoRA"),
    "SampleWithLoRA": (SampleWithLoRA, "Sample With LoRA"),
    "EMAMerge": (EMAMerge, "EMA Merge (post-hoc)"),
}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}

# ComfyUI imports packs on its main thread and trains on a worker thread: from here on, SIGTERM
# (docker stop) and Ctrl-C of the server first let a running TrainLoRA save its checkpoint.
install_host_handlers()
