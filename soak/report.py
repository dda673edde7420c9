"""The soak's final table: slopes of RSS and descriptors, failures classified.

Theory of operation
-------------------
Slopes are least-squares fits of the samples of one role (``A master``,
``A router 1``...) against time, in KiB per minute and descriptors per minute, with a
95 % interval (slope +- 2 standard errors): a slope whose interval holds 0 is
indistinguishable from zero.  Two fits per role:

* ``across``: every sample of the role, whichever pid held it (for router processes
  without the first :data:`WARM_UP_SAMPLES` of each pid).  The master keeps its pid
  and re-executes itself on a reload, so for it this is the whole run.  Router
  processes are replaced at every reload: what grows across generations shows here.
* ``within``: the pooled slope inside each pid's life (each pid its own intercept),
  leaving out the first :data:`WARM_UP_SAMPLES` samples of each router process (a
  freshly forked process grows while it first touches its pages); what a process
  accumulates during its own life shows here, even if a reload resets it every minute.

A failed request is avoidable unless a node it could have been on (the one named in
the partial answer, else any) was dying or leaving (from the signal until it was gone)
at some time between the request's start and its end (with one second of slack on
each side).  Avoidable failures are labelled "during a reload" when
a reload of their router fell in the same window (two seconds of slack).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple


#: KiB: a fitted change below this over the whole run is no trend (one page that
#: becomes resident half-way shows as a fitted change of about 1.5 pages)
RSS_RESOLUTION = 8

#: samples of each router process left out of the "within" fit (its warm-up)
WARM_UP_SAMPLES = 2


def fit(points: Sequence[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
    """(slope, standard error) of y against x by least squares; None under 3 points."""
    n = len(points)
    if n < 3:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in points)
    return slope, math.sqrt(resid / (n - 2) / sxx)


def pooled_fit(groups: Dict[int, List[Tuple[float, float]]]) -> Optional[Tuple[float, float]]:
    """Slope shared by every group, each group with its own intercept."""
    sxx = sxy = 0.0
    centred: List[Tuple[float, float]] = []
    for points in groups.values():
        if len(points) < 2:
            continue
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        for x, y in points:
            centred.append((x - mx, y - my))
            sxx += (x - mx) ** 2
            sxy += (x - mx) * (y - my)
    dof = len(centred) - sum(1 for p in groups.values() if len(p) >= 2) - 1
    if sxx == 0 or dof < 1:
        return None
    slope = sxy / sxx
    resid = sum((y - slope * x) ** 2 for x, y in centred)
    return slope, math.sqrt(resid / dof / sxx)


def _cell(f: Optional[Tuple[float, float]], unit: float, minutes: float) -> str:
    """``slope ±2SE`` and a verdict: ``~0`` when the interval holds zero or the fitted
    change over the whole run is under one *unit* (:data:`RSS_RESOLUTION` KiB, one
    descriptor: the resolution of the measurement), else ``NONZERO``."""
    if f is None:
        return "n/a"
    slope, se = f
    zero = "~0" if abs(slope) <= 2 * se or abs(slope) * minutes < unit else "NONZERO"
    return "%+8.2f ±%6.2f %s" % (slope, 2 * se, zero)


def slope_table(samples) -> List[str]:
    by_role: Dict[Tuple[str, str], list] = defaultdict(list)
    for t, router, role, pid, rss, fds in samples:
        if role != "draining":
            by_role[(router, role)].append((t, pid, rss, fds))
    lines = ["%-14s %5s %5s  %-28s %-28s %-26s %-26s %s" % (
        "role", "n", "pids", "RSS KiB/min across", "RSS KiB/min within", "fds/min across",
        "fds/min within", "RSS KiB first/last/max, fds first/last/max")]
    for (router, role), rows in sorted(by_role.items()):
        pids = {pid for _, pid, _, _ in rows}
        minutes = (rows[-1][0] - rows[0][0]) / 60 if len(rows) > 1 else 0.0
        rss_groups: Dict[int, list] = defaultdict(list)
        fd_groups: Dict[int, list] = defaultdict(list)
        seen: Counter = Counter()
        for t, pid, rss, fds in rows:
            seen[pid] += 1
            if seen[pid] <= WARM_UP_SAMPLES and role != "master":
                continue    # a fresh process touching its pages for the first time
            rss_groups[pid].append((t / 60, rss))
            fd_groups[pid].append((t / 60, fds))
        warm = [(t, rss, fds) for pid, points in rss_groups.items()
                for (t, rss), (_, fds) in zip(points, fd_groups[pid])]
        lines.append("%-14s %5d %5d  %-28s %-28s %-26s %-26s %d/%d/%d, %d/%d/%d" % (
            "%s %s" % (router, role), len(rows), len(pids),
            _cell(fit([(t, r) for t, r, _ in warm]), RSS_RESOLUTION, minutes),
            _cell(pooled_fit(rss_groups), RSS_RESOLUTION, minutes),
            _cell(fit([(t, f) for t, _, f in warm]), 1, minutes),
            _cell(pooled_fit(fd_groups), 1, minutes),
            rows[0][2], rows[-1][2], max(r for _, _, r, _ in rows),
            rows[0][3], rows[-1][3], max(f for _, _, _, f in rows)))
    return lines


def draining_lines(samples) -> List[str]:
    spans: Dict[Tuple[str, int], List[float]] = {}
    per_time: Counter = Counter()
    for t, router, role, pid, rss, fds in samples:
        if role == "draining":
            span = spans.setdefault((router, pid), [t, t])
            span[1] = t
            per_time[(router, t)] += 1
    if not spans:
        return ["old generations: none seen draining at a sample"]
    longest = max(spans.items(), key=lambda kv: kv[1][1] - kv[1][0])
    return ["old generations seen draining: %d processes; at most %d at once; the longest was "
            "seen for %.0f s (router %s pid %d)" % (
                len(spans), max(per_time.values()), longest[1][1] - longest[1][0],
                longest[0][0], longest[0][1])]


def generation_lines(samples) -> List[str]:
    """Each router role's RSS (KiB) at the last sample of each of its processes, in
    order: growth that each generation starts from anew is not a trend here."""
    last: Dict[Tuple[str, str], Dict[int, int]] = defaultdict(dict)
    for t, router, role, pid, rss, fds in samples:
        if role.startswith("router"):
            last[(router, role)][pid] = rss
    if not any(len(v) > 1 for v in last.values()):
        return []
    return ["last RSS of each generation, %s %s: %s" % (router, role, " ".join(str(v) for v in by_pid.values()))
            for (router, role), by_pid in sorted(last.items())]


def judge(result, events) -> str:
    if result.kind.startswith("stalled reader") and result.node == "own1":
        # This package's workers take the client's descriptor (fd passing) and write to
        # it themselves: the router is out of that exchange, and the worker gives up a
        # write after 4 s (its --socket-timeout default; the option does not reach the
        # workers).  A node's policy, not the router's.
        return "unavoidable: node own1 timed out writing to a stalled client it took over"
    lo, hi = result.start - 1.0, result.end + 1.0
    for began, what, who, ended in events:
        if what in ("node killed", "node left (graceful)") and began <= hi and ended >= lo:
            if result.node is None or result.node == who:
                return "unavoidable: node %s %s during the request" % (
                    who, "killed" if what == "node killed" else "left")
    for t, what, who, _ in events:
        if what.startswith("reload") and who == result.router and result.start - 2 <= t <= result.end + 2:
            return "AVOIDABLE: during a reload of %s" % who
    return "AVOIDABLE: no node death or reload explains it"


def print_report(soak, interrupted: bool) -> None:
    out: List[str] = []
    w = out.append
    duration = max((r.end for r in soak.results), default=soak.t0) - soak.t0
    w("")
    w("=" * 100)
    w("SOAK REPORT%s: %.1f min of load (last request ended at %.1f min), routers A and B "
      "(--master --fastrouter-processes 2)" % (
          " (INTERRUPTED)" if interrupted else "", soak.args.minutes, duration / 60))
    w("=" * 100)
    w("")
    w("Events: " + ", ".join("%s=%d" % kv for kv in sorted(Counter(
        e[1] for e in soak.events).items())))
    w("")
    w("RSS and descriptors per role (samples every 10 s; slope ± 2 SE per minute; ~0 = "
      "indistinguishable from zero):")
    out.extend("  " + line for line in slope_table(soak.samples))
    out.extend("  " + line for line in draining_lines(soak.samples))
    out.extend("  " + line for line in generation_lines(soak.samples))
    if soak.idle:
        w("")
        w("Idle descriptors and RSS (no load, no old generation), before -> after:")
        before = soak.idle.get("before load", {})
        after = soak.idle.get("after load", {})
        for role in sorted(set(before) | set(after)):
            b, a = before.get(role), after.get(role)
            w("  %-14s fds %s -> %s   RSS KiB %s -> %s" % (
                role, b[1] if b else "-", a[1] if a else "-", b[0] if b else "-", a[0] if a else "-"))
    w("")
    w("Requests by client kind:")
    w("  %-30s %7s %7s %7s   %s" % ("kind", "total", "ok", "failed", "failures by cause"))
    per_kind: Dict[str, list] = defaultdict(list)
    for r in soak.results:
        per_kind[r.kind].append(r)
    for kind in sorted(per_kind):
        rows = per_kind[kind]
        failed = [r for r in rows if not r.ok]
        causes = Counter(r.cause for r in failed)
        w("  %-30s %7d %7d %7d   %s" % (kind, len(rows), len(rows) - len(failed), len(failed),
                                          ", ".join("%s=%d" % kv for kv in sorted(causes.items())) or "-"))
    total = len(soak.results)
    failed = [r for r in soak.results if not r.ok]
    w("  %-30s %7d %7d %7d" % ("ALL", total, total - len(failed), len(failed)))
    w("")
    verdicts = Counter()
    examples: Dict[str, List[str]] = defaultdict(list)
    for r in failed:
        verdict = judge(r, soak.events)
        key = "%s | %s | %s" % (verdict.split(":")[0], r.kind, r.cause)
        verdicts[key] += 1
        if len(examples[key]) < 3:
            examples[key].append("t=%.1f-%.1f s router %s node %s: %s [%s]" % (
                r.start - soak.t0, r.end - soak.t0, r.router, r.node or "?", r.detail, verdict))
    avoidable = sum(n for k, n in verdicts.items() if k.startswith("AVOIDABLE"))
    w("Failures judged (%d avoidable, %d unavoidable):" % (avoidable, len(failed) - avoidable))
    if not verdicts:
        w("  none")
    for key, n in sorted(verdicts.items()):
        w("  %5d  %s" % (n, key))
        for line in examples[key]:
            w("           e.g. %s" % line)
    w("")
    w("Bad requests (the router's reaction; complete bad packets must be closed):")
    for (kind, outcome), n in sorted(soak.bad.items()):
        w("  %5d  %-20s -> %s" % (n, kind, outcome))
    w("Bad subscription datagrams sent: " + ", ".join("%s=%d" % kv for kv in sorted(soak.datagrams.items())))
    w("")
    for name in sorted(soak.stats):
        counts = soak.stats[name]
        seen = Counter(soak.stats_nodes.get(name, []))
        w("Stats %s: %d ok, %d failed; nodes listed for the key: %s" % (
            name, counts["ok"], counts["failed"], ", ".join("%d nodes x%d" % kv for kv in sorted(seen.items()))))
    for line in soak.stats_errors[:5]:
        w("  stats failure: %s" % line)
    w("")
    for name in ("A", "B"):
        path = soak.directory / ("router-%s.log" % name)
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        notable = Counter()
        for line in text.splitlines():
            for word in ("Traceback", "DAMN", "died", "harakiri", "unable", "refused", "error",
                         "timeout", "closed"):
                if word.lower() in line.lower():
                    notable[word] += 1
        w("Router %s log: %d lines; lines containing: %s" % (
            name, len(text.splitlines()), ", ".join("%s=%d" % kv for kv in sorted(notable.items())) or "-"))
    w("Logs and sockets: %s" % soak.directory)
    print("\n".join(out), flush=True)
    try:
        (soak.directory / "report.txt").write_text("\n".join(out) + "\n")
    except OSError:
        pass
