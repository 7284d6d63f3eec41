"""One shared backbone, one stem per modality, one head per task.

Modalities give different input channels C' (1 for log-mel audio, 3 for images, ...), so each gets its own
stem (stride 4, built exactly as the chosen timm variant builds its stem for that C'); the four stages are
shared; each task (here: each modality's dataset) gets its own head: a pooled :class:`~uniperc.heads.TaskHead`,
or, for a field target (``"head": "dense"``), a :class:`~uniperc.heads.DenseHead` fed with every stage's
feature map and the input.

State-dict layout: ``stems.<modality>.*``, ``stages.*`` (the variant's own keys), ``heads.<modality>.*``.
For one modality, renaming ``stems.<m>.`` -> ``stem.`` and ``heads.<m>.`` -> ``head.`` gives exactly the
timm model's state dict (:meth:`MultiModalNet.timm_state_dict`), which is how single-modality exports load
through ``timm.create_model`` (pooled heads only: a plain timm classifier has no dense head).
"""
from __future__ import annotations

from typing import Mapping

import timm
import torch
import torch.nn as nn

from .heads import HEADS, DenseHead, TaskHead


class MultiModalNet(nn.Module):
    """Per-modality stems and heads around the stages of a registered uniperc timm variant.

    Args:
        backbone: a timm model name registered by uniperc (e.g. ``"unireplknet_a"``).
        tasks: per modality ``{"in_chans": int, "task": str (a :func:`uniperc.tasks.list_tasks` name),
            "num_outputs": int, "label_smoothing": float, "output_names": list | None}``; the dict order is the
            order of stems and heads. A field target adds ``"head": "dense"``, ``"target_shape": [C, H, W]`` and
            ``"residual_channels": list | None`` (see :class:`~uniperc.heads.DenseHead`); ``"head"`` defaults to
            ``"pooled"`` and must be one of the task's ``heads``.
        backbone_kwargs: passed to ``timm.create_model`` (``dims``, ``depths``, ``mixer``, ``kernel_sizes``,
            ``drop_path_rate``, ``drop_rate``, ...).
    """

    def __init__(self, backbone: str, tasks: Mapping[str, Mapping], backbone_kwargs: Mapping | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("tasks must name at least one modality")
        if backbone not in timm.list_models():
            raise ValueError(f"backbone {backbone!r} is not a registered timm model (did you `import uniperc`?)")
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.tasks = {m: dict(spec) for m, spec in tasks.items()}
        self.stems = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.stages = None
        for name, spec in self.tasks.items():
            # The variant builds its own stem for this C' (stem kind and init live in the variant file);
            # its stages are kept once and shared, its classifier is replaced by a task head.
            net = timm.create_model(backbone, in_chans=int(spec["in_chans"]), num_classes=0, **self.backbone_kwargs)
            self.stems[name] = net.stem
            if self.stages is None:
                self.stages = net.stages
                self.num_features = net.num_features
                norm = "ln" if not isinstance(net.head.norm, nn.Identity) else None
                self.head_norm = norm
            kind = spec.get("head", "pooled")
            if kind not in HEADS:
                raise ValueError(f"tasks[{name!r}]['head'] must be one of {HEADS}, got {kind!r}")
            if kind == "dense":
                if not spec.get("target_shape"):
                    raise ValueError(f"tasks[{name!r}]: a dense head needs a target_shape")
                self.heads[name] = DenseHead(
                    [f["num_chs"] for f in net.feature_info], int(spec["in_chans"]), spec["target_shape"],
                    residual_channels=spec.get("residual_channels"), output_names=spec.get("output_names"),
                    task=spec["task"])
                continue
            self.heads[name] = TaskHead(
                self.num_features, int(spec["num_outputs"]), task=spec["task"], norm=self.head_norm,
                drop_rate=float(self.backbone_kwargs.get("drop_rate", 0.0)),
                label_smoothing=float(spec.get("label_smoothing", 0.0)), output_names=spec.get("output_names"))

    @property
    def modalities(self) -> list[str]:
        return list(self.tasks)

    def _stem(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.stems:
            raise ValueError(f"modality {modality!r} has no stem in this model; it has {self.modalities}")
        expected = int(self.tasks[modality]["in_chans"])
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(f"{modality} input must be B x {expected} x H x W, got {tuple(x.shape)}")
        return self.stems[modality](x)

    def forward_features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.stages(self._stem(x, modality))

    def forward_intermediates(self, x: torch.Tensor, modality: str) -> list[torch.Tensor]:
        """Every stage's output (strides 4, 8, 16, 32), what a dense head decodes."""
        out = [self._stem(x, modality)]
        for stage in self.stages:
            out.append(stage(out[-1]))
        return out[1:]

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Logits / regression outputs of ``modality``'s head for a ``B x C' x H x W`` batch."""
        if modality in self.heads and isinstance(self.heads[modality], DenseHead):
            return self.heads[modality](self.forward_intermediates(x, modality), x)
        return self.heads[modality](self.forward_features(x, modality))

    def timm_state_dict(self, modality: str) -> dict[str, torch.Tensor]:
        """The weights of one modality's path under the plain timm model's keys (``stem.``, ``stages.``, ``head.``)."""
        if modality not in self.stems:
            raise ValueError(f"modality {modality!r} has no stem in this model; it has {self.modalities}")
        if isinstance(self.heads[modality], DenseHead):
            raise ValueError(f"modality {modality!r} has a dense head, which a plain timm classifier cannot hold")
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith(f"stems.{modality}."):
                out["stem." + key[len(f"stems.{modality}."):]] = value
            elif key.startswith(f"heads.{modality}."):
                out["head." + key[len(f"heads.{modality}."):]] = value
            elif key.startswith("stages."):
                out[key] = value
        return out
