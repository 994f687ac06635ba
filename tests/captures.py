"""Where the byte-exact QEMU 7.2 captures are (``shared/reference/qemu-7.2-captures``).

The shared folder sits next to the repository in the project's checkout
and at /work/shared on the development machines; tests that need the
captures skip where neither exists.
"""
from __future__ import annotations

from pathlib import Path

import pytest

_CANDIDATES = tuple(root / "reference" / "qemu-7.2-captures"
                    for root in (Path(__file__).resolve().parents[2] / "shared",
                                 Path("/work/shared")))

#: the first place that exists, else the last (so a skip names where to look)
CAPTURES = next((path for path in _CANDIDATES if path.is_dir()), _CANDIDATES[-1])


def require_captures() -> Path:
    """:data:`CAPTURES`, or skip the calling test when it does not exist."""
    if not CAPTURES.is_dir():
        pytest.skip("QEMU 7.2 captures not found")
    return CAPTURES
