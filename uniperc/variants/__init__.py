"""Published model families, registered in timm on import."""
from . import unireplknet  # noqa: F401
from . import uniconvnet  # noqa: F401
from . import pelk  # noqa: F401
from . import van  # noqa: F401
