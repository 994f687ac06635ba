"""A stream's RAM written to one image file (``engine load --mem-path``).

The blocks lie back to back in the file, in the order the stream's block
list names them, as ``--mem-path`` images of a one-block guest do.  The
image is built under a temporary name in the target's directory and takes
the target's name only when :meth:`RamImage.commit` says the load
succeeded: a failed load leaves nothing half-written under that name (and
an older image there intact).  The file starts sparse, so zero pages are
holes that are never written (:class:`~engine.migration.ramload.RamLoader`
treats the blocks as fresh).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

__all__ = ["RamImage"]


@dataclass
class ImageBlock:
    """One block's pages in the image, as the RamLoader wants a block."""
    idstr: str
    pages: np.ndarray
    fresh: bool = True

    @property
    def npages(self) -> int:
        return len(self.pages)


class RamImage:
    """The image of ``blocks`` (``(idstr, used_length)`` pairs) for ``path``."""

    def __init__(self, path: str, blocks, page_size: int):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        fd, self.temp_path = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o644 & ~umask)       # what open(path, O_CREAT, 0o644) gives
            total = sum(length for _, length in blocks)
            os.ftruncate(fd, total)
        except BaseException:
            os.close(fd)
            os.unlink(self.temp_path)
            raise
        os.close(fd)
        self._map: np.ndarray | None = np.memmap(self.temp_path, np.uint8, "r+", shape=(total,)) \
            if total else np.zeros(0, np.uint8)
        self.blocks: list[ImageBlock] = []
        base = 0
        for idstr, length in blocks:
            view = self._map[base:base + length].reshape(length // page_size, page_size)
            self.blocks.append(ImageBlock(idstr, view))
            base += length
        self.received = {b.idstr: np.zeros(b.npages, bool) for b in self.blocks}

    def _release(self) -> None:
        if isinstance(self._map, np.memmap):
            self._map.flush()
        # The views go with the map; the file is closed when the last goes.
        self._map = None
        self.blocks = []

    def commit(self) -> None:
        """The load succeeded: the image takes its name."""
        self._release()
        os.replace(self.temp_path, self.path)

    def discard(self) -> None:
        """The load failed: no image (idempotent, also after :meth:`commit`)."""
        self._release()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass
