"""Proof that a migration moved memory intact.

The destination hashes its RAM the moment loading finishes, before its
vCPUs run again; the source hashes its RAM at switchover, while its vCPUs
are stopped.  Equal digests mean byte-identical memory at switchover.
"""
from __future__ import annotations

import hashlib


def memory_digests(blocks) -> dict[str, str]:
    """sha256 of every block's used length, keyed by idstr."""
    return {b.idstr: hashlib.sha256(b.buf).hexdigest() for b in blocks}


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
