"""storage.py: atomic writes that leave nothing behind, normal permissions, damaged files named, no NaN written."""

from __future__ import annotations

import errno

import pytest
import torch

from dit_trainer.training.network.comfy_format import save_adapter
from dit_trainer.training import storage
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.storage import (
    NonFiniteError,
    StorageError,
    atomic_save_safetensors,
    atomic_write,
    read_safetensors,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"the previous version")

    def disk_full(temp):
        temp.write_bytes(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match=r"cannot write .*adapter.safetensors: the disk is full; pick another dir"):
        atomic_write(target, disk_full, "pick another dir")
    assert target.read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_written_files_get_the_permissions_of_any_new_file(tmp_path):
    path = atomic_save_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    # safetensors and mkstemp create 0600 files; the trainer's are 0666 minus the process umask.
    assert path.stat().st_mode & 0o777 == 0o666 & ~storage._UMASK != 0o600


@pytest.mark.parametrize("content, words", [
    (b"", "empty"),
    (b"\x80\x04\x95 pickled", "pickle renamed"),
    (b"PK\x03\x04zipped", "torch.save"),
    ((200).to_bytes(8, "little") + b'{"a":', "truncated"),
    (b"this is text, not tensors at all", "damaged or not a safetensors file"),
])
def test_damaged_files_are_named_with_what_is_wrong(tmp_path, content, words):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read adapter file .*model.safetensors: .*{words}"):
        read_safetensors(path, "adapter file")


def test_a_non_finite_adapter_is_never_written(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    network = LoRANetwork(model, "zimage", NetworkConfig(include_patterns=["0"], rank=2))
    with torch.no_grad():
        network.adapters[0].lora_B.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        save_adapter(network, tmp_path / "broken.safetensors")
    assert not list(tmp_path.iterdir())
