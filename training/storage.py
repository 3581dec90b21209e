"""Files the trainer reads and writes: safetensors only, atomic writes, errors that say what to do.

Writing: everything goes through `atomic_write`. The bytes go to a temp file in the
target's folder, which is renamed over the target only once complete, so a crash, a
full disk or Ctrl-C never leaves half a file under the real name, and the temp file is
removed when the write fails. Written files and folders get the permissions of any new
file (0666 / 0777 minus the umask, usually 0644 / 0755), not the owner-only 0600 / 0700
of Python's temp-file helpers.

Reading: `open_safetensors` / `read_safetensors` never unpickle, and say what is wrong
with a damaged file: empty, truncated, a pickle or torch.save zip renamed to
.safetensors, or not safetensors at all.

OS failures become `StorageError`, which names the file, what was being done, the
reason in words (disk full, read-only, a folder where a file should be) and the option
that moves the file elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "a folder is in the way",
    errno.ENOTDIR: "a file is in the way where a folder is needed",
    errno.ENAMETOOLONG: "the path is too long",
}


# Where a run's files go, in words for both callers of the engine.
OUTPUT_FIX = ("free some space or make the folder writable, or write the run elsewhere ([output] dir in a TOML "
              "config; ComfyUI's --output-directory for TrainLoRA)")


class StorageError(OSError):
    """A file the trainer needs could not be read or written; the message says what to change."""


class NonFiniteError(FloatingPointError):
    """Tensors hold NaN or infinity where a file or a run needs finite numbers."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def reason(error: OSError) -> str:
    return _REASONS.get(error.errno, error.strerror or str(error))


def storage_error(error: OSError, doing: str, path: str | os.PathLike, fix: str = "") -> StorageError:
    text = f"cannot {doing} {path}: {reason(error)}"
    return StorageError(error.errno, text + (f"; {fix}" if fix else ""))


@contextlib.contextmanager
def os_errors(doing: str, path: str | os.PathLike, fix: str = "") -> Iterator[None]:
    """Turn an OSError raised inside into a StorageError that names `path` and the fix."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        raise storage_error(error, doing, path, fix) from error


def make_dir(path: str | os.PathLike, fix: str = "") -> Path:
    path = Path(path)
    with os_errors("create the folder", path, fix):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path))
        path.mkdir(parents=True, exist_ok=True)
    return path


def give_normal_permissions(path: str | os.PathLike) -> None:
    """0666 minus the umask (safetensors and mkstemp create files readable by their owner only)."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], fix: str = "") -> Path:
    """Call `write(temp_path)`, then move the result to `path`; on any failure nothing is left behind."""
    path = Path(path)
    make_dir(path.parent, fix)
    with os_errors("write", path, fix):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            write(Path(temp))
            give_normal_permissions(temp)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    return path


def staging_dir(parent: str | os.PathLike, prefix: str, fix: str = "") -> Path:
    """A new temp folder inside `parent` (for a checkpoint assembled before it is renamed into place)."""
    make_dir(parent, fix)
    with os_errors("create a temp folder in", parent, fix):
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        os.chmod(folder, 0o777 & ~_UMASK)
    return folder


def replace_dir(staged: Path, target: Path, fix: str = "") -> Path:
    """Move a completed staging folder to `target`, replacing an older folder of that name."""
    with os_errors("move a checkpoint into", target, fix):
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def finite_or_raise(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse tensors with NaN / inf, naming a few of the keys."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"{what} holds NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[:3]}")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None, fix: str = ""
) -> Path:
    """Write a safetensors file atomically (see `atomic_write`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata), fix)


def _damage(path: Path, error: Exception) -> str:
    """Why `path` is not a readable safetensors file, in words."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
        size = path.stat().st_size
    except OSError as os_error:
        return reason(os_error)
    if size == 0:
        return "the file is empty (0 bytes); it was not written completely, copy it again"
    if head[:1] == b"\x80":
        return "it is a Python pickle renamed to .safetensors; convert the original with safetensors.torch.save_file"
    if head[:4] == b"PK\x03\x04":
        return ("it is a torch.save (zip / pickle) checkpoint renamed to .safetensors; convert the original with "
                "safetensors.torch.save_file")
    header = int.from_bytes(head, "little") if len(head) == 8 else -1
    if 0 < header and header + 8 > size and header < 100_000_000:
        return f"it is truncated ({size} bytes, its header alone needs {header + 8}); copy or download it again"
    if "not fully covered" in str(error):
        return f"it is truncated ({size} bytes, shorter than its tensors need); copy or download it again"
    return f"it is damaged or not a safetensors file ({error})"


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, what: str = "file") -> Iterator:
    """`safe_open(path)` on the CPU, with errors that name the file and what is wrong with it."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to load {what} {path}: {path.suffix} files are Python pickles, which can run code when "
            "opened; convert it to .safetensors first (safetensors.torch.save_file)"
        )
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{what} {path} is not a .safetensors file; only safetensors files are read")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {what} {path}: {_damage(path, error)}") from None
    with handle:
        yield handle


def read_metadata(path: str | os.PathLike, what: str = "file") -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    with open_safetensors(path, what) as handle:
        return dict(handle.metadata() or {})


def read_safetensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    with open_safetensors(path, what) as handle:
        try:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except SafetensorError as error:
            raise ValueError(f"cannot read {what} {path}: {_damage(Path(path), error)}") from None
