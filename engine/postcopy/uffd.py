"""Moved to :mod:`engine.uffd` (a bottom layer, like QEMU's util/userfaultfd.c).

Kept only so that modules not yet updated (the placer, the incoming side,
bench/) still import; new code imports :mod:`engine.uffd`.
"""
from engine.uffd import *  # noqa: F401,F403
from engine.uffd import __all__  # noqa: F401
