"""HMP ``info migrate`` text for a query-migrate answer (QEMU's
migration-hmp-cmds.c), so numbers can be put next to QEMU's unchanged."""
from __future__ import annotations

from typing import Any, Mapping

from engine.stats.view import MigrationInfo

__all__ = ["format_info_migrate"]


def _socket_uri(addr: Any) -> str:
    if isinstance(addr, Mapping):
        kind = addr.get("type")
        if kind == "inet":
            return f"tcp:{addr.get('host')}:{addr.get('port')}"
        if kind == "unix":
            return f"unix:{addr.get('path')}"
        if kind == "fd":
            return f"fd:{addr.get('str')}"
        if kind == "vsock":
            return f"vsock:{addr.get('cid')}:{addr.get('port')}"
    return str(addr)


def format_info_migrate(info: MigrationInfo,
                        capabilities: Mapping[str, bool] | None = None) -> str:
    """HMP ``info migrate`` text for ``info``, in QEMU's flat layout.

    With ``capabilities``, a first ``capabilities: name: on|off ...`` line
    as QEMU 7.2 prints.  Sizes are printed in kbytes (bytes >> 10), times in
    ms; the dirty-rate, postcopy request, precopy/downtime/postcopy ram and
    zero-copy lines appear only when non-zero.  Members of ``extra`` that
    QEMU prints (xbzrle cache, cpu throttle, blocktime, socket address,
    vfio) follow.  Status ``none`` prints no migration lines, as in QEMU.
    """
    q = info.to_qmp()
    lines: list[str] = []
    if capabilities is not None:
        caps = " ".join(f"{n}: {'on' if v else 'off'}" for n, v in capabilities.items())
        lines.append(f"capabilities: {caps} ")
    if "status" in q:
        line = f"Migration status: {q['status']}"
        if q["status"] == "failed" and q.get("error-desc"):
            line += f" ({q['error-desc']})"
        lines.append(line)
        lines.append(f"total time: {q.get('total-time', 0)} ms")
        if "expected-downtime" in q:
            lines.append(f"expected downtime: {q['expected-downtime']} ms")
        if "downtime" in q:
            lines.append(f"downtime: {q['downtime']} ms")
        if "setup-time" in q:
            lines.append(f"setup: {q['setup-time']} ms")
    ram = q.get("ram")
    if ram is not None:
        lines += [
            f"transferred ram: {ram['transferred'] >> 10} kbytes",
            f"throughput: {ram['mbps']:0.2f} mbps",
            f"remaining ram: {ram['remaining'] >> 10} kbytes",
            f"total ram: {ram['total'] >> 10} kbytes",
            f"duplicate: {ram['duplicate']} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {ram['page-size'] >> 10} kbytes",
            f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes",
            f"pages-per-second: {ram['pages-per-second']}",
        ]
        if ram["dirty-pages-rate"]:
            lines.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages")
        if ram["postcopy-requests"]:
            lines.append(f"postcopy request count: {ram['postcopy-requests']}")
        if ram["precopy-bytes"]:
            lines.append(f"precopy ram: {ram['precopy-bytes'] >> 10} kbytes")
        if ram["downtime-bytes"]:
            lines.append(f"downtime ram: {ram['downtime-bytes'] >> 10} kbytes")
        if ram["postcopy-bytes"]:
            lines.append(f"postcopy ram: {ram['postcopy-bytes'] >> 10} kbytes")
        if ram["dirty-sync-missed-zero-copy"]:
            lines.append("Zero-copy-send fallbacks happened: "
                         f"{ram['dirty-sync-missed-zero-copy']} times")
    xbzrle = q.get("xbzrle-cache")
    if xbzrle is not None:
        lines += [
            f"cache size: {xbzrle['cache-size']} bytes",
            f"xbzrle transferred: {xbzrle['bytes'] >> 10} kbytes",
            f"xbzrle pages: {xbzrle['pages']} pages",
            f"xbzrle cache miss: {xbzrle['cache-miss']} pages",
            f"xbzrle cache miss rate: {xbzrle['cache-miss-rate']:0.2f}",
            f"xbzrle encoding rate: {xbzrle['encoding-rate']:0.2f}",
            f"xbzrle overflow: {xbzrle['overflow']}",
        ]
    if "cpu-throttle-percentage" in q:
        lines.append(f"cpu throttle percentage: {q['cpu-throttle-percentage']}")
    # QEMU 8.1's wording (migration-hmp-cmds.c)
    if "dirty-limit-throttle-time-per-round" in q:
        lines.append(f"dirty-limit throttle time: {q['dirty-limit-throttle-time-per-round']} us")
    if "dirty-limit-ring-full-time" in q:
        lines.append(f"dirty-limit ring full time: {q['dirty-limit-ring-full-time']} us")
    if "postcopy-blocktime" in q:
        lines.append(f"postcopy blocktime: {q['postcopy-blocktime']}")
    if "postcopy-vcpu-blocktime" in q:
        blocktimes = ",".join(str(b) for b in q["postcopy-vcpu-blocktime"])
        lines.append(f"postcopy vcpu blocktime: {blocktimes}")
    if "socket-address" in q:
        lines.append("socket address: [")
        lines += [f"\t{_socket_uri(a)}" for a in q["socket-address"]]
        lines.append("]")
    if "vfio" in q:
        lines.append(f"vfio device transferred: {q['vfio']['transferred'] >> 10} kbytes")
    return "\n".join(lines) + ("\n" if lines else "")
