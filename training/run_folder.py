"""A run's folder: when it is continued, moved aside or refused, and who may write into it.

    <dir>/<name>/
        dit_trainer_run.json      run id, fingerprint of the settings (run_settings.py), the settings
        checkpoints/step_NNNNNN/  resumable checkpoints (checkpoint.py)
        samples/                  preview images, loss.png
    <dir>/.<name>.lock            held while a process trains into the run

`prepare_run` (TrainLoRA, `dit-trainer train`): a run whose fingerprint equals the
current settings continues from its newest checkpoint (a finished run returns at
once). A run with other settings, or any run when `resume` is off, is moved aside to
`<name>.replaced-<time>/`: nothing is deleted and checkpoints of two runs never mix in
one folder. `dit-trainer resume` never moves anything: the engine refuses settings
that differ (run_settings.resume_changes).

`run_lock` is an OS file lock (flock / msvcrt), so it is released when its process
dies however it dies, and a stale lock file never blocks anyone; a second process on
the same run is refused with the holder's pid, host and start time.

Every run has a random id, recorded here and in the metadata of every adapter it
writes: a file whose id differs was not written by this run (`written_by`), so it is
never replaced, and EMA merges refuse checkpoints of different runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .checkpoint import ema_twin, resumable_checkpoints
from .run_settings import fingerprint as settings_fingerprint
from .storage import OUTPUT_FIX, atomic_write, make_dir, os_errors, read_metadata

log = logging.getLogger(__name__)

RECORD = "dit_trainer_run.json"
RUN_ID_KEY = "dit_trainer_run_id"  # adapter metadata key


class RunLocked(RuntimeError):
    """Another process trains into this run folder."""


@dataclass(frozen=True)
class PreparedRun:
    run_dir: Path
    run_id: str
    continuing: bool  # True: resume from the newest checkpoint
    moved_aside: Path | None = None  # where an earlier run went


def read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return {}


def _lock_file(handle) -> bool:
    """Try to take an exclusive lock on an open file; False when another holder has it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, option: str) -> Iterator[None]:
    """Hold `<parent>/.<name>.lock` for the block; `option` names what picks another run (for the message)."""
    run_dir = Path(run_dir)
    path = make_dir(run_dir.parent, OUTPUT_FIX) / f".{run_dir.name}.lock"
    with os_errors("lock the run folder with", path, OUTPUT_FIX):
        handle = open(path, "a+", encoding="utf-8")
    try:
        if not _lock_file(handle):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunLocked(
                f"run folder {run_dir} is in use by another training process ({holder}); wait for it to finish, "
                f"stop it, or pick another {option}"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def _move_aside(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    with os_errors("move the earlier run aside from", run_dir, OUTPUT_FIX):
        os.replace(run_dir, aside)
    return aside


def prepare_run(run_dir: str | os.PathLike, settings: dict, resume: bool, about: dict | None = None) -> PreparedRun:
    """Make `run_dir` ready for a run with these settings (run_settings.py); call it while holding `run_lock`.
    `about` is recorded beside them for people (dataset summary, base model name)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    fingerprint = settings_fingerprint(settings)
    continuing = resume and bool(resumable_checkpoints(run_dir)) and record.get("fingerprint") == fingerprint
    moved = None
    if not continuing and run_dir.exists() and any(run_dir.iterdir()):
        moved = _move_aside(run_dir)
        why = "it had other settings" if resume else "resume is off"
        log.warning("the earlier run in %s was moved to %s (%s); nothing was deleted", run_dir, moved, why)
    run_id = record.get("run_id") if continuing else None
    return record_run(run_dir, run_id, settings, about, continuing, moved)


def record_run(run_dir: Path, run_id: str | None, settings: dict, about: dict | None, continuing: bool,
               moved_aside: Path | None = None) -> PreparedRun:
    """Write the run's record (a new run id when `run_id` is empty) and describe the prepared run."""
    run_id = run_id or secrets.token_hex(8)
    make_dir(run_dir, OUTPUT_FIX)
    record = {"run_id": run_id, "fingerprint": settings_fingerprint(settings), "settings": settings,
              "about": about or {}}
    payload = json.dumps(record, indent=1, default=str)
    atomic_write(run_dir / RECORD, lambda temp: temp.write_text(payload, encoding="utf-8"), OUTPUT_FIX)
    return PreparedRun(run_dir, run_id, continuing, moved_aside)


def written_by(path: Path, run_id: str) -> bool:
    """True when `path` is an adapter this run wrote (its metadata carries the run id)."""
    try:
        return read_metadata(path, "adapter file").get(RUN_ID_KEY) == run_id
    except (ValueError, OSError):
        return False


def free_adapter_path(folder: Path, stem: str, run_id: str, ema: bool = False) -> Path:
    """`folder/<stem>.safetensors`, or `<stem>_2`, `<stem>_3`, ... : the first name whose files (the adapter,
    and with `ema` its EMA twin) are absent or were written by this run. A file someone else made is never
    replaced."""
    n = 1
    while True:
        adapter = folder / f"{stem if n == 1 else f'{stem}_{n}'}.safetensors"
        paths = [adapter, ema_twin(adapter)] if ema else [adapter]
        if all(not p.exists() or written_by(p, run_id) for p in paths):
            if n > 1:
                log.warning("%s exists and was not written by this run; saving as %s instead (it stays untouched)",
                            folder / f"{stem}.safetensors", paths[0].name)
            return paths[0]
        n += 1
