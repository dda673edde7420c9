"""Turn the benchmark's samples into the comparison table.

Every cell is the median over all samples of that measurement (rounds, and
repetitions for the transfers); where there is more than one sample the cell
also shows +-half the min-max range in percent of the median, so the noise is
visible next to the figure.  The ratio column is ours/uwsgi of the medians.
The goal column says which way is good; the last column only compares the
measured ratio with the goal and asserts nothing.

The columns are those of TARGETS plus any other router found in the samples
(bench.py --floor adds ``floor`` and ``floor+scan`` to the rps phase): each
extra one gets its cells and a ratio column of its own against uwsgi, and is
never graded.
"""

from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

TARGETS = ("direct", "uwsgi", "ours")
REFERENCE = "uwsgi"     # every ratio is against it
GRADED = "ours"         # the one router the goals apply to

# metric key -> (goal text, predicate on the ratio or on ours' value, applies to)
GOALS = {
    "rps": (">= 0.75x", lambda r: r >= 0.75, "ratio"),
    "cpu10k": ("<= 1.40x", lambda r: r <= 1.40, "ratio"),
    "mibps": (">= 1.00x", lambda r: r >= 1.0, "ratio"),
    "kib_per_conn": ("<= 2 KiB", lambda v: v <= 2.0, "value"),
}


