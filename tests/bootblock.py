"""A guest of our own making: a boot sector whose CPU keeps dirtying memory.

A QEMU ``-M none`` source has no CPU, so nothing re-dirties its RAM while it
migrates: it never re-sends a page, never sends an XBZRLE record and always
converges.  QEMU's own migration-test boots a tiny block that loops over a
memory range incrementing a byte per page; this is the same idea in 16-bit
real mode (no mode switch, so it stays a handful of instructions): SeaBIOS
loads it at 0x7c00 and it increments the first byte of every 4 KiB page from
:data:`FIRST` up to :data:`END`, forever.  Boot it with ``-M pc`` (TCG) and
``-drive file=<image>,format=raw,if=floppy``.

The bytes, each instruction with its encoding::

    7c00  fa              cli                  no interrupts: nothing else runs
    7c01  31 c0           xor  ax, ax
    7c03  8e d8           mov  ds, ax
    7c05  8e d0           mov  ss, ax
    7c07  bc 00 7c        mov  sp, 0x7c00      a stack below the code
    outer:
    7c0a  b8 00 10        mov  ax, 0x1000      segment of FIRST (0x10000)
    inner:
    7c0d  8e c0           mov  es, ax
    7c0f  26 fe 06 00 00  inc  byte [es:0]     dirty this page
    7c14  05 00 01        add  ax, 0x100       next page (0x100 paragraphs = 4 KiB)
    7c17  3d 00 9f        cmp  ax, 0x9f00      segment of END (0x9f000)
    7c1a  72 f1           jb   inner           (0x7c0d - 0x7c1c = -15)
    7c1c  eb ec           jmp  outer           (0x7c0a - 0x7c1e = -20)
    ...   00              padding
    7dfe  55 aa           boot signature
"""
from __future__ import annotations

import os

#: first page the guest dirties (guest physical address)
FIRST = 0x10000
#: end of the dirtied range (exclusive): conventional memory below the EBDA
END = 0x9F000
#: pages the guest keeps dirtying
PAGES = (END - FIRST) // 4096

CODE = bytes.fromhex(
    "fa"          # cli
    "31c0"        # xor ax, ax
    "8ed8"        # mov ds, ax
    "8ed0"        # mov ss, ax
    "bc007c"      # mov sp, 0x7c00
    "b80010"      # outer: mov ax, 0x1000
    "8ec0"        # inner: mov es, ax
    "26fe060000"  # inc byte [es:0]
    "050001"      # add ax, 0x100
    "3d009f"      # cmp ax, 0x9f00
    "72f1"        # jb inner
    "ebec"        # jmp outer
)


def boot_sector() -> bytes:
    """The 512-byte boot sector."""
    return CODE + bytes(510 - len(CODE)) + b"\x55\xaa"


def write_image(path: str | os.PathLike) -> str:
    """Write a 1.44 MB floppy image that boots the sector; returns the path."""
    with open(path, "wb") as f:
        f.write(boot_sector())
        f.truncate(1474560)
    return str(path)


def boot_args(image: str | os.PathLike) -> list[str]:
    """QEMU arguments booting *image* (for :class:`tests.qemu.QemuVM`'s extra_args)."""
    return ["-accel", "tcg", "-drive", f"file={image},format=raw,if=floppy",
            "-boot", "a"]


def counters(mem: bytes | memoryview) -> list[int]:
    """The byte the guest increments in each of its pages, from a RAM image."""
    return [mem[a] for a in range(FIRST, END, 4096)]
