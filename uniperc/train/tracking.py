"""What a user sees of a run: a CSV tracker for Accelerate, flattened hyperparameters, the curve plot."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from accelerate.tracking import GeneralTracker


class CSVTracker(GeneralTracker):
    """Accelerate tracker writing ``metrics.csv`` rows ``step,name,value`` (long format: any metric, any step).

    Accelerate ships TensorBoard/W&B/... trackers but no plain-file one; this is the minimal
    ``GeneralTracker``. Appends, so a resumed run continues the same file.
    """

    name = "csv"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.csv"

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.write_text("step,name,value\n")

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        """Hyperparameters go to ``config.yaml`` in the run folder (written by the trainer), not the CSV."""

    def log(self, values: dict, step: int | None = None, **kwargs):
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for name, value in values.items():
                writer.writerow([step, name, value])


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"train/lr": 0.001, ...}`` with scalar values (TensorBoard's hparams need scalars)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = "none" if value is None else value
        else:
            out[name] = str(value)
    return out


def plot_curves(history: list[dict], path: str | Path, primary: dict[str, tuple[str, bool]]) -> Path:
    """Training loss per step and validation metrics per epoch -> one PNG; returns its path.

    ``history`` holds ``{"kind": "train", "step", "loss", "modality"}`` and
    ``{"kind": "val", "epoch", "step", "<modality>/<metric>": value}`` rows; ``primary`` maps a modality to
    its (metric name, higher is better).
    """
    from matplotlib.figure import Figure  # no pyplot: never switches a notebook's backend

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_val = fig.subplots(1, 2)
    train = [h for h in history if h["kind"] == "train"]
    for modality in sorted({h["modality"] for h in train}):
        rows = [h for h in train if h["modality"] == modality]
        ax_loss.plot([h["step"] for h in rows], [h["loss"] for h in rows], label=modality, lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    if any(math.isfinite(h["loss"]) and h["loss"] > 0 for h in train):
        ax_loss.set_yscale("log")
    if train:
        ax_loss.legend()
    val = [h for h in history if h["kind"] == "val"]
    for modality, (metric, _) in primary.items():
        key = f"{modality}/{metric}"
        rows = [h for h in val if key in h]
        if rows:
            ax_val.plot([h["epoch"] for h in rows], [h[key] for h in rows], marker="o", label=key)
    ax_val.set(xlabel="epoch", ylabel="validation metric", title="validation")
    if val:
        ax_val.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
