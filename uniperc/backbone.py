"""One 4-stage backbone whose blocks and spatial mixers are chosen per stage, or per block, by name.

stem (stride 4) -> [downsample (stride 2, stages 2-4) -> blocks -> optional stage norm] x 4 -> head.
The frame (stem, downsample, norms) is chosen by name too, so each published family is this class
with its own settings (``uniperc.variants``); any block (shell) can hold any mixer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, NormMlpClassifierHead, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from .blocks import get_block, get_mixer
from .blocks.registry import split_kwargs
from .layers import create_downsample, create_stem

_NORMS = {"ln": LayerNorm2d, None: nn.Identity}


def _per_stage(value, num_stages: int, name: str) -> list:
    """Broadcast a scalar/dict to every stage; check a sequence has one entry per stage."""
    if isinstance(value, (str, int, dict)) or value is None:
        return [value] * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise ValueError(f"{name} needs one entry per stage ({num_stages}), got {len(value)}: {value!r}")
    return value


def _per_block(value, depth: int, name: str, stage: int) -> list:
    if isinstance(value, (str, int)) or value is None:
        return [value] * depth
    value = list(value)
    if len(value) != depth:
        raise ValueError(f"{name}[{stage}] needs one entry per block ({depth}), got {len(value)}: {value!r}")
    return value


def _norm_layer(name, what: str) -> type[nn.Module]:
    if name not in _NORMS:
        raise ValueError(f"unknown {what} {name!r}; expected one of {list(_NORMS)}")
    return _NORMS[name]


def _resolve(block: str | None, mixer: str | None, stage: int) -> tuple[str, str]:
    """(block, mixer) names of one block: a missing block is the mixer's own published block, a missing
    mixer the block's own mixer."""
    if mixer is not None:
        get_mixer(mixer)
    if block is None:
        if mixer is None:
            raise ValueError(f"stage {stage}: a block needs a block or a mixer name, got neither")
        try:
            get_block(mixer)
        except ValueError as e:
            raise ValueError(f"stage {stage}: mixer {mixer!r} has no published block of its own, so name the "
                             f"shell with block=: {e}") from None
        return mixer, mixer
    return block, mixer or get_block(block).own_mixer


