"""One shared backbone, one stem per modality, one head per task.

Modalities give different input channels C' (1 for log-mel audio, 3 for images, ...), so each gets its own
stem (stride 4, built exactly as the chosen timm variant builds its stem for that C'); the four stages are
shared; each task (here: each modality's dataset) gets its own head: a pooled :class:`~uniperc.heads.TaskHead`,
or, for a field target (``"head": "dense"``), a :class:`~uniperc.heads.DenseHead` fed with every stage's
feature map and the input.

With several modalities, every BatchNorm of the shared stages keeps its running statistics per modality
(buffers ``running_mean_<modality>``, ``running_var_<modality>``, ``num_batches_tracked_<modality>`` beside its own,
which hold the statistics of the modality that ran last): a log-mel spectrogram and a depth image give the shared
layers very different activations, and one blended set of statistics serves neither at evaluation (measured on
the joint audio + image + point-cloud recipe: audio 67.7 % with shared statistics, 90.0 % with its own,
weights unchanged). Weights stay shared; deploy form (folding each BatchNorm into its conv) is therefore per
modality: :meth:`MultiModalNet.use_norm_stats` picks one before :func:`uniperc.reparameterize`.

State-dict layout: ``stems.<modality>.*``, ``stages.*`` (the variant's own keys), ``heads.<modality>.*``.
For one modality, renaming ``stems.<m>.`` -> ``stem.`` and ``heads.<m>.`` -> ``head.`` gives exactly the
timm model's state dict (:meth:`MultiModalNet.timm_state_dict`), which is how single-modality exports load
through ``timm.create_model`` (pooled heads only: a plain timm classifier has no dense head).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Mapping

import timm
import torch
import torch.nn as nn

from .heads import HEADS, DenseHead, TaskHead

_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


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
        if len(self.tasks) > 1:
            for bn in self._shared_norms(any_modality=True):
                for name in self.tasks:
                    for stat in _NORM_STATS:
                        bn.register_buffer(f"{stat}_{name}", getattr(bn, stat).clone())
        self.norm_stats_for_deploy = None  # per-modality statistics: the modality use_norm_stats picked
        self.deployed_for = None  # ... and the one deploy form folded in (the only modality it can then run)

    @property
    def modalities(self) -> list[str]:
        return list(self.tasks)

    def _shared_norms(self, any_modality: bool = False) -> Iterator[nn.modules.batchnorm._BatchNorm]:
        """The BatchNorms of the shared stages that keep statistics per modality (none in deploy form)."""
        first = f"running_mean_{next(iter(self.tasks))}"
        for module in self.stages.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                if any_modality or hasattr(module, first):
                    yield module

    @torch.no_grad()
    def _load_norm_stats(self, modality: str) -> None:
        for bn in self._shared_norms():
            for stat in _NORM_STATS:
                getattr(bn, stat).copy_(getattr(bn, f"{stat}_{modality}"))

    def use_norm_stats(self, modality: str) -> "MultiModalNet":
        """Pick ``modality``'s BatchNorm statistics for :func:`uniperc.reparameterize` to fold in; returns ``self``."""
        if modality not in self.tasks:
            raise ValueError(f"modality {modality!r} has no stem in this model; it has {self.modalities}")
        self._load_norm_stats(modality)
        self.norm_stats_for_deploy = modality
        return self

    @contextmanager
    def _norm_stats(self, modality: str):
        """Run the shared stages with ``modality``'s statistics, and keep what training updates in them."""
        if self.deployed_for not in (None, modality):
            raise ValueError(f"this model was folded to deploy form with {self.deployed_for}'s BatchNorm statistics; "
                             f"it cannot run {modality!r} (deploy a copy per modality: deploy_copy(modality))")
        self._load_norm_stats(modality)
        yield
        with torch.no_grad():
            for bn in self._shared_norms():
                if bn.training:
                    for stat in _NORM_STATS:
                        getattr(bn, f"{stat}_{modality}").copy_(getattr(bn, stat))

    def reparameterize(self) -> None:
        """Called first by :func:`uniperc.reparameterize`: with statistics per modality, deploy form is one
        modality's (the one :meth:`use_norm_stats` picked), loaded here just before the BatchNorms fold."""
        if not self.norm_stats_per_modality:
            return
        if self.norm_stats_for_deploy is None:
            raise ValueError("this joint model keeps BatchNorm statistics per modality, so its deploy form is per "
                             "modality: call use_norm_stats(modality) on a copy first, or use deploy_copy(modality)")
        self._load_norm_stats(self.norm_stats_for_deploy)
        self.deployed_for = self.norm_stats_for_deploy

    def deploy_copy(self, modality: str | None = None) -> "MultiModalNet":
        """A deep copy in deploy form, eval mode, float32 on the CPU; ``modality`` picks whose BatchNorm statistics
        are folded in, which is required where they are kept per modality (:attr:`norm_stats_per_modality`)."""
        from .reparam import reparameterize

        model = copy.deepcopy(self).cpu().float().eval()
        if modality is not None:
            model.use_norm_stats(modality)
        elif self.norm_stats_per_modality:
            raise ValueError("this joint model keeps BatchNorm statistics per modality; name the modality to deploy")
        return reparameterize(model)

    @property
    def norm_stats_per_modality(self) -> bool:
        return next(self._shared_norms(), None) is not None

    def _stem(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.stems:
            raise ValueError(f"modality {modality!r} has no stem in this model; it has {self.modalities}")
        expected = int(self.tasks[modality]["in_chans"])
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(f"{modality} input must be B x {expected} x H x W, got {tuple(x.shape)}")
        return self.stems[modality](x)

    def forward_features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        with self._norm_stats(modality):
            return self.stages(self._stem(x, modality))

    def forward_intermediates(self, x: torch.Tensor, modality: str) -> list[torch.Tensor]:
        """Every stage's output (strides 4, 8, 16, 32), what a dense head decodes."""
        out = [self._stem(x, modality)]
        with self._norm_stats(modality):
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
        if self.deployed_for not in (None, modality):
            raise ValueError(f"this model was folded to deploy form with {self.deployed_for}'s BatchNorm statistics")
        own = {}  # per-modality statistics: this modality's become the shared BatchNorms' own, the rest are left out
        if self.norm_stats_per_modality:
            shared = set(self._shared_norms())
            for path, bn in self.stages.named_modules():
                if bn in shared:
                    for stat in _NORM_STATS:
                        own[f"stages.{path}.{stat}"] = getattr(bn, f"{stat}_{modality}")
        suffixes = tuple(f".{stat}_{m}" for stat in _NORM_STATS for m in self.tasks)
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("stages.") and key.endswith(suffixes):
                continue
            if key in own:
                value = own[key]
            if key.startswith(f"stems.{modality}."):
                out["stem." + key[len(f"stems.{modality}."):]] = value
            elif key.startswith(f"heads.{modality}."):
                out["head." + key[len(f"heads.{modality}."):]] = value
            elif key.startswith("stages."):
                out[key] = value
        return out
