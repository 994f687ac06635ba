"""The drivers' RAM loader: :class:`engine.ram.loader.RamLoader` with XBZRLE.

The loader itself sits in engine/ram/, below the postcopy fault handler
that uses it too; XBZRLE decoding (engine/compress/, above ram/) is bound
in here, where the destination and ``engine load`` take it from.
"""
from __future__ import annotations

from typing import Sequence

from engine.compress.xbzrle import decode_into
from engine.ram.loader import RamLoader as _RamLoader
from engine.ram.loader import check_block_list, received_maps
from engine.ram.seams import PageBlock

__all__ = ["RamLoader", "check_block_list", "received_maps"]


class RamLoader(_RamLoader):
    """A :class:`engine.ram.loader.RamLoader` that applies XBZRLE records."""

    def __init__(self, blocks: Sequence[PageBlock], received: dict, page_size: int):
        super().__init__(blocks, received, page_size, xbzrle_decode=decode_into)
