"""The migration drivers: savevm (source.py) and loadvm (destination.py)."""
from __future__ import annotations

# Which capabilities are implemented is decided in one place, options.py;
# these names stay for the drivers that import them from here.
from engine.options import SUPPORTED_CAPABILITIES as IMPLEMENTED_CAPABILITIES
from engine.options import check_implemented

__all__ = ["IMPLEMENTED_CAPABILITIES", "check_implemented"]
