"""One shared backbone, one stem per modality, one head per task.

Modalities give different input channels C' (1 for log-mel audio, 3 for images, ...), so each gets its own
stem (stride 4). By default that is the variant's own stem for that C' (:meth:`UniPercNet.make_stem
<uniperc.backbone.UniPercNet.make_stem>`: the same layers and init as in the timm model); a modality may supply
one of its own instead (``"stem"``: one of its :attr:`~uniperc.modalities.base.Modality.stems`, e.g. the point
cloud's ``learned_projection`` from raw points), built by its :meth:`~uniperc.modalities.base.Modality.make_stem`.
The backbone is built once and its four stages are shared; each task (here: each modality's dataset) gets its
own head: a pooled :class:`~uniperc.heads.TaskHead`, or, for a field target (``"head": "dense"``), a
:class:`~uniperc.heads.DenseHead` fed with every stage's feature map and the input.

Multi-view inputs (``"views": V``, point clouds with ``view_layout="batch"``): a sample is ``V x C' x H x W``;
the views are folded into the batch for the stem and stages, each view's features are pooled on their own, and
the pooled features are max-pooled over the views before the head (late view pooling, MVCNN), so the output does
not depend on the order of the views.

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
through ``timm.create_model`` (the variant's stem, one image per sample and a pooled head only: a plain timm
classifier has no other).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Mapping

import timm
import torch
import torch.nn as nn
from einops import rearrange, reduce

from .heads import HEADS, DenseHead, TaskHead

_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _make_stem(name: str, spec: Mapping, net: nn.Module) -> nn.Module:
    """``name``'s stem: the backbone's own for its ``in_chans``, or the one its modality supplies (``spec["stem"]``)."""
    stem = spec.get("stem", "backbone")
    if stem == "backbone":
        return net.make_stem(int(spec["in_chans"]))
    import uniperc.modalities as modality_registry

    modality = modality_registry.get(name)
    if stem not in modality.stems:
        raise ValueError(f"tasks[{name!r}]['stem'] must be one of {('backbone', *modality.stems)}, got {stem!r}")
    if not spec.get("adapter_config"):
        raise ValueError(f"tasks[{name!r}]: the {stem!r} stem is built from the modality's adapter_config, "
                         f"which the spec lacks")
    return modality.make_stem(stem, modality.config(spec["adapter_config"]), net.make_stem)


class MultiModalNet(nn.Module):
    """Per-modality stems and heads around the stages of a registered uniperc timm variant.

    Args:
        backbone: a timm model name registered by uniperc (e.g. ``"unireplknet_a"``).
        tasks: per modality ``{"in_chans": int, "task": str (a :func:`uniperc.tasks.list_tasks` name),
            "num_outputs": int, "label_smoothing": float, "output_names": list | None}``; the dict order is the
            order of stems and heads. A field target adds ``"head": "dense"``, ``"target_shape": [C, H, W]`` and
            ``"residual_channels": list | None`` (see :class:`~uniperc.heads.DenseHead`); ``"head"`` defaults to
            ``"pooled"`` and must be one of the task's ``heads``. ``"stem"`` (default ``"backbone"``) names a
            stem the modality (the key, a :func:`uniperc.modalities.list_modalities` name) supplies, built from
            ``"adapter_config"``; ``"views": V`` makes a sample ``V x C' x H x W`` (pooled heads only).
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
        # one backbone: its stages are shared, its stem factory builds each modality's stem, its classifier is
        # replaced by the task heads. It is built for the first modality's C', whose stem it then is (where that
        # modality takes the backbone's), so a one-modality model starts from the timm model's own weights.
        first = next(iter(self.tasks.values()))
        net = timm.create_model(backbone, in_chans=int(first["in_chans"]), num_classes=0, **self.backbone_kwargs)
        if not hasattr(net, "make_stem"):
            raise ValueError(f"backbone {backbone!r} is not a uniperc backbone (it builds no stem per modality)")
        self.stages = net.stages
        self.num_features = net.num_features
        self.head_norm = "ln" if not isinstance(net.head.norm, nn.Identity) else None
        for name, spec in self.tasks.items():
            takes_own = spec is first and spec.get("stem", "backbone") == "backbone"
            self.stems[name] = net.stem if takes_own else _make_stem(name, spec, net)
            kind = spec.get("head", "pooled")
            if kind not in HEADS:
                raise ValueError(f"tasks[{name!r}]['head'] must be one of {HEADS}, got {kind!r}")
            if kind == "dense":
                if not spec.get("target_shape"):
                    raise ValueError(f"tasks[{name!r}]: a dense head needs a target_shape")
                if spec.get("views"):
                    raise ValueError(f"tasks[{name!r}]: a dense head predicts a field of one image, but the samples "
                                     f"hold {spec['views']} views; use a pooled head")
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

    def sample_dims(self, modality: str) -> tuple[int, ...]:
        """One sample's dimensions before ``H x W``: ``(C',)``, or ``(V, C')`` where it holds ``V`` views."""
        spec = self.tasks[modality]
        return (*((int(spec["views"]),) if spec.get("views") else ()), int(spec["in_chans"]))

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """The shape of one sample (``C' x H x W``, or ``V x C' x H x W`` with views) at the trained size."""
        return (*self.sample_dims(modality), *map(int, self.tasks[modality]["input_size"]))

    def _stem(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """The stem's output for a batch; with views, for every view of every sample (``(B V) x C x H x W``)."""
        if modality not in self.stems:
            raise ValueError(f"modality {modality!r} has no stem in this model; it has {self.modalities}")
        expected = int(self.tasks[modality]["in_chans"])
        views = self.tasks[modality].get("views")
        if views:
            if x.ndim != 5 or x.shape[1] != views or x.shape[2] != expected:
                raise ValueError(f"{modality} input must be B x {views} x {expected} x H x W (views x channels), "
                                 f"got {tuple(x.shape)}")
            x = rearrange(x, "b v c h w -> (b v) c h w")
        elif x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(f"{modality} input must be B x {expected} x H x W, got {tuple(x.shape)}")
        return self.stems[modality](x)

    def forward_features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """The last stage's feature map; with views, one per view (``(B V) x C x h x w``)."""
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
        """Logits / regression outputs of ``modality``'s head for a ``B x C' x H x W`` batch (``B x V x C' x H x W``
        where the modality's samples hold ``V`` views)."""
        if modality in self.heads and isinstance(self.heads[modality], DenseHead):
            return self.heads[modality](self.forward_intermediates(x, modality), x)
        features = self.forward_features(x, modality)
        views = self.tasks[modality].get("views")
        if views:  # late view pooling (MVCNN); the head's own pooling of the 1 x 1 result changes nothing
            head = self.heads[modality]
            features = reduce(head.global_pool(features), "(b v) c h w -> b c h w", "max", v=views)
        return self.heads[modality](features)

    def timm_incompatibility(self, modality: str) -> str | None:
        """Why ``modality``'s path is no plain timm classifier (``None`` where it is one)."""
        spec = self.tasks[modality]
        if isinstance(self.heads[modality], DenseHead):
            return "has a dense head, which a plain timm classifier cannot hold"
        if spec.get("stem", "backbone") != "backbone":
            return f"has the {spec['stem']!r} stem of its modality, which a plain timm model does not have"
        if spec.get("views"):
            return f"takes {spec['views']} views per sample, which a plain timm model does not pool"
        return None

    def timm_state_dict(self, modality: str) -> dict[str, torch.Tensor]:
        """The weights of one modality's path under the plain timm model's keys (``stem.``, ``stages.``, ``head.``)."""
        if modality not in self.stems:
            raise ValueError(f"modality {modality!r} has no stem in this model; it has {self.modalities}")
        reason = self.timm_incompatibility(modality)
        if reason:
            raise ValueError(f"modality {modality!r} {reason}")
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
