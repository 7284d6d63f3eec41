"""Crash-safe checkpoints on top of ``Accelerator.save_state`` / ``load_state``.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``: Accelerate's state (model, optimizer, RNG of every
process, registered objects such as the LR scheduler and EMA), plus ``trainer_state.json`` (epoch, position
in the epoch, history) and, written last, the ``COMPLETE`` marker. It is first written to a hidden
``.tmp-step_<N>`` folder, every file is fsynced, then the folder is renamed into place and the parent fsynced:
a SIGKILL at any moment leaves either no ``step_<N>`` or a complete one. :func:`latest` only considers folders
with the marker, so a half-written checkpoint is never picked up; leftovers are removed by the next save.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")


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


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or ``None``."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def save(accelerator, output_dir: str | Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (collective: every process must call it); returns its path."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
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
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str | Path) -> dict:
    """Restore Accelerate's state from a complete checkpoint; returns its trainer state."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete or not a checkpoint (no {MARKER} marker)")
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
