"""Guest memory: RAM blocks, dirty logs, vCPU workloads and the ab check.

The memory side of QEMU's ``ram.c`` and ``RAMBlock``: blocks live in POSIX
shared memory or mapped files so that vCPU processes, the coordinator and the
multifd workers all see the same bytes.
"""
from engine.ram.abcheck import ABResult, ab_slices, check_ab
from engine.ram.block import DEFAULT_PAGE_SIZE, RamBlock, RamBlockHandle
from engine.ram.dirty import DirtyLog, DirtyLogHandle
from engine.ram.guest import Guest
from engine.ram.seams import DestinationGuest, MappedBlock, PageBlock, SourceGuest
from engine.ram.shm import attach_segment, close_segment, create_segment, unlink_segment
from engine.ram.workloads import WorkloadSpec

__all__ = [
    "ABResult", "ab_slices", "check_ab",
    "DEFAULT_PAGE_SIZE", "RamBlock", "RamBlockHandle",
    "DirtyLog", "DirtyLogHandle",
    "Guest", "SourceGuest", "DestinationGuest", "PageBlock", "MappedBlock",
    "attach_segment", "close_segment", "create_segment", "unlink_segment",
    "WorkloadSpec",
]
