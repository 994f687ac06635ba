"""``engine load FILE``: read a migration stream file and report what is in it.

Like ``qemu -incoming file:FILE`` without a guest to run, or QEMU's
scripts/analyze-migration.py: every section is parsed (device sections with
the vmstate descriptions of the known machine profiles) and RAM pages are
counted, or written into an image with ``--mem-path``.
"""
from __future__ import annotations

import mmap
import os
import sys

from engine.commands.args import EXIT_FAILED, EXIT_OK
from engine.commands.common import json_values, write_json
from engine.errors import ChannelClosedError, ConfigError, EngineError


def _all_devices(vcpus: int):
    from engine.machine import PROFILES
    table = {}
    for profile in PROFILES.values():
        for dev in profile.devices(vcpus):
            table.setdefault((dev.idstr, dev.instance_id), dev.vmsd)
    return lambda idstr, instance_id: table.get((idstr, instance_id))


def analyze_stream(path: str, *, vcpus: int = 1, mem_path: str | None = None,
                   machine: str | None = None) -> dict:
    """Decode a whole stream file; returns the report (raises on bad input).

    With *machine* (a profile name) the stream must come from that machine
    type, as a QEMU destination insists; by default any known one is read.
    """
    from engine.errors import RemoteProtocolError
    from engine.machine import get_profile
    from engine.stream import events as ev
    from engine.stream.decoder import StreamDecoder

    expected = get_profile(machine).type_name if machine else None

    dec = StreamDecoder(_all_devices(vcpus), channel=os.path.basename(path))
    report: dict = {"file": path, "machine": None, "sections": [], "commands": [],
                    "ram": {"blocks": [], "pages": 0, "zero_pages": 0},
                    "devices": {}, "vmdesc": None, "complete": False}
    images: dict[str, mmap.mmap] = {}
    out_fd = None
    seen = set()
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
                    if isinstance(e, ev.RamPage):
                        report["ram"]["pages"] += 1
                        if images:
                            m = images[e.block]
                            m[e.offset:e.offset + len(e.data)] = e.data
                    elif isinstance(e, ev.RamZero):
                        report["ram"]["zero_pages"] += 1
                        if images:
                            m = images[e.block]
                            m[e.offset:e.offset + 4096] = bytes(4096)
                    elif isinstance(e, ev.Configuration):
                        report["machine"] = e.machine
                        if expected is not None and e.machine != expected:
                            raise RemoteProtocolError(
                                f"Machine type received is '{e.machine}' and local is "
                                f"'{expected}'", offset=at, channel=os.path.basename(path))
                    elif isinstance(e, (ev.SectionStart, ev.DeviceState)):
                        key = (e.section_id, e.idstr, e.instance_id)
                        if key not in seen:
                            seen.add(key)
                            report["sections"].append({
                                "section_id": e.section_id, "idstr": e.idstr,
                                "instance_id": e.instance_id, "version_id": e.version_id})
                        if isinstance(e, ev.DeviceState):
                            name = e.idstr if e.instance_id == 0 else f"{e.idstr}/{e.instance_id}"
                            report["devices"][name] = json_values(e.values)
                    elif isinstance(e, ev.RamBlockList):
                        report["ram"]["blocks"] = [
                            {"idstr": b.idstr, "used_length": b.used_length} for b in e.blocks]
                        if mem_path:
                            out_fd = os.open(mem_path, os.O_RDWR | os.O_CREAT, 0o644)
                            total = sum(b.used_length for b in e.blocks)
                            os.ftruncate(out_fd, total)
                            base = 0
                            for b in e.blocks:
                                images[b.idstr] = mmap.mmap(out_fd, b.used_length, offset=base)
                                base += b.used_length
                    elif isinstance(e, ev.Eof):
                        report["complete"] = True
                    elif isinstance(e, ev.VMDescription):
                        report["vmdesc"] = e.data
                        return report
                    elif type(e).__name__ not in ("FileHeader", "SectionPart", "SectionEnd",
                                                  "SectionFooter", "RamEOS", "RamFlush"):
                        report["commands"].append(type(e).__name__)
                if not chunk:
                    if report["complete"]:
                        return report
                    raise ChannelClosedError(f"{path}: stream ended before EOF")
    finally:
        for m in images.values():
            m.close()
        if out_fd is not None:
            os.close(out_fd)


def run_load(args) -> int:
    try:
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
    for s in report["sections"]:
        print(f"section {s['section_id']}: {s['idstr']} instance {s['instance_id']} "
              f"version {s['version_id']}")
    for b in report["ram"]["blocks"]:
        print(f"ram block {b['idstr']}: {b['used_length']} bytes")
    print(f"ram pages: {report['ram']['pages']} normal, {report['ram']['zero_pages']} zero")
    for name, values in report["devices"].items():
        print(f"device {name}: {values}")
    if report["commands"]:
        print("commands: " + ", ".join(report["commands"]))
    print("vmdesc: " + ("present" if report["vmdesc"] is not None else "absent"))
    write_json(args.json, report)
    return EXIT_OK
