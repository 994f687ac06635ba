"""Moved to :mod:`engine.uffd` (a bottom layer, like QEMU's util/userfaultfd.c).

Kept only so that modules not yet updated (the placer, the incoming side,
bench/) still import; new code imports :mod:`engine.uffd`.
"""
from engine.uffd import (FaultEvent, Userfaultfd, buffer_address, probe,  # noqa: F401
                         punch_hole)

__all__ = ["FaultEvent", "Userfaultfd", "buffer_address", "probe", "punch_hole"]
