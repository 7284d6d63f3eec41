"""Name -> token-mixer block class.

A block is an ``nn.Module`` built as ``Block(dim, kernel_size, drop_path=0., shared=None, **mixer_kwargs)``
that maps ``B x dim x H x W`` to the same shape (residual included). It may define

* ``make_stage_shared(dim, kernel_size, **mixer_kwargs) -> nn.Module | None`` (classmethod): parameters
  shared by every block of this mixer in one stage (PeLK's kernel-wise positional embedding); the stage
  builds it once, owns it (state-dict key ``stages.{i}.shared.{mixer}``) and hands it to each block as
  ``shared``; a block keeps only a plain reference to it, not registered as its own submodule (e.g.
  ``self.__dict__["shared"] = shared``), so the parameters appear once in the state dict;
* ``reparameterize()``: fold to deploy form in place (idempotent), as ``timm.utils.reparameterize_model``
  expects.

Blocks that take no kernel size (RFA's fixed 7/9/11, LKA's fixed 21) accept and ignore ``kernel_size``.
"""
from __future__ import annotations

_BLOCKS: dict[str, type] = {}


def register_block(name: str):
    """Class decorator: make a block available to the backbone under ``name``."""

    def wrap(cls):
        if name in _BLOCKS and _BLOCKS[name] is not cls:
            raise ValueError(f"block name {name!r} is already registered to {_BLOCKS[name].__name__}")
        _BLOCKS[name] = cls
        return cls

    return wrap


def get_block(name: str) -> type:
    try:
        return _BLOCKS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(_BLOCKS)}") from None


def list_blocks() -> list[str]:
    return sorted(_BLOCKS)
