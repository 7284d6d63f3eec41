"""Crash-safe checkpoints on top of ``Accelerator.save_state`` / ``load_state`` (layout: :mod:`uniperc.runs`).

A checkpoint is first written to a hidden ``.tmp-step_<N>`` folder, every file is fsynced, the ``COMPLETE``
marker is written last, then the folder is renamed into place and the parent fsynced: a SIGKILL at any moment
leaves either no ``step_<N>`` or a complete one. Only folders with the marker are ever read, so a half-written
checkpoint is never picked up; leftovers are removed by the next save.

A fresh start in a folder that holds checkpoints first moves them aside (:func:`set_aside`) and deletes them
only once the new run has written its own first complete checkpoint (:func:`save` does it): a run that fails
before then leaves the old checkpoints untouched in ``checkpoints.previous/``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..runs import MARKER, STATE_FILE, checkpoint_dir, checkpoint_name, complete_checkpoints, read_trainer_state

SET_ASIDE = "checkpoints.previous"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(output_dir: str | Path) -> Path | None:
    """Rename ``checkpoints/`` to ``checkpoints.previous/`` (one atomic rename) before a fresh start.

    Nothing is deleted here. When ``checkpoints/`` holds no complete checkpoint it is left alone (an earlier
    fresh start died before its first checkpoint: what it set aside is still the newest complete work).
    """
    output_dir = Path(output_dir)
    if not complete_checkpoints(output_dir):
        return None
    aside = output_dir / SET_ASIDE
    if aside.exists():  # older than the complete checkpoints about to be set aside
        shutil.rmtree(aside)
    os.rename(checkpoint_dir(output_dir), aside)
    _fsync_dir(output_dir)
    return aside


def save(accelerator, output_dir: str | Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (collective: every process must call it); returns its path.

    Once it is in place, checkpoints beyond the newest ``keep`` and any set-aside folder are removed.
    """
    output_dir = Path(output_dir)
    root = checkpoint_dir(output_dir)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state))
        _fsync_tree(tmp)
        with open(tmp / MARKER, "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. end of a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(output_dir / SET_ASIDE, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str | Path) -> dict:
    """Restore Accelerate's state from a complete checkpoint; returns its trainer state."""
    state = read_trainer_state(path)
    accelerator.load_state(str(path))
    return state
