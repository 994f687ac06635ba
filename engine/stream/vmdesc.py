"""The VMDESCRIPTION trailer: a JSON map of the FULL sections, as QEMU 7.2 writes it.

Informational only (a destination skips it; ``scripts/analyze-migration.py``
reads it).  Key order matters for byte equality with QEMU, so the dicts are
built in QEMU's order: ``{"page_size", "devices": [{"name", "instance_id",
"vmsd_name", "version", "fields", ["subsections"]}]}``.  QEMU releases after
7.2 put a ``configuration`` entry first; pass one to :func:`build_vmdesc` to
imitate them.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .constants import TARGET_PAGE_SIZE
from .vmstate import VMStateDescription

DeviceEntry = tuple[str, int, VMStateDescription, Mapping[str, Any]]


def describe_device(idstr: str, instance_id: int, vmsd: VMStateDescription,
                    values: Mapping[str, Any]) -> dict[str, Any]:
    """One ``devices`` entry: a FULL section ``idstr``/``instance_id`` saved from ``values``."""
    return {"name": idstr, "instance_id": instance_id, **vmsd.describe(values)}


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


__all__ = ["DeviceEntry", "describe_device", "build_vmdesc"]
