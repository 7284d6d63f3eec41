"""Published model families, registered in timm on import."""
from . import unireplknet  # noqa: F401
