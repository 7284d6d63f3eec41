"""What a training run leaves on disk, read by the trainer and by evaluation, prediction and export alike.

``<output_dir>/``
    ``config.yaml``       the resolved config (:func:`uniperc.train.resolve`) of the run that wrote the folder;
    ``model_spec.json``   backbone name, its arguments and the per-modality task specs (rebuilds the model);
    ``checkpoints/step_<N>/``  Accelerate's ``save_state`` plus ``trainer_state.json`` and, written last, the
                          ``COMPLETE`` marker: a folder without it is never read;
    ``model/``            the deploy-form export (:mod:`uniperc.export`).

Only file names and their formats live here; writing checkpoints atomically is the trainer's job
(:mod:`uniperc.train.checkpoint`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CONFIG_FILE = "config.yaml"
MODEL_SPEC_FILE = "model_spec.json"
EXPORT_DIR = "model"
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder (it has the marker)."""
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_NAME.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or ``None``."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: str | Path) -> dict:
    """The trainer state (position, history, the run's config) stored in a complete checkpoint."""
    checkpoint = Path(checkpoint)
    if not is_checkpoint(checkpoint):
        raise ValueError(f"checkpoint {str(checkpoint)!r} is incomplete or not a checkpoint (no {MARKER} marker)")
    return json.loads((checkpoint / STATE_FILE).read_text())


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder that holds ``<run>/checkpoints/step_N``."""
    return Path(checkpoint).resolve().parent.parent


def read_config(output_dir: str | Path) -> dict | None:
    """A run folder's resolved ``config.yaml``, or ``None`` when it has none."""
    path = Path(output_dir) / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_model_spec(output_dir: str | Path) -> dict:
    """``model_spec.json`` of a run folder; ``ValueError`` naming the folder when it is missing."""
    path = Path(output_dir) / MODEL_SPEC_FILE
    if not path.is_file():
        raise ValueError(f"run folder {str(output_dir)!r} has no {MODEL_SPEC_FILE}")
    return json.loads(path.read_text())
