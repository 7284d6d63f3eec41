"""The :class:`Task` interface: everything that depends on what a head's outputs mean.

Outputs are ``N x num_outputs`` (a dense head's field flattened channel-major, see
:class:`~uniperc.heads.DenseHead`); labels are what the modality's adapter yields for a batch. A task is
stateless: the per-head settings (label smoothing, output names) come in as arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


class Task:
    """Base class of every task; a subclass is registered with :func:`~uniperc.tasks.register_task`.

    Class attributes:
        name: the registered name (set by the decorator), stored in specs, checkpoints and ``metrics.json``.
        primary_metric: the metric of :meth:`metrics` that the summary lines, curves and results table report.
        higher_is_better: whether a larger ``primary_metric`` is better.
        unit: printed after the primary metric (``"%"``, or ``""``).
        heads: the head kinds (:data:`uniperc.heads.HEADS`) that can predict this task: ``"pooled"`` reads the
            pooled last-stage vector, ``"dense"`` decodes the multi-scale feature maps into a field.
        grouped_outputs: ``output_names`` may name equal consecutive groups of outputs (variables of a field)
            instead of every output.
        class_outputs: one output per named class (the results table's "classes" column).
        supports_mixup: the loss is linear in the target (cross-entropy, binary cross-entropy), so mixup's blend of
            two samples' losses is the loss of their blended target (``modalities.<m>.mixup``).
    """

    name: str = ""
    primary_metric: str = ""
    higher_is_better: bool = True
    unit: str = ""
    heads: tuple[str, ...] = ("pooled",)
    grouped_outputs: bool = False
    class_outputs: bool = False
    supports_mixup: bool = False

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The training loss of a batch (``outputs`` in float32: the head casts them even under autocast)."""
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the outputs predict (probabilities, values), same shape as ``outputs``."""
        return outputs.float()

    def labels_from(self, outputs: torch.Tensor) -> torch.Tensor:
        """The labels ``outputs`` predict, in the adapter's label format: what a perfect model is scored against
        (the contract tests in ``tests/test_tasks.py`` train and score every registered task on them)."""
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, labels: torch.Tensor,
                output_names: Sequence[str] | None = None) -> dict[str, float]:
        """Metrics over a whole evaluated set (gathered outputs, not batch means); holds :attr:`primary_metric`."""
        raise NotImplementedError

    def postprocess(self, prediction: torch.Tensor, output_names: Sequence[str], top_k: int = 3) -> dict:
        """``uniperc.predict``'s JSON-able fields for one sample's :meth:`predict` vector."""
        raise NotImplementedError

    def format_prediction(self, result: dict) -> str:
        """One line of ``uniperc.predict``'s text output from the fields :meth:`postprocess` made."""
        raise NotImplementedError

    def trivial_baselines(self, data, splits: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
        """``{split: {baseline: metrics}}`` of what needs no learning (:mod:`uniperc.baselines`); none by default."""
        return {s: {} for s in splits}

    def baseline_summary(self, title: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """``title``, then the primary metric of each ``(label, metrics)`` column (the model, its baselines)."""
        key = self.primary_metric
        return f"{title} {key}: " + " | ".join(f"{label} {m[key]:.4g}{self.unit}" for label, m in columns if key in m)

    def did_not_learn(self, metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> str | None:
        """Why ``metrics`` show a model that learnt nothing (compared with ``baselines``), or ``None``."""
        return None

    def report(self, outputs: torch.Tensor, labels: torch.Tensor, output_names: Sequence[str],
               metrics: dict[str, float], out_dir: Path, name: str, split: str) -> dict:
        """Extra JSON-able entries of ``uniperc.evaluate``'s report, writing any figure into ``out_dir``."""
        return {}


def detached_scores(outputs: torch.Tensor) -> torch.Tensor:
    """``outputs`` detached, float32, on the CPU, for metrics; ``ValueError`` on an empty set."""
    if outputs.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty set")
    return outputs.detach().float().cpu()
