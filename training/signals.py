"""Stopping a run on Ctrl-C / SIGTERM without losing it.

Python delivers signals to the main thread only. Three pieces use that:

* `active_run()`: every `train()` registers itself for its duration, so a stop request
  (`request_stop`) reaches it wherever it runs: the loop polls `stop_requested()` after
  each step, then writes a checkpoint and returns early.
* `graceful_stop()` (the CLI, training on the main thread): the first Ctrl-C or SIGTERM
  (docker stop, preemption, a cluster scheduler) is such a stop request; a second
  Ctrl-C stops at once with KeyboardInterrupt, which the loop answers with a checkpoint
  of the last complete step.
* `protected()`: the checkpoint write itself cannot be cut short. On the main thread,
  SIGINT / SIGTERM arriving while it runs are held and delivered right after it.
* `install_host_handlers()` (a host that trains on a worker thread, i.e. ComfyUI,
  called once at import on its main thread): SIGTERM and SIGINT first ask a running
  training to stop and wait up to `HOST_SAVE_TIMEOUT_S` for its checkpoint, then go on
  to the handler that was there before (so the server still stops as it always did).
  With no training running they go straight to that handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HOST_SAVE_TIMEOUT_S = 300.0  # how long a host's SIGTERM waits for a running training's checkpoint

_lock = threading.Condition()
_active = 0  # train() calls running
_stop_reason: str | None = None


@contextlib.contextmanager
def active_run() -> Iterator[None]:
    """Mark a training run as running (see the module docstring); a stale stop request is dropped first."""
    global _active, _stop_reason
    with _lock:
        if _active == 0:
            _stop_reason = None
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            _lock.notify_all()


def request_stop(reason: str) -> bool:
    """Ask running trainings to stop after their current step; True if one is running."""
    global _stop_reason
    with _lock:
        if _active:
            _stop_reason = reason
        return _active > 0


def stop_requested() -> str | None:
    """The reason of a pending stop request ("SIGTERM", "Ctrl-C"), or None."""
    return _stop_reason


def wait_until_idle(timeout: float) -> bool:
    """Wait for running trainings to return; False on timeout."""
    with _lock:
        return _lock.wait_for(lambda: _active == 0, timeout)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """CLI: the first Ctrl-C / SIGTERM stops after the current step (with a checkpoint), a second Ctrl-C at once."""
    if not _on_main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        if stop_requested() is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if request_stop(_name(signum)):
            log.warning("%s: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
                        _name(signum))
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def protected() -> Iterator[None]:
    """Hold SIGINT / SIGTERM while the block runs (main thread), then deliver them."""
    if not _on_main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for signum in dict.fromkeys(held):
            log.warning("%s arrived while a checkpoint was written; it was finished first", _name(signum))
            signal.raise_signal(signum)


def _chain(previous, signum: int, frame) -> None:
    """Hand a signal to the handler that was installed before ours."""
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install_host_handlers(timeout: float = HOST_SAVE_TIMEOUT_S) -> bool:
    """See the module docstring; False (and nothing installed) off the main thread or when already installed."""
    if not _on_main_thread():
        return False
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    if any(getattr(h, "dit_trainer_host_handler", False) for h in previous.values()):
        return False  # the pack was imported again (a reload): one layer is enough

    def handler(signum: int, frame) -> None:
        if stop_requested() is None and request_stop(_name(signum)):
            log.warning("%s: asking the running training to save a checkpoint before the server stops",
                        _name(signum))
            if not wait_until_idle(timeout):
                log.error("the training did not stop within %.0f s; stopping anyway", timeout)
        _chain(previous[signum], signum, frame)

    handler.dit_trainer_host_handler = True
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    return True
