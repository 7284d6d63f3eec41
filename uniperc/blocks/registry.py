"""Two registries: spatial **mixers** and the **blocks** (shells) they sit in, both chosen by name.

A *mixer* is the spatial token mixer alone: ``fn(dim, kernel_size, **own_kwargs) -> nn.Module`` mapping
``B x dim x H x W`` to the same shape, with no residual, norm, FFN or layer scale of its own (except where
the published module has them inside: the RFA normalises its input, VAN's attention has an inner shortcut).
Mixers with fixed kernels (RFA 7/9/11, LKA 5 + 7 dilated) ignore ``kernel_size``. A mixer may define

* ``make_stage_shared(dim, kernel_size) -> nn.Module`` (attribute of ``fn``): parameters shared by every
  block of this mixer in one stage (PeLK's kernel-wise positional embedding). The stage builds it once and
  owns it (state-dict key ``stages.{i}.shared.{mixer}``); ``fn`` then receives it as ``shared=`` and keeps
  only a plain reference, so the parameters appear once in the state dict;
* ``reparameterize()``: fold to deploy form in place (idempotent), as ``timm.utils.reparameterize_model``
  expects; ``scale_output_(scale)`` / ``absorb_input_affine_(scale, shift)``: fold a following layer scale /
  a preceding eval-mode BN into itself exactly (the shells use them when present).

A *block* is a published block as a shell around a mixer (:class:`~uniperc.blocks.shell.BlockShell`):
``Block(dim, kernel_size, drop_path=0., shared=None, mixer=None, mixer_kwargs=None, **block_kwargs)``,
``B x dim x H x W`` to the same shape, residuals included. Each block is registered under the name of the
mixer it was published with (``"rfa"`` is UniConvNet's block, whose own mixer is the ``"rfa"`` mixer).
"""
from __future__ import annotations

import inspect
from typing import Callable

from .._registry import register_into

_BLOCKS: dict[str, type] = {}
_MIXERS: dict[str, Callable] = {}
# arguments the backbone itself supplies: never user keywords
_BLOCK_ARGS = ("self", "dim", "kernel_size", "drop_path", "shared", "mixer", "mixer_kwargs")
_MIXER_ARGS = ("dim", "kernel_size", "shared")


def register_block(name: str):
    """Class decorator: make a block (shell) available to the backbone under ``name``."""
    return register_into(_BLOCKS, "block", name)


def register_mixer(name: str):
    """Decorator: make a spatial mixer (class or factory) available to every block under ``name``."""
    return register_into(_MIXERS, "mixer", name)


def get_block(name: str) -> type:
    if name not in _BLOCKS:
        raise ValueError(f"unknown block {name!r}; registered blocks: {sorted(_BLOCKS)}")
    return _BLOCKS[name]


def get_mixer(name: str) -> Callable:
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(_MIXERS)}")
    return _MIXERS[name]


def list_blocks() -> list[str]:
    return sorted(_BLOCKS)


def list_mixers() -> list[str]:
    return sorted(_MIXERS)


def _keywords(fn: Callable, supplied: tuple[str, ...]) -> list[str]:
    """Keyword arguments ``fn`` takes beyond the ones the backbone supplies."""
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name not in supplied and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def block_keywords(name: str) -> list[str]:
    return _keywords(get_block(name), _BLOCK_ARGS)


def mixer_keywords(name: str) -> list[str]:
    return _keywords(get_mixer(name), _MIXER_ARGS)


def create_mixer(name: str, dim: int, kernel_size: int, shared=None, **kwargs):
    """Build mixer ``name``; a keyword it does not take is a ``ValueError`` naming it and the valid ones."""
    fn = get_mixer(name)
    valid = mixer_keywords(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"mixer {name!r} takes no keyword {unknown[0]!r}; its keywords: {valid}")
    if hasattr(fn, "make_stage_shared"):
        kwargs["shared"] = shared
    return fn(dim, kernel_size, **kwargs)


def split_kwargs(stage_kwargs: dict, block: str, mixer: str, where: str) -> tuple[dict, dict]:
    """Route one stage's ``mixer_kwargs`` to (block keywords, mixer keywords) for one ``block``/``mixer`` pair.

    Keyed form ``{name: {...}}`` (name: a registered block or mixer): the entry of ``block`` gives the shell's
    keywords, the entry of ``mixer`` the mixer's; each entry's keys are checked against its name's block and
    mixer keywords, and keys of a block or mixer this pair does not use are left unused (a family's settings
    for its own block stay harmless when another block is chosen). Flat form ``{key: value}``: shorthand for
    this pair, each key to the mixer when it takes it, else to the block.
    """
    names = set(_BLOCKS) | set(_MIXERS)
    keyed = [k for k in stage_kwargs if k in names]
    if keyed and len(keyed) != len(stage_kwargs):
        raise ValueError(f"{where} mixes block/mixer names {sorted(keyed)} with plain keywords "
                         f"{sorted(set(stage_kwargs) - set(keyed))}; key every entry by name, e.g. "
                         f"{{{block!r}: {{...}}}}")
    if not keyed:
        return _split_flat(stage_kwargs, block, mixer, where)
    for name, entry in stage_kwargs.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}[{name!r}] must be a dict of keywords, got {entry!r}")
        valid = (block_keywords(name) if name in _BLOCKS else []) + (mixer_keywords(name) if name in _MIXERS else [])
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise ValueError(f"{where}[{name!r}]: unknown keyword {unknown[0]!r}; {name!r} takes {sorted(valid)}")
    own_block = {k: v for k, v in stage_kwargs.get(block, {}).items() if k in block_keywords(block)}
    own_mixer = {k: v for k, v in stage_kwargs.get(mixer, {}).items() if k in mixer_keywords(mixer)}
    return own_block, own_mixer


def _split_flat(kwargs: dict, block: str, mixer: str, where: str) -> tuple[dict, dict]:
    mixer_valid, block_valid = mixer_keywords(mixer), block_keywords(block)
    unknown = sorted(set(kwargs) - set(mixer_valid) - set(block_valid))
    if unknown:
        raise ValueError(f"{where}: keyword {unknown[0]!r} is taken neither by block {block!r} "
                         f"{sorted(block_valid)} nor by mixer {mixer!r} {sorted(mixer_valid)}; key per-block "
                         f"settings by name, e.g. {{{block!r}: {{...}}}}")
    return ({k: v for k, v in kwargs.items() if k not in mixer_valid},
            {k: v for k, v in kwargs.items() if k in mixer_valid})
