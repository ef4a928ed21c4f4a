"""CPU seconds and resident memory per process of this machine, labelled by role (Ray actors by
their title), so a benchmark can say where the serving path spends its CPU and whether a process
grows. Linux /proc only."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Optional

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _label(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "benchmark client"
    if cmdline.startswith("ray::"):
        return cmdline.split()[0][5:]  # e.g. ServeReplica:ours:Router, ProxyActor
    exe = os.path.basename(cmdline.split("\0")[0].split()[0]) if cmdline else "?"
    return exe


def _processes():
    """(pid, label, the fields of /proc/<pid>/stat after the command name) of every process."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        yield int(d.name), _label(int(d.name), cmdline), stat[stat.rindex(")") + 2:].split()


def snapshot() -> dict[str, float]:
    """User + system CPU seconds so far of every process, summed per label."""
    out: dict[str, float] = {}
    for _, label, fields in _processes():
        secs = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        out[label] = out.get(label, 0.0) + secs
    return out


def resident(root: Optional[int] = None) -> dict[int, tuple[str, int]]:
    """pid -> (label, resident set size in bytes) of every process, or of those descending from
    `root` (a Ray cluster's processes descend from the driver that started it)."""
    procs = {pid: (label, fields) for pid, label, fields in _processes()}
    if root is not None:
        children = collections.defaultdict(list)
        for pid, (_, fields) in procs.items():
            children[int(fields[1])].append(pid)  # ppid
        keep, todo = set(), [root]
        while todo:
            found = children[todo.pop()]
            keep.update(found)
            todo += found
        procs = {pid: v for pid, v in procs.items() if pid in keep}
    return {pid: (label, int(fields[21]) * _PAGE) for pid, (label, fields) in procs.items()}  # rss, in pages


def delta(before: dict[str, float], after: dict[str, float], min_s: float = 0.05) -> dict[str, float]:
    """CPU seconds spent per label between two snapshots (labels under `min_s` left out), largest first."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in d.items() if v >= min_s), key=lambda kv: -kv[1]))
