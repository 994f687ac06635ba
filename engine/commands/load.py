"""``engine load FILE``: read a migration stream file and report what is in it.

Like ``qemu -incoming file:FILE`` without a guest to run, or QEMU's
scripts/analyze-migration.py: every section is parsed (device sections with
the vmstate descriptions of the known machine profiles) and RAM pages are
counted, or written into an image with ``--mem-path``.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from engine.commands.args import EXIT_FAILED, EXIT_OK
from engine.commands.common import json_values, write_json
from engine.errors import ChannelClosedError, ConfigError, EngineError

if TYPE_CHECKING:
    from engine.stream.vmstate import VMStateDescription


def _all_devices(vcpus: int | None = None):
    """The vmsd lookup of every known machine profile, for any number of
    vCPUs: a device that has one instance per vCPU (``cpu``) is known at
    every instance, so the stream's own sections say how many there are
    (``vcpus`` is accepted and not needed)."""
    from engine.machine import PROFILES
    table: dict[tuple[str, int], VMStateDescription] = {}
    per_vcpu: dict[str, VMStateDescription] = {}
    for profile in PROFILES.values():
        one, two = profile.devices(1), profile.devices(2)
        counts: dict[str, int] = {}
        for dev in one:
            counts[dev.idstr] = counts.get(dev.idstr, 0) - 1
        for dev in two:
            counts[dev.idstr] = counts.get(dev.idstr, 0) + 1
        for dev in two:
            if counts[dev.idstr] > 0:
                per_vcpu.setdefault(dev.idstr, dev.vmsd)
            else:
                table.setdefault((dev.idstr, dev.instance_id), dev.vmsd)
    return lambda idstr, instance_id: table.get((idstr, instance_id)) or \
        per_vcpu.get(idstr)


def analyze_stream(path: str, *, vcpus: int | None = None, mem_path: str | None = None,
                   machine: str | None = None) -> dict:
    """Decode a whole stream file; returns the report (raises on bad input).

    With *machine* (a profile name) the stream must come from that machine
    type, as a QEMU destination insists; by default any known one is read.
    The stream's ``cpu`` sections say how many vCPUs it has (``report
    ["vcpus"]``); with *vcpus* it must have exactly that many.  With
    *mem_path* RAM goes into an image there, which appears only once the
    whole stream loaded.
    """
    from engine.errors import RemoteProtocolError
    from engine.machine import get_profile
    from engine.migration.ramimage import RamImage
    from engine.migration.ramload import RamLoader
    from engine.stream import events as ev
    from engine.stream.constants import TARGET_PAGE_SIZE
    from engine.stream.decoder import StreamDecoder

    expected = get_profile(machine).type_name if machine else None
    channel = os.path.basename(path)
    dec = StreamDecoder(_all_devices(), channel=channel, page_runs=True)
    report: dict = {"file": path, "machine": None, "vcpus": 0, "sections": [], "commands": [],
                    "ram": {"blocks": [], "pages": 0, "zero_pages": 0, "xbzrle_pages": 0},
                    "devices": {}, "vmdesc": None, "complete": False}
    image: RamImage | None = None
    loader: RamLoader | None = None
    ram = report["ram"]
    seen = set()
    cpus: set[int] = set()

    def finish() -> dict:
        if vcpus is not None and report["vcpus"] != vcpus:
            raise RemoteProtocolError(
                f"the stream carries {report['vcpus']} vCPUs, --vcpus says {vcpus}",
                channel=channel)
        if image is not None:
            image.commit()
        return report

    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(4 << 20)
                if chunk:
                    dec.feed(chunk)
                else:
                    dec.feed_eof()
                while True:
                    at = dec.offset
                    e = dec.next_event()
                    if e is ev.NEED_DATA:
                        break
                    kind = type(e)
                    if kind is ev.RamPages:
                        ram["pages"] += len(e)
                        if loader is not None:
                            loader.land(e.block, e.offsets, e.data)
                    elif kind is ev.RamXbzrle:
                        ram["xbzrle_pages"] += 1
                        if loader is not None:  # onto the page an earlier record put there
                            loader.patch(e.block, e.offset, e.data)
                    elif kind is ev.RamZeros:
                        ram["zero_pages"] += len(e)
                        if loader is not None:  # clears only pages received before
                            loader.zero(e.block, e.offsets)
                    elif kind is ev.Configuration:
                        report["machine"] = e.machine
                        if expected is not None and e.machine != expected:
                            raise RemoteProtocolError(
                                f"Machine type received is '{e.machine}' and local is "
                                f"'{expected}'", offset=at, channel=channel)
                    elif kind in (ev.SectionStart, ev.DeviceState):
                        key = (e.section_id, e.idstr, e.instance_id)
                        if key not in seen:
                            seen.add(key)
                            report["sections"].append({
                                "section_id": e.section_id, "idstr": e.idstr,
                                "instance_id": e.instance_id, "version_id": e.version_id})
                        if kind is ev.DeviceState:
                            if e.idstr == "cpu":
                                cpus.add(e.instance_id)
                                report["vcpus"] = len(cpus)
                            name = e.idstr if e.instance_id == 0 else f"{e.idstr}/{e.instance_id}"
                            report["devices"][name] = json_values(e.values)
                    elif kind is ev.RamBlockList:
                        ram["blocks"] = [
                            {"idstr": b.idstr, "used_length": b.used_length} for b in e.blocks]
                        if mem_path and image is None:
                            for b in e.blocks:
                                if b.used_length % TARGET_PAGE_SIZE:
                                    raise RemoteProtocolError(
                                        f"RAM block '{b.idstr}' length {b.used_length:#x} "
                                        "is not a whole number of pages", at, channel)
                            image = RamImage(mem_path, [(b.idstr, b.used_length)
                                                        for b in e.blocks], TARGET_PAGE_SIZE)
                            loader = RamLoader(image.blocks, image.received, TARGET_PAGE_SIZE)
                    elif kind is ev.Eof:
                        report["complete"] = True
                    elif kind is ev.VMDescription:
                        report["vmdesc"] = e.data
                        return finish()
                    elif kind.__name__ not in ("FileHeader", "SectionPart", "SectionEnd",
                                               "SectionFooter", "RamEOS", "RamFlush"):
                        report["commands"].append(kind.__name__)
                if not chunk:
                    if report["complete"]:
                        return finish()
                    raise ChannelClosedError(f"{path}: stream ended before EOF")
    finally:
        loader = None
        if image is not None:
            image.discard()     # after commit() there is nothing left to remove


def run_load(args) -> int:
    try:
        # The stream says how many vCPUs it has; --vcpus is a check.
        report = analyze_stream(args.file, vcpus=args.vcpus, mem_path=args.mem_path,
                                machine=args.machine)
    except OSError as exc:
        print(f"engine: error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError:
        raise   # a bad option (unknown --machine): the CLI's usage error
    except EngineError as exc:
        print(f"engine: error: {args.file}: {exc}", file=sys.stderr)
        write_json(args.json, {"file": args.file, "error": str(exc)})
        return EXIT_FAILED
    print(f"file: {args.file}")
    print(f"machine: {report['machine']}")
    print(f"vcpus: {report['vcpus']}")
    for s in report["sections"]:
        print(f"section {s['section_id']}: {s['idstr']} instance {s['instance_id']} "
              f"version {s['version_id']}")
    for b in report["ram"]["blocks"]:
        print(f"ram block {b['idstr']}: {b['used_length']} bytes")
    print(f"ram pages: {report['ram']['pages']} normal, {report['ram']['zero_pages']} zero")
    if report["ram"]["xbzrle_pages"]:
        print(f"xbzrle pages: {report['ram']['xbzrle_pages']}")
    for name, values in report["devices"].items():
        print(f"device {name}: {values}")
    if report["commands"]:
        print("commands: " + ", ".join(report["commands"]))
    print("vmdesc: " + ("present" if report["vmdesc"] is not None else "absent"))
    write_json(args.json, report)
    return EXIT_OK
