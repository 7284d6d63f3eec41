"""Trivial baselines, reported beside every evaluation: a model is worth its margin over what needs no learning.

* classification: ``chance`` (top-1 = 100 / number of classes) and ``majority`` (top-1 of always answering the
  train split's most frequent class, measured on the evaluated split);
* regression (forecasting): ``climatology`` (every target value's mean over the train split: for a forecast,
  the mean field of each variable at each lead step) and, where the modality can read the last observed step
  from an input (:meth:`uniperc.modalities.base.Modality.last_step`, e.g. weather), ``persistence`` (that step
  repeated over the horizon). They are scored by the regression task's metrics, exactly like the model
  (MSE, RMSE, MAE, overall and per variable; masked NaN targets left out), on the same normalised targets.

Each task names its baselines (:meth:`uniperc.tasks.Task.trivial_baselines`); multi-label tasks have none.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

import uniperc.modalities as modalities

from .tasks import get_task


def compute(data, splits: Iterable[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {baseline: metrics}}`` for one modality's :class:`~uniperc.data.TaskData` (its task says which)."""
    return get_task(data.task).trivial_baselines(data, list(splits))


def chance_and_majority(data, splits: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Classification's baselines: top-1 of guessing, and of always answering the train split's commonest class."""
    train = np.asarray(_raw_labels(data.splits["train"]))
    majority = int(np.bincount(train, minlength=data.num_outputs).argmax())
    return {s: {"chance": {"top1": 100.0 / data.num_outputs},
                "majority": {"top1": 100.0 * float(np.mean(np.asarray(_raw_labels(data.splits[s])) == majority))}}
            for s in splits}


def persistence_and_climatology(data, splits: list[str], task) -> dict[str, dict[str, dict[str, float]]]:
    """Regression's baselines, scored by ``task``'s own metrics, as the model is (persistence only where the
    modality can read the last observed step from an input)."""
    climatology = modalities.get(data.name).climatology(data.splits["train"], data.adapter_config)
    if climatology is None:
        climatology = _nanmean_targets(data)
    out = {}
    for s in splits:
        persistence, labels = _persistence_and_labels(data, s)
        out[s] = {}
        if persistence is not None:
            out[s]["persistence"] = task.metrics(persistence, labels, data.output_names)
        out[s]["climatology"] = task.metrics(climatology.expand_as(labels), labels, data.output_names)
    return out


def describe(name: str, split: str, metrics: dict[str, float], baselines: dict[str, dict[str, float]],
             task: str) -> str:
    """The model's headline numbers beside its baselines', as ``task`` prints them (top-1, or MSE and RMSE per
    variable)."""
    if not baselines:
        return f"{split} {name}: no baseline for this task"
    return get_task(task).baseline_summary(f"{split} {name}", [("model", metrics)] + list(baselines.items()))


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
