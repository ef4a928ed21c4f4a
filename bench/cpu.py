"""CPU seconds per process of this machine, grouped by role (Ray actors by their title), so a
benchmark can say where the serving path spends its CPU. Linux /proc only."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _label(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "benchmark client"
    if cmdline.startswith("ray::"):
        return cmdline.split()[0][5:]  # e.g. ServeReplica:ours:Router, ProxyActor
    exe = os.path.basename(cmdline.split("\0")[0].split()[0]) if cmdline else "?"
    return exe


def snapshot() -> dict[str, float]:
    """User + system CPU seconds so far of every process, summed per label."""
    out: dict[str, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        secs = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        label = _label(int(d.name), cmdline)
        out[label] = out.get(label, 0.0) + secs
    return out


def delta(before: dict[str, float], after: dict[str, float], min_s: float = 0.05) -> dict[str, float]:
    """CPU seconds spent per label between two snapshots (labels under `min_s` left out), largest first."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in d.items() if v >= min_s), key=lambda kv: -kv[1]))
