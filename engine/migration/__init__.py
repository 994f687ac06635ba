"""The migration drivers: savevm (source.py) and loadvm (destination.py)."""
from __future__ import annotations

from engine.errors import InvalidCapabilityError

#: Capabilities the drivers act on today.  options.py knows every QEMU
#: capability and which ones the engine means to support; the drivers refuse
#: the rest here, up front, rather than silently migrating without them.
IMPLEMENTED_CAPABILITIES = frozenset({
    "events", "return-path", "pause-before-switchover", "switchover-ack", "multifd",
    "late-block-activate", "zero-blocks", "postcopy-ram", "postcopy-preempt",
    "postcopy-blocktime", "validate-uuid",
})


def check_implemented(options) -> None:
    """Raise InvalidCapabilityError for an enabled capability not built yet."""
    for name in sorted(options.enabled_capabilities()):
        if name not in IMPLEMENTED_CAPABILITIES:
            raise InvalidCapabilityError(
                name, "not implemented by this engine's migration drivers yet")
