"""Task heads: one prediction layer per task, with the loss, predictions and metrics of its task.

Two kinds of head (:data:`HEADS`) share the task logic (:class:`TaskMixin`): the pooled :class:`TaskHead`,
which reads the pooled last-stage vector (classification, scalar regression), and the :class:`DenseHead` for
targets that are fields (weather forecasts), which decodes the backbone's multi-scale feature maps into a
prediction at every grid point. Which kinds can predict a task is the task's ``heads``.

A :class:`TaskHead` *is* the backbone's classifier head (timm's ``NormMlpClassifierHead``: global pool ->
norm -> linear, same state-dict keys ``norm.*`` / ``fc.*`` as ``UniPercNet.head``), so a single-task
model's head drops into a plain timm model unchanged. On top it knows its task, a
:class:`~uniperc.tasks.Task` from the registry (:func:`uniperc.tasks.list_tasks`), which defines the loss, the
predictions and the metrics (see ``uniperc/tasks/<name>.py``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import ConvNormAct, LayerNorm2d, NormMlpClassifierHead

from .tasks import get_task

HEADS = ("pooled", "dense")


class TaskMixin:
    """Task, output names, loss, predictions and metrics: what every head kind shares."""

    kind: str  # one of HEADS

    def _set_task(self, task: str, num_outputs: int, label_smoothing: float, output_names: Sequence[str] | None):
        self.task = get_task(task)
        if self.kind not in self.task.heads:
            raise ValueError(f"a {self.kind} head cannot predict a {task} task (its heads: {list(self.task.heads)})")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_outputs = num_outputs
        self.label_smoothing = float(label_smoothing)
        self.output_names = list(output_names) if output_names is not None else [str(i) for i in range(num_outputs)]
        groups = len(self.output_names)
        if groups != num_outputs and not (self.task.grouped_outputs and groups and num_outputs % groups == 0):
            grouped = " or equal consecutive groups of them" if self.task.grouped_outputs else ""
            raise ValueError(f"output_names has {groups} names for {num_outputs} outputs (a {task} task names "
                             f"every output{grouped})")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task's training loss, computed in float32 even under autocast."""
        return self.task.loss(logits.float(), labels, label_smoothing=self.label_smoothing)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """What the outputs predict: probabilities for classification tasks, values for regression."""
        return self.task.predict(logits)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics over a whole evaluated set (call on gathered tensors)."""
        return self.task.metrics(logits, labels, self.output_names)


class TaskHead(TaskMixin, NormMlpClassifierHead):
    """Pool -> norm -> linear head that also computes its task's loss, metrics and predictions.

    Args:
        in_features: channels of the backbone's last stage.
        num_outputs: classes (classification / multilabel) or regression targets.
        task: a registered task name (:func:`uniperc.tasks.list_tasks`) whose ``heads`` include ``"pooled"``.
        norm: ``"ln"`` (LayerNorm2d after pooling, as UniRepLKNet/UniConvNet) or ``None`` (VAN).
        label_smoothing: classification only, passed to ``F.cross_entropy``.
        output_names: class / target names, used to name per-variable regression metrics.
    """

    kind = "pooled"

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

    The output is flattened ``B x (C * H * W)``, channel-major, the layout of the regression targets; ``task``
    is any registered task whose ``heads`` include ``"dense"``.
    """

    kind = "dense"

    def __init__(self, feature_dims: Sequence[int], in_chans: int, target_shape: Sequence[int],
                 residual_channels: Sequence[int] | None = None, dim: int | None = None,
                 output_names: Sequence[str] | None = None, task: str = "regression"):
        super().__init__()
        c, h, w = (int(v) for v in target_shape)
        self._set_task(task, c * h * w, 0.0, output_names)
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