def median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread_pct(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    m = median(xs)
    if len(xs) < 2 or not m:
        return None
    return (max(xs) - min(xs)) / 2 / m * 100


def fmt_num(v: Optional[float], digits: int = 0) -> str:
    if v is None:
        return "-"
    if digits == 0:
        return "{:,.0f}".format(v)
    return "{:,.{d}f}".format(v, d=digits)


def fmt_cell(xs: Sequence[float], digits: int = 0) -> str:
    m = median(xs)
    if m is None:
        return "-"
    s = spread_pct(xs)
    text = fmt_num(m, digits)
    if s is not None:
        text += " \u00b1{:.0f}%".format(s)
    return text


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else "{:.2f}".format(r)


def section_targets(names: Iterable[str]) -> List[str]:
    """TARGETS, then whichever other targets a section's samples name (e.g. the floor proxies)."""
    return list(TARGETS) + sorted(set(names) - set(TARGETS))


def extra_ratios(values: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    """value/uwsgi for every target with a value that is not in TARGETS."""
    return {t: ratio(v, values.get(REFERENCE)) for t, v in values.items() if t not in TARGETS}


class Row:
    __slots__ = ("label", "cells", "ratio", "ratios", "goal", "verdict")

    def __init__(self, label: str, cells: Dict[str, str], ratio_value: Optional[float] = None,
                 goal_key: Optional[str] = None, ours_value: Optional[float] = None,
                 others: Optional[Dict[str, Optional[float]]] = None):
        """``ratio_value`` is ours/uwsgi (the graded one); ``others`` maps an extra target to its ratio."""
        self.label = label
        self.cells = cells
        self.ratio = fmt_ratio(ratio_value)
        self.ratios = {t: fmt_ratio(r) for t, r in (others or {}).items()}
        self.goal = ""
        self.verdict = ""
        if goal_key:
            text, ok, applies = GOALS[goal_key]
            self.goal = text
            probe = ratio_value if applies == "ratio" else ours_value
            if probe is not None:
                self.verdict = "ok" if ok(probe) else "MISS"


def _metric_row(label: str, samples: Dict[str, List[float]], digits: int = 0,
                goal_key: Optional[str] = None, routers_only: bool = False) -> Row:
    """Medians of ``samples`` (target -> values); ``routers_only`` leaves the direct cell empty."""
    shown = [t for t in samples if not (routers_only and t == "direct")]
    cells = {t: fmt_cell(samples[t], digits) if t in shown else "" for t in samples}
    medians = {t: median(samples[t]) for t in shown}
    r = ratio(medians.get(GRADED), medians.get(REFERENCE))
    return Row(label, cells, r, goal_key, others=extra_ratios(medians))


def build_rows(summary: dict, concurrency: Sequence[int]) -> List[Row]:
    rows: List[Row] = []
    rps = summary.get("rps", {})
    if rps:
        cols = section_targets(t for t, _c in rps)

        def pick(c: int, key: str) -> Dict[str, List[float]]:
            return {t: [s[key] for s in rps.get((t, c), [])] for t in cols}

        for c in concurrency:
            rows.append(_metric_row("requests/s c=%d" % c, pick(c, "rps"), 0, "rps"))
        for c in concurrency:
            rows.append(_metric_row("latency p50 us c=%d" % c, pick(c, "p50_us")))
        for c in concurrency:
            rows.append(_metric_row("latency p99 us c=%d" % c, pick(c, "p99_us")))
        for c in concurrency:
            rows.append(_metric_row("router CPU s/10k req c=%d" % c, pick(c, "router_cpu10k"), 3,
                                    "cpu10k", routers_only=True))
        for c in concurrency:
            rows.append(_metric_row("router CPU use c=%d (CPUs)" % c, pick(c, "router_util"), 2,
                                    routers_only=True))
        cmax = max(concurrency)
        rows.append(_metric_row("backend CPU s/10k req c=%d" % cmax, pick(cmax, "backend_cpu10k"), 3))
        errs = {t: sum(s["errors"] for c in concurrency for s in rps.get((t, c), [])) for t in cols}
        slow = {t: sum(s["slow_1s"] for c in concurrency for s in rps.get((t, c), [])) for t in cols}
        rows.append(Row("errors (all rps cells)", {t: str(errs[t]) for t in cols}))
        rows.append(Row("requests taking >= 1 s", {t: str(slow[t]) for t in cols}))
    hwm = summary.get("hwm", {})
    routers = [t for t in section_targets(hwm) if t != "direct"]
    for phase in ("rps", "bulk"):
        vals = {t: hwm.get(t, {}).get(phase) for t in routers}
        if any(v is not None for v in vals.values()):
            cells = {t: fmt_num(v / 1024.0, 1) if v is not None else "" for t, v in vals.items()}
            rows.append(Row("peak RSS MiB after %s" % phase, cells, ratio(vals.get(GRADED), vals.get(REFERENCE)),
                            others=extra_ratios({t: v for t, v in vals.items() if v is not None})))
    bulk = summary.get("bulk", {})
    if bulk:
        mib = summary.get("bulk_mib", 64)
        cols = section_targets(t for t, _d in bulk)
        for d in ("upload", "download"):
            samples = {t: [s["mibps"] for s in bulk.get((t, d), [])] for t in cols}
            rows.append(_metric_row("%d MiB %s MiB/s" % (mib, d), samples, 0, "mibps"))
        for d in ("upload", "download"):
            samples = {t: [s["router_cpu_gib"] for s in bulk.get((t, d), [])] for t in cols}
            rows.append(_metric_row("router CPU s/GiB %s" % d, samples, 2, routers_only=True))
        errs = {t: sum(s["errors"] for d in ("upload", "download") for s in bulk.get((t, d), []))
                for t in cols}
        rows.append(Row("transfer errors", {t: str(errs[t]) for t in cols}))
    idle = summary.get("idle", {})
    if idle:
        cols = section_targets(idle)

        def irow(label: str, key: str, scale: float = 1.0, digits: int = 1, goal_key: Optional[str] = None) -> Row:
            vals = {t: idle[t].get(key) for t in idle}
            cells = {t: (fmt_num(vals[t] * scale, digits) if vals.get(t) is not None else "") for t in cols}
            ours = vals.get(GRADED)
            return Row(label, cells, ratio(ours, vals.get(REFERENCE)), goal_key,
                       ours * scale if ours is not None else None,
                       others=extra_ratios({t: v for t, v in vals.items() if v is not None}))

        n = max(v.get("requested", 0) for v in idle.values())
        held = {t: "%d/%d" % (idle[t]["open"], idle[t]["requested"]) if t in idle else "" for t in cols}
        rows.append(Row("idle conns held", held))
        rows.append(irow("RSS MiB fresh process", "rss_fresh_kib", 1 / 1024.0))
        rows.append(irow("RSS MiB with %d idle conns" % n, "rss_idle_kib", 1 / 1024.0))
        rows.append(irow("PSS MiB with %d idle conns" % n, "pss_idle_kib", 1 / 1024.0))
        rows.append(irow("RSS KiB per idle conn", "kib_per_conn", 1.0, 2, "kib_per_conn"))
        rows.append(irow("router CPU s while holding", "hold_cpu_s", 1.0, 2))
        closed = {t: str(idle[t]["closed_by_peer"]) if t in idle else "" for t in cols}
        rows.append(Row("idle conns closed by router", closed))
        serves = {t: ("yes" if idle[t]["serves_after"] else "NO") if t in idle else "" for t in cols}
        rows.append(Row("serves a request afterwards", serves))
    return rows


def render(rows: List[Row]) -> str:
    """The table: a column per target, ours/uwsgi, a ratio column per extra target, goal and verdict."""
    extras = sorted({t for r in rows for t in list(r.cells) + list(r.ratios)} - set(TARGETS))
    cols = list(TARGETS) + extras
    header = ["metric"] + cols + ["%s/%s" % (t, REFERENCE) for t in [GRADED] + extras] + ["goal", ""]
    table = [header] + [[r.label] + [r.cells.get(t, "") for t in cols] + [r.ratio]
                        + [r.ratios.get(t, "-" if r.cells.get(t) else "") for t in extras] + [r.goal, r.verdict]
                        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = []
    for n, line in enumerate(table):
        cols = [line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in range(1, len(line) - 2)]
        cols += [line[-2].ljust(widths[-2]), line[-1]]
        out.append("  ".join(cols).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def background_line(bg: Sequence[float], retried: int, before: Optional[float] = None) -> str:
    if not bg:
        return "background CPU: not measured"
    head = "" if before is None else "{:.0f}% before the run; ".format(before * 100)
    return ("background CPU (other processes, % of one CPU): {}per rps measurement median {:.0f}%, max {:.0f}%; "
            "measurements repeated because of a burst: {}".format(head, median(bg) * 100, max(bg) * 100, retried))


def steal_line(steal: Sequence[float]) -> str:
    if not steal:
        return "steal: not measured"
    return ("CPU stolen by the hypervisor during rps measurements (% of one CPU): median {:.0f}%, max {:.0f}%"
            .format(median(steal) * 100, max(steal) * 100))


def goal_summary(rows: List[Row]) -> Tuple[int, int]:
    graded = [r for r in rows if r.verdict]
    return sum(1 for r in graded if r.verdict == "ok"), len(graded)
