"""The VMDESCRIPTION trailer: a JSON map of the FULL sections, as QEMU 7.2 writes it.

Informational only (a destination skips it; ``scripts/analyze-migration.py``
reads it).  Key order matters for byte equality with QEMU, so the dicts are
built in QEMU's order: ``{"page_size", "devices": [{"name", "instance_id",
"vmsd_name", "version", "fields", ["subsections"]}]}``.  QEMU releases after
7.2 put a ``configuration`` entry first; pass one to :func:`build_vmdesc` to
imitate them.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import numpy as np

from engine.errors import RemoteProtocolError

from .constants import TARGET_PAGE_SIZE
from .vmstate import VMStateDescription

DeviceEntry = tuple[str, int, VMStateDescription, Mapping[str, Any]]


def describe_device(idstr: str, instance_id: int, vmsd: VMStateDescription,
                    values: Mapping[str, Any]) -> dict[str, Any]:
    """One ``devices`` entry: a FULL section ``idstr``/``instance_id`` saved from ``values``."""
    return {"name": idstr, "instance_id": instance_id, **vmsd.describe(values)}


#: deepest nesting a VMDESCRIPTION may have (QEMU's are a few levels: devices,
#: fields, subsections of subsections); deeper is hostile, not a description
MAX_VMDESC_DEPTH = 64


def parse_vmdesc(data: bytes) -> dict[str, Any]:
    """The VMDESCRIPTION object in ``data`` (JSON).

    Raises :class:`RemoteProtocolError` (without offset: the caller knows
    where the JSON starts) for anything but a JSON object nested at most
    :data:`MAX_VMDESC_DEPTH` deep, before the parser could recurse that far.
    """
    depth = _max_depth(data)
    if depth > MAX_VMDESC_DEPTH:
        raise RemoteProtocolError(
            f"VMDESCRIPTION nested {depth} deep (at most {MAX_VMDESC_DEPTH})")
    try:
        desc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"VMDESCRIPTION is not JSON: {exc}") from None
    if not isinstance(desc, dict):
        raise RemoteProtocolError("VMDESCRIPTION is not a JSON object")
    return desc


def _max_depth(data: bytes) -> int:
    """How deep ``data``'s brackets nest, outside strings (array operations;
    the JSON parser checks the rest)."""
    raw = np.frombuffer(data, np.uint8)
    if not len(raw):
        return 0
    # Brackets inside strings do not count: mask out string bodies.  A quote
    # is a string delimiter unless escaped by an odd run of backslashes.
    quote = raw == ord('"')
    if quote.any():
        n = len(raw)
        where = np.arange(n)
        # A quote after an odd run of backslashes is escaped.
        last_plain = np.maximum.accumulate(np.where(raw != ord("\\"), where, -1))
        run_before = np.zeros(n, np.int64)
        run_before[1:] = where[:-1] - last_plain[:-1]   # backslashes right before i
        quote &= run_before % 2 == 0
        inside = (np.cumsum(quote) - quote) % 2 == 1     # after an odd number of quotes
    else:
        inside = np.zeros(len(raw), bool)
    step = np.zeros(len(raw), np.int64)
    step[(raw == ord("[")) | (raw == ord("{"))] = 1
    step[(raw == ord("]")) | (raw == ord("}"))] = -1
    step[inside] = 0
    return int(np.cumsum(step).max())


def build_vmdesc(page_size: int = TARGET_PAGE_SIZE, devices: Iterable[DeviceEntry] = (),
                 configuration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The VMDESCRIPTION object for FULL sections ``(idstr, instance_id, vmsd, values)``.

    ``page_size`` is the target page size in bytes.  Encode it with
    :func:`engine.stream.encoder.vmdescription`.
    """
    desc: dict[str, Any] = {}
    if configuration is not None:
        desc["configuration"] = dict(configuration)
    desc["page_size"] = page_size
    desc["devices"] = [describe_device(*entry) for entry in devices]
    return desc


__all__ = ["DeviceEntry", "describe_device", "build_vmdesc", "parse_vmdesc",
           "MAX_VMDESC_DEPTH"]
