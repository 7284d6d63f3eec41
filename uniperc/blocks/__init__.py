"""Token-mixer blocks, chosen by name (see :mod:`uniperc.blocks.registry`)."""
from .registry import get_block, list_blocks, register_block
from . import dilated_reparam  # noqa: F401  (registers "dilated_reparam")
from . import rfa  # noqa: F401  (registers "rfa")
from . import peripheral  # noqa: F401  (registers "peripheral")
from . import lka  # noqa: F401  (registers "lka")

__all__ = ["get_block", "list_blocks", "register_block"]
