"""Read a process tree's CPU, memory and descriptors from /proc (Linux only).

Theory of operation: a router may be one process or several (uWSGI runs a
master and a forked gateway), so every figure is summed over the tree rooted
at the process the benchmark started.  The tree is found by scanning
/proc/*/stat for parent pids on every call, so processes forked or respawned
mid-run are counted.

CPU comes in two flavours:

* ``tree_cpu_seconds``: utime + stime + cutime + cstime from /proc/PID/stat,
  in clock ticks (10 ms).  cutime/cstime carry the time of children that
  already exited and were reaped, so a respawned worker is not lost.  This is
  the figure the benchmark reports for the steady-load measurements.
* ``tree_sched_seconds``: the run time in nanoseconds from
  /proc/PID/task/*/schedstat, summed over every thread of every live process.
  Used for the short bulk transfers, where 10 ms ticks are too coarse.

Every reader tolerates processes that vanish between listing and reading.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "r") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def stat_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    text = _read("/proc/%d/stat" % pid)
    if not text:
        return None
    close = text.rfind(")")
    if close < 0:
        return None
    return text[close + 2:].split()


def start_time(pid: int) -> Optional[int]:
    """The process start time in ticks since boot: with the pid it names one process for good."""
    f = stat_fields(pid)
    return int(f[19]) if f else None


def _parents() -> Dict[int, int]:
    parents: Dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = stat_fields(int(name))
        if f:
            parents[int(name)] = int(f[1])
    return parents


def tree_pids(root: int) -> List[int]:
    """``root`` and all its live descendants (root first); empty if root is gone."""
    parents = _parents()
    if root not in parents:
        return []
    children: Dict[int, List[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: List[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime + cutime + cstime of the given processes, in seconds."""
    ticks = 0
    for pid in pids:
        f = stat_fields(pid)
        if f:
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    return cpu_seconds(tree_pids(root))


def tree_sched_seconds(root: int) -> float:
    """Run time of every thread in the tree, from schedstat (ns resolution)."""
    total = 0
    for pid in tree_pids(root):
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            text = _read("/proc/%d/task/%s/schedstat" % (pid, tid))
            if text:
                total += int(text.split()[0])
    return total / 1e9


def _status_kib(pid: int, field: str) -> int:
    text = _read("/proc/%d/status" % pid)
    if not text:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(root: int) -> int:
    """Sum of VmRSS over the tree."""
    return sum(_status_kib(pid, "VmRSS") for pid in tree_pids(root))


def tree_hwm_kib(root: int) -> int:
    """Sum of VmHWM (peak RSS) over the tree."""
    return sum(_status_kib(pid, "VmHWM") for pid in tree_pids(root))


def tree_pss_kib(root: int) -> int:
    """Sum of Pss over the tree (pages shared between forked processes counted once)."""
    total = 0
    for pid in tree_pids(root):
        text = _read("/proc/%d/smaps_rollup" % pid)
        for line in (text or "").splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total


def tree_fd_count(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            total += len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            pass
    return total


def _cpu_line() -> List[int]:
    text = _read("/proc/stat") or ""
    for line in text.splitlines():
        if line.startswith("cpu "):
            return [int(x) for x in line.split()[1:]]
    return [0] * 8


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (user, nice, system, irq, softirq), in seconds."""
    v = _cpu_line()
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK


def machine_steal_seconds() -> float:
    """CPU time the hypervisor gave to someone else while we wanted it, in seconds."""
    v = _cpu_line()
    return v[7] / CLK_TCK if len(v) > 7 else 0.0


def snapshot_pids(root: int) -> List[Tuple[int, int]]:
    """(pid, start time) of every process in the tree, to signal them safely later."""
    out = []
    for pid in tree_pids(root):
        st = start_time(pid)
        if st is not None:
            out.append((pid, st))
    return out
