"""Spatial mixers and the blocks (shells) around them, chosen by name (see :mod:`uniperc.blocks.registry`)."""
from .registry import create_mixer, get_block, get_mixer, list_blocks, list_mixers, register_block, register_mixer
from . import dilated_reparam  # noqa: F401  (registers the "dilated_reparam" mixer and block)
from . import rfa  # noqa: F401  (registers "rfa")
from . import peripheral  # noqa: F401  (registers "peripheral")
from . import lka  # noqa: F401  (registers "lka")

__all__ = ["create_mixer", "get_block", "get_mixer", "list_blocks", "list_mixers", "register_block",
           "register_mixer"]
