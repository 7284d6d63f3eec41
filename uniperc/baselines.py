"""Trivial baselines, reported beside every evaluation: a model is worth its margin over what needs no learning.

* classification: ``chance`` (top-1 = 100 / number of classes) and ``majority`` (top-1 of always answering the
  train split's most frequent class, measured on the evaluated split);
* regression (forecasting): ``climatology`` (every target value's mean over the train split: for a forecast,
  the mean field of each variable at each lead step) and, where the modality can read the last observed step
  from an input (:meth:`uniperc.modalities.base.Modality.last_step`, e.g. weather), ``persistence`` (that step
  repeated over the horizon). They are scored by :func:`uniperc.heads.task_metrics`, exactly like the model
  (MSE, RMSE, MAE, overall and per variable; masked NaN targets left out), on the same normalised targets.

Multi-label tasks have no baseline here.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

import uniperc.modalities as modalities

from .heads import task_metrics

BASELINES = {"classification": ("chance", "majority"), "regression": ("persistence", "climatology")}


def compute(data, splits: Iterable[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {baseline: metrics}}`` for one modality's :class:`~uniperc.data.TaskData`."""
    splits = list(splits)
    if data.task == "classification":
        train = np.asarray(_raw_labels(data.splits["train"]))
        majority = int(np.bincount(train, minlength=data.num_outputs).argmax())
        return {s: {"chance": {"top1": 100.0 / data.num_outputs},
                    "majority": {"top1": 100.0 * float(np.mean(np.asarray(_raw_labels(data.splits[s])) == majority))}}
                for s in splits}
    if data.task != "regression":
        return {s: {} for s in splits}
    m = modalities.get(data.name)
    climatology = m.climatology(data.splits["train"], data.adapter_config)
    if climatology is None:
        climatology = _nanmean_targets(data)
    out = {}
    for s in splits:
        persistence, labels = _persistence_and_labels(data, s)
        out[s] = {}
        if persistence is not None:
            out[s]["persistence"] = task_metrics("regression", persistence, labels, data.output_names)
        out[s]["climatology"] = task_metrics("regression", climatology.expand_as(labels), labels, data.output_names)
    return out


def describe(name: str, split: str, metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> str:
    """The model's headline numbers beside its baselines' (MSE and RMSE per variable, or top-1), one line each."""
    if not baselines:
        return f"{split} {name}: no baseline for this task"
    columns = [("model", metrics)] + list(baselines.items())
    if "top1" in metrics:
        return f"{split} {name} top-1: " + " | ".join(f"{label} {m['top1']:.2f}%" for label, m in columns)
    groups = [""] + sorted(k[len("mse/"):] for k in metrics if k.startswith("mse/"))
    lines = [f"{split} {name} vs baselines (MSE / RMSE, normalised units):"]
    for g in groups:
        suffix = f"/{g}" if g else ""
        lines.append(f"  {g or 'all':>10}: " + " | ".join(
            f"{label} {m['mse' + suffix]:.4g} / {m['rmse' + suffix]:.4g}" for label, m in columns))
    return "\n".join(lines)


def _raw_labels(split) -> list[int]:
    """Class labels straight from the table (no transform: decoding the inputs is not needed)."""
    return split.with_format(None)["label"]


def _eval_view(data, split: str):
    """The split with evaluation transforms (no augmentation), also for the train split."""
    from uniperc.modalities.base import ExampleTransform

    return data.splits[split].with_transform(ExampleTransform(data.name, data.adapter_config, train=False))


def _batches(data, split: str):
    from .data import make_loader

    return make_loader(_eval_view(data, split), 64, False, 0, 0)


def _nanmean_targets(data) -> torch.Tensor:
    """Mean of every target value over the train split, ignoring NaN; 0 (the normalised mean) where none is valid."""
    total = count = 0
    for batch in _batches(data, "train"):
        y = batch["labels"].double()
        valid = torch.isfinite(y)
        total = total + y.nan_to_num(0.0, 0.0, 0.0).sum(0)
        count = count + valid.sum(0)
    return (total / count.clamp(min=1)).float()[None]


def _persistence_and_labels(data, split: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    m = modalities.get(data.name)
    preds, labels = [], []
    for batch in _batches(data, split):
        preds.append(m.last_step(batch["inputs"], data.adapter_config))
        labels.append(batch["labels"].float())
    labels = torch.cat(labels)
    return (None if preds[0] is None else torch.cat(preds)), labels