class UniPercStage(nn.Module):
    """Downsample, then a sequence of (possibly different) blocks, each a shell around a mixer, then an
    optional norm. ``mixer_kwargs`` is this stage's (see :func:`~uniperc.blocks.registry.split_kwargs`)."""

    def __init__(self, in_dim: int, dim: int, blocks: list[tuple[str, str]], kernel_sizes: list[int],
                 mixer_kwargs: dict, drop_path_rates: list[float], downsample: str | None, stage_norm: str | None,
                 stage: int):
        super().__init__()
        self.downsample = create_downsample(downsample, in_dim, dim) if downsample else nn.Identity()
        self.shared = nn.ModuleDict()
        for name in dict.fromkeys(m for _, m in blocks):
            make_shared = getattr(get_mixer(name), "make_stage_shared", None)
            if make_shared is not None:
                self.shared[name] = make_shared(dim, max(k for (_, m), k in zip(blocks, kernel_sizes) if m == name))
        where = f"mixer_kwargs[{stage}]"
        layers = []
        for (b, m), k, dp in zip(blocks, kernel_sizes, drop_path_rates):
            block_kwargs, own_mixer_kwargs = split_kwargs(mixer_kwargs, b, m, where)
            layers.append(get_block(b)(dim, k, drop_path=dp, shared=self.shared[m] if m in self.shared else None,
                                       mixer=m, mixer_kwargs=own_mixer_kwargs, **block_kwargs))
        self.blocks = nn.Sequential(*layers)
        self.norm = _norm_layer(stage_norm, "stage_norm")(dim)
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class UniPercNet(nn.Module):
    """The uniperc backbone with a classification head (timm model API).

    Args:
        in_chans: input channels C' of the modality (1 for log-mel audio, 3 for images, ...).
        depths, dims: blocks and channels per stage.
        block: a registered block (shell) name (:func:`~uniperc.blocks.list_blocks`), one per stage, or per
            stage a list with one per block; ``None``: each block is the published block of its mixer.
        mixer: a registered spatial mixer name (:func:`~uniperc.blocks.list_mixers`), placed inside the
            block's shell, in the same forms; ``None``: each block's own published mixer. So ``mixer="lka"``
            alone is VAN's whole block, ``block="rfa", mixer="lka"`` UniConvNet's shell around LKA; the timm
            variants fix ``block`` to their family's, so there ``mixer=`` swaps only the spatial mixer.
        kernel_sizes: per stage an int, or a list with one per block (mixers without a kernel size ignore it).
        mixer_kwargs: per stage (one dict, or one per stage) keywords keyed by block or mixer name,
            ``{"rfa": {"dcn_group_channels": 16}, "peripheral": {"central_region": 7}}``: each name's entry goes
            to that block's shell and that mixer, only where the stage uses them; a flat dict is shorthand
            for every block of the stage (:func:`~uniperc.blocks.registry.split_kwargs`).
        stem, downsample: registered frame layers (:mod:`uniperc.layers`).
        stage_norm: "ln" for a LayerNorm at the end of each stage (VAN), else None.
        head_norm: norm after global pooling ("ln" or None).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (2, 2, 6, 2),
                 dims: Sequence[int] = (40, 80, 160, 320), block: Any = None, mixer: Any = "dilated_reparam",
                 kernel_sizes: Any = (3, 13, 13, 13), mixer_kwargs: Any = None, stem: str = "unireplknet",
                 downsample: str = "conv_norm", stage_norm: str | None = None, head_norm: str | None = "ln",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
                 head_init_scale: float = 1.0, output_stride: int = 32):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must have the same length")
        if output_stride != 32:
            raise ValueError(f"output_stride must be 32 (dilated stages are not supported), got {output_stride}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        num_stages = len(depths)
        shells = _per_stage(block, num_stages, "block")
        mixers = _per_stage(mixer, num_stages, "mixer")
        kernels = _per_stage(kernel_sizes, num_stages, "kernel_sizes")
        kwargs = _per_stage(mixer_kwargs or {}, num_stages, "mixer_kwargs")
        for i, kw in enumerate(kwargs):
            if not isinstance(kw, dict) and kw is not None:
                raise ValueError(f"mixer_kwargs[{i}] must be a dict, got {kw!r}")
        dp_rates = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]

        self.stem_name = stem
        self.stem = create_stem(stem, in_chans, dims[0])
        self.stages = nn.Sequential()
        self.feature_info = []
        stride = 4
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            self.stages.append(UniPercStage(
                dims[i - 1] if i else dims[0], dim,
                blocks=[_resolve(b, m, i) for b, m in zip(_per_block(shells[i], depth, "block", i),
                                                         _per_block(mixers[i], depth, "mixer", i))],
                kernel_sizes=_per_block(kernels[i], depth, "kernel_sizes", i),
                mixer_kwargs=dict(kwargs[i] or {}), drop_path_rates=dp_rates[i],
                downsample=downsample if i else None, stage_norm=stage_norm, stage=i))
            stride *= 2 if i else 1
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=_norm_layer(head_norm, "head_norm"))
        self._init_tree(self)
        if isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    def make_stem(self, in_chans: int) -> nn.Module:
        """A new stem of this network's kind and width for ``in_chans`` input channels, initialised as the
        network initialises its own: what a multi-modal model gives each modality, so that one network (its
        stages) serves them all instead of one whole network built per modality for its stem."""
        return self._init_tree(create_stem(self.stem_name, in_chans, self.feature_info[0]["num_chs"]))

    @classmethod
    def _init_tree(cls, root: nn.Module) -> nn.Module:
        root.apply(cls._init_weights)
        for module in root.modules():  # uniperc layers with an init of their own (DCNv3) keep it
            if type(module).__module__.startswith("uniperc.") and "reset_parameters" in vars(type(module)):
                module.reset_parameters()
        return root

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.is_meta:  # meta: nothing to fill
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^stages\.(\d+)\.(norm|shared)", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"input must be a 4-D tensor B x C x H x W, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"input has {x.shape[1]} channels but the model was built with in_chans={self.in_chans}")

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Features of the selected stages (timm's ``forward_intermediates`` contract)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x):
        self._check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
