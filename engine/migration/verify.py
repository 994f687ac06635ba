"""Proof that a migration moved memory intact.

The destination hashes its RAM the moment loading finishes, before its
vCPUs run again; the source hashes its RAM at switchover, while its vCPUs
are stopped.  Equal digests mean byte-identical memory at switchover.
"""
from __future__ import annotations

import hashlib
import os

from engine.errors import GuestError
from engine.ram.holes import block_fd

#: bytes read per system call when hashing a block through its file
_CHUNK = 4 << 20

def memory_digests(blocks) -> dict[str, str]:
    """sha256 of every block's used length, keyed by idstr."""
    return {b.idstr: block_digest(b) for b in blocks}


def block_digest(block) -> str:
    """sha256 of one block, read through its file when it has one.

    Reading a hole of a tmpfs file through the mapping would allocate it;
    ``pread`` returns zeros and leaves it a hole, so checking a migration
    does not fill the memory of an idle guest on either side.
    """
    fd = block_fd(block)
    digest = hashlib.sha256()
    if fd is None:
        digest.update(block.buf)
        return digest.hexdigest()
    size = len(block.buf)
    chunk = memoryview(bytearray(min(_CHUNK, size)))
    pos = 0
    while pos < size:
        n = os.preadv(fd, [chunk[:min(len(chunk), size - pos)]], pos)
        if n <= 0:
            raise GuestError(f"RAM block {block.idstr!r}: its file ends at {pos} "
                             f"of {size} bytes")
        digest.update(chunk[:n])
        pos += n
    return digest.hexdigest()


def compare_digests(source: dict[str, str], destination: dict[str, str]) -> list[str]:
    """Human-readable mismatches; empty when the memories are identical."""
    problems = []
    for name in sorted(set(source) | set(destination)):
        a, b = source.get(name), destination.get(name)
        if a is None or b is None:
            problems.append(f"RAM block {name!r} exists on one side only")
        elif a != b:
            problems.append(f"RAM block {name!r} differs (source {a[:16]}, destination {b[:16]})")
    return problems
