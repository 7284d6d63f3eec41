"""Task heads: one prediction layer per task, with the loss and the metrics that task is judged by.

Two kinds of head share the task logic (:class:`TaskMixin`): the pooled :class:`TaskHead` for classification
and scalar regression, and the :class:`DenseHead` for targets that are fields (weather forecasts), which
predicts every grid point from the backbone's multi-scale features.

A :class:`TaskHead` *is* the backbone's classifier head (timm's ``NormMlpClassifierHead``: global pool ->
norm -> linear, same state-dict keys ``norm.*`` / ``fc.*`` as ``UniPercNet.head``), so a single-task
model's head drops into a plain timm model unchanged. On top it knows its task:

* ``classification``: cross-entropy with label smoothing; metrics top-1 and top-k (k = 5, or the number
  of classes when fewer) accuracy in percent.
* ``multilabel``: binary cross-entropy on logits; metric mAP (percent) = the mean over classes of
  scikit-learn's ``average_precision_score``, taken over the classes that have at least one positive in
  the evaluated set (AP is undefined without positives).
* ``regression`` (forecasting included): mean-squared error on the targets flattened to one vector per
  sample; metrics MSE, RMSE and MAE overall and per target variable. ``output_names`` names either every
  output or the variables, whose outputs are then equal consecutive groups (a forecast of V variables x
  horizon x H x W flattened variable-major, as ``uniperc.modalities.weather`` does). Targets may be NaN (masked grid
  points, ``uniperc.modalities.weather``'s ``nan_policy="mask"``): those points count neither in the loss nor in the
  metrics.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import ConvNormAct, LayerNorm2d, NormMlpClassifierHead

TASKS = ("classification", "multilabel", "regression")
# name of the metric that decides "best" and the summary line, and whether larger is better
PRIMARY_METRIC = {"classification": ("top1", True), "multilabel": ("mAP", True), "regression": ("mse", False)}
HEADS = ("pooled", "dense")


class TaskMixin:
    """Task, output names, loss, predictions and metrics: what every head kind shares."""

    def _set_task(self, task: str, num_outputs: int, label_smoothing: float, output_names: Sequence[str] | None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.task = task
        self.num_outputs = num_outputs
        self.label_smoothing = float(label_smoothing)
        self.output_names = list(output_names) if output_names is not None else [str(i) for i in range(num_outputs)]
        groups = len(self.output_names)
        if groups != num_outputs and not (task == "regression" and groups and num_outputs % groups == 0):
            raise ValueError(f"output_names has {groups} names for {num_outputs} outputs (regression may name "
                             f"variables whose outputs form equal consecutive groups)")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task's training loss (computed in float32 even under autocast); NaN regression targets are skipped."""
        logits = logits.float()
        if self.task == "classification":
            return F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)
        target = labels.float().reshape(logits.shape)
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, target)
        valid = torch.isfinite(target)
        # mean over the valid points only; a batch with none gives 0 (and zero gradients), not NaN
        err = torch.where(valid, logits - target.nan_to_num(0.0, 0.0, 0.0), 0.0)
        return err.pow(2).sum() / valid.sum().clamp(min=1)

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


class TaskHead(TaskMixin, NormMlpClassifierHead):
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
        if norm not in ("ln", None):
            raise ValueError(f"norm must be 'ln' or None, got {norm!r}")
        super().__init__(in_features, num_outputs, pool_type="avg", drop_rate=drop_rate,
                         norm_layer=LayerNorm2d if norm == "ln" else nn.Identity)
        self._set_task(task, num_outputs, label_smoothing, output_names)
        # same initialisation as UniPercNet's head (trunc-normal 0.02, zero bias, optional head_init_scale)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        with torch.no_grad():
            self.fc.weight.mul_(init_scale)


class DenseHead(TaskMixin, nn.Module):
    """Per-pixel regression of a field target from the stage outputs (an FPN decoder with a full-resolution skip).

    A pooled head squeezes the whole field through one vector, so it can only reproduce a few global patterns;
    this head keeps the spatial layout: each stage's map is projected to ``dim`` channels (1x1), merged top-down
    (bilinear upsampling to the next finer stage, sum, 3x3 conv-BN-GELU), upsampled to the target's native grid
    and fused with a 3x3 projection of the input itself (the stride-1 skip, which carries the detail the
    stride-4 stem loses). Sizes follow the feature maps, so odd grids work.

    ``residual_channels`` (one input channel per target channel, e.g. the last observed step of each variable):
    the output is that input plus the decoder's correction, i.e. the head learns the change from persistence.
    The last layer starts at zero, so an untrained residual head forecasts persistence exactly.

    The output is flattened ``B x (C * H * W)``, channel-major, the layout of the regression targets.
    """

    def __init__(self, feature_dims: Sequence[int], in_chans: int, target_shape: Sequence[int],
                 residual_channels: Sequence[int] | None = None, dim: int | None = None,
                 output_names: Sequence[str] | None = None):
        super().__init__()
        c, h, w = (int(v) for v in target_shape)
        self._set_task("regression", c * h * w, 0.0, output_names)
        if residual_channels is not None:
            if len(residual_channels) != c or not all(0 <= int(i) < in_chans for i in residual_channels):
                raise ValueError(f"residual_channels must give one input channel (0..{in_chans - 1}) per target "
                                 f"channel ({c}), got {list(residual_channels)}")
            self.register_buffer("residual_index", torch.tensor([int(i) for i in residual_channels]),
                                 persistent=False)
        else:
            self.residual_index = None
        self.target_shape = (c, h, w)
        dim = int(dim or feature_dims[0])
        self.lateral = nn.ModuleList(nn.Conv2d(d, dim, 1) for d in feature_dims)
        self.smooth = nn.ModuleList(ConvNormAct(dim, dim, 3, act_layer="gelu") for _ in feature_dims[:-1])
        self.input_proj = ConvNormAct(in_chans, dim, 3, act_layer="gelu")
        self.fuse = ConvNormAct(2 * dim, dim, 3, act_layer="gelu")
        self.out = nn.Conv2d(dim, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        p = self.lateral[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            p = F.interpolate(p, size=features[i].shape[-2:], mode="bilinear", align_corners=False)
            p = self.smooth[i](p + self.lateral[i](features[i]))
        grid = self.target_shape[1:]
        p = F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
        if tuple(x.shape[-2:]) != grid:  # the adapter resized the input (weather's image_size)
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        y = self.out(self.fuse(torch.cat([p, self.input_proj(x)], 1)))
        if self.residual_index is not None:
            y = y + x[:, self.residual_index]
        return rearrange(y, "b c h w -> b (c h w)")


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
        valid = torch.isfinite(y)
        if not valid.any():
            raise ValueError("regression metrics are undefined: every target in the evaluated set is masked (NaN)")
        err = torch.where(valid, logits - y.nan_to_num(0.0, 0.0, 0.0), 0.0)
        names = list(output_names) if output_names is not None else [str(i) for i in range(logits.shape[1])]
        # variable-major groups, e.g. (v horizon h w); each statistic is a mean over the valid points only
        groups = [("", err, valid)] + [(f"/{name}", e, v) for name, e, v in zip(
            names, err.reshape(err.shape[0], len(names), -1).unbind(1), valid.reshape(err.shape[0], len(names), -1).unbind(1))]
        out = {}
        for suffix, e, v in groups:
            n = v.sum().clamp(min=1)
            mse = (e.pow(2).sum() / n).item()
            out.update({f"mse{suffix}": mse, f"rmse{suffix}": mse ** 0.5, f"mae{suffix}": (e.abs().sum() / n).item()})
        return out
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """``num_classes x num_classes`` counts, rows = true class, columns = predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    pred = logits.detach().float().argmax(1).cpu().numpy()
    return sk_confusion(labels.detach().long().cpu().numpy().reshape(-1), pred, labels=list(range(num_classes)))
