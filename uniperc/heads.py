"""Task heads: one prediction layer per task, with the loss and the metrics that task is judged by.

A :class:`TaskHead` *is* the backbone's classifier head (timm's ``NormMlpClassifierHead``: global pool ->
norm -> linear, same state-dict keys ``norm.*`` / ``fc.*`` as ``UniPercNet.head``), so a single-task
model's head drops into a plain timm model unchanged. On top it knows its task:

* ``classification``: cross-entropy with label smoothing; metrics top-1 and top-k (k = 5, or the number
  of classes when fewer) accuracy in percent.
* ``multilabel``: binary cross-entropy on logits; metric mAP (percent) = the mean over classes of
  scikit-learn's ``average_precision_score``, taken over the classes that have at least one positive in
  the evaluated set (AP is undefined without positives).
* ``regression`` (forecasting included): mean-squared error on the targets flattened to one vector per
  sample; metrics MSE and MAE overall and per target variable. ``output_names`` names either every output or
  the variables, whose outputs are then equal consecutive groups (a forecast of V variables x horizon x H x W
  flattened variable-major, as ``modalities.weather`` does).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, NormMlpClassifierHead

TASKS = ("classification", "multilabel", "regression")
# name of the metric that decides "best" and the summary line, and whether larger is better
PRIMARY_METRIC = {"classification": ("top1", True), "multilabel": ("mAP", True), "regression": ("mse", False)}


class TaskHead(NormMlpClassifierHead):
    """Pool -> norm -> linear head that also computes its task's loss, metrics and predictions.

    Args:
        in_features: channels of the backbone's last stage.
        num_outputs: classes (classification / multilabel) or regression targets.
        task: one of :data:`TASKS`.
        norm: ``"ln"`` (LayerNorm2d after pooling, as UniRepLKNet/UniConvNet) or ``None`` (VAN).
        label_smoothing: classification only, passed to ``F.cross_entropy``.
        output_names: class / target names, used to name per-variable regression metrics.
    """

    def __init__(self, in_features: int, num_outputs: int, task: str = "classification", norm: str | None = "ln",
                 drop_rate: float = 0.0, label_smoothing: float = 0.0, output_names: Sequence[str] | None = None,
                 init_scale: float = 1.0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if norm not in ("ln", None):
            raise ValueError(f"norm must be 'ln' or None, got {norm!r}")
        super().__init__(in_features, num_outputs, pool_type="avg", drop_rate=drop_rate,
                         norm_layer=LayerNorm2d if norm == "ln" else nn.Identity)
        self.task = task
        self.num_outputs = num_outputs
        self.label_smoothing = float(label_smoothing)
        self.output_names = list(output_names) if output_names is not None else [str(i) for i in range(num_outputs)]
        groups = len(self.output_names)
        if groups != num_outputs and not (task == "regression" and groups and num_outputs % groups == 0):
            raise ValueError(f"output_names has {groups} names for {num_outputs} outputs (regression may name "
                             f"variables whose outputs form equal consecutive groups)")
        # same initialisation as UniPercNet's head (trunc-normal 0.02, zero bias, optional head_init_scale)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        with torch.no_grad():
            self.fc.weight.mul_(init_scale)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task's training loss (computed in float32 even under autocast)."""
        logits = logits.float()
        if self.task == "classification":
            return F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)
        target = labels.float().reshape(logits.shape)
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(logits, target)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (softmax / sigmoid) for classification tasks, values for regression."""
        logits = logits.float()
        if self.task == "classification":
            return logits.softmax(-1)
        if self.task == "multilabel":
            return logits.sigmoid()
        return logits

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics over a whole evaluated set (call on gathered tensors); see the module docstring."""
        return task_metrics(self.task, logits, labels, self.output_names)


def task_metrics(task: str, logits: torch.Tensor, labels: torch.Tensor,
                 output_names: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics of ``task`` for ``logits`` (N x outputs) against ``labels`` (see the module docstring)."""
    logits = logits.detach().float().cpu()
    if logits.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty set")
    if task == "classification":
        labels = labels.detach().long().cpu().reshape(-1)
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == labels[:, None]
        return {"top1": 100.0 * hit[:, 0].float().mean().item(), f"top{k}": 100.0 * hit.any(1).float().mean().item()}
    if task == "multilabel":
        from sklearn.metrics import average_precision_score

        y = labels.detach().cpu().reshape(logits.shape).numpy() > 0.5
        scores = logits.sigmoid().numpy()
        present = y.any(0)
        if not present.any():
            raise ValueError("mAP is undefined: no class has a positive label in the evaluated set")
        ap = average_precision_score(y[:, present], scores[:, present], average=None)
        return {"mAP": 100.0 * float(np.mean(ap))}
    if task == "regression":
        y = labels.detach().float().cpu().reshape(logits.shape)
        err = logits - y
        out = {"mse": err.pow(2).mean().item(), "mae": err.abs().mean().item()}
        names = list(output_names) if output_names is not None else [str(i) for i in range(logits.shape[1])]
        per_var = err.reshape(err.shape[0], len(names), -1)  # variable-major groups, e.g. (v horizon h w)
        for i, name in enumerate(names):
            out[f"mse/{name}"] = per_var[:, i].pow(2).mean().item()
            out[f"mae/{name}"] = per_var[:, i].abs().mean().item()
        return out
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """``num_classes x num_classes`` counts, rows = true class, columns = predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    pred = logits.detach().float().argmax(1).cpu().numpy()
    return sk_confusion(labels.detach().long().cpu().numpy().reshape(-1), pred, labels=list(range(num_classes)))
