"""The fdpass, procs and reload phases of bench.py.

Theory of operation
-------------------
Each phase starts its own routers (names below), measures them with the same
closed-loop load generator and /proc sampling as the rps phase
(``Bench.measure_loadgen``), stops them by PID and leaves a small table of its
own in ``bench.extra_tables`` (its raw samples in ``bench.extra_raw``).

* fdpass: a second backend, ``backend -u SOCK -F``, listens on a UNIX socket
  and takes client descriptors passed with SCM_RIGHTS.  Targets: ``uwsgi``
  (the real FastRouter to that node; it never passes descriptors), ``fd``
  (ours; bodyless requests to a UNIX node are handed over and the router
  waits for the node's verdict), ``trust`` (ours with
  ``--fastrouter-trust-fd-passing``: once the node has taken 8 in a row the
  router closes its side right after the handoff) and ``nofd`` (ours with
  ``--no-fd-passing``).  Two workloads: the small response at every
  concurrency, and 1 MiB responses (``/bytes/1048576``) at c=16.
  The load generator sends an empty CONTENT_LENGTH (``-z``), as nginx does
  for a GET (a request without the var is bodyless too, as in uWSGI).
  Around every measurement the backend is asked for its counters (SIGUSR1,
  "COUNTERS" on its stdout), so the share of requests that arrived with a
  descriptor is known per target.
* procs: ours with one process, with ``--master --fastrouter-processes 2`` (one
  shared listening socket) and with ``--fastrouter-reuse-port`` too (a socket per
  process), uWSGI with ``--fastrouter-processes 1`` and ``2``.  Meant to be run
  with the load generator on its own CPU (``--pin`` / ``PIN=1``, see
  processes.py): the table's title says how the programs were placed.
* reload: for each target a fresh router under c=16 load for
  ``--reload-duration`` s, while the driver sends SIGHUP to the router's main
  pid ``--reloads`` times, evenly spaced over the measured window.  Every
  request has a 5 s timeout; the load generator counts failures by kind and
  the longest stretch without a completed request.  Afterwards: is the main
  pid still there, and does the router still serve?
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional, Sequence

import processes
import report

PHASES = ("fdpass", "procs", "reload")


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: first column left-aligned, the rest right-aligned."""
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = []
    for n, line in enumerate(table):
        cols = [line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in range(1, len(line))]
        out.append("  ".join(cols).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def fmt_ratio(a: Optional[float], b: Optional[float]) -> str:
    r = report.ratio(a, b)
    return "-" if r is None else "{:.2f}".format(r)


def _start(bench, name: str, template: str, backend: Optional[str] = None) -> None:
    bench.templates[name] = template
    bench.start_router(name, backend)


def _alive_or_restart(bench, name: str, backend: Optional[str]) -> None:
    child = bench.routers.get(name)
    if child is not None and not child.alive():
        bench.notes.append("router %s exited (code %s) during the %s phase and was restarted"
                           % (name, child.popen.returncode, name))
        bench.routers.pop(name)
        bench.start_router(name, backend)


def _rps_matrix(bench, drv, phase: str, names: Sequence[str], backend: Optional[str] = None,
                around=None, extra_args: tuple = (),
                concurrency: Optional[Sequence[int]] = None) -> Dict[tuple, List[dict]]:
    """Every round x concurrency x target (rotating order), like the rps phase."""
    a = bench.a
    out: Dict[tuple, List[dict]] = {}
    for rnd in range(a.rounds):
        for ci, conc in enumerate(concurrency or a.extra_concurrency):
            for name in drv.rotate(names, rnd + ci):
                _alive_or_restart(bench, name, backend)
                label = "%s round %d c=%d %s" % (phase, rnd + 1, conc, name)
                before = around() if around else None
                m = bench.with_noise_retry(lambda: bench.measure_rps_once(name, conc, extra_args), label)
                if around:
                    after = around()
                    m["fd_passed"] = after["fd_passed"] - before["fd_passed"]
                    m["backend_requests"] = after["requests"] - before["requests"]
                out.setdefault((name, conc), []).append(m)
                extra = ""
                if "fd_passed" in m:
                    extra = ", fd-passed %d of %d" % (m["fd_passed"], m["backend_requests"])
                drv.log("   %-30s %9.0f req/s, router %.3f CPU s/10k, errors %d%s"
                          % (label, m["rps"], m["router_cpu10k"] or 0, m["errors"], extra))
    return out


def _cells(data: Dict[tuple, List[dict]], names: Sequence[str], conc: int, key: str, digits: int) -> List[str]:
    return [report.fmt_cell([m[key] for m in data.get((n, conc), [])], digits) for n in names]


def _med(data: Dict[tuple, List[dict]], name: str, conc: int, key: str) -> Optional[float]:
    return report.median([m[key] for m in data.get((name, conc), [])])


def _stop(bench, names: Sequence[str]) -> None:
    for name in names:
        bench.stop_router(name)


# ------------------------------------------------------------------ fdpass

# The second fdpass workload: responses this large, where relaying costs the
# router a copy of every byte and a handed-over client costs it nothing.
BIG_RESPONSE = 1 << 20
BIG_CONC = 16

def phase_fdpass(bench, drv) -> None:
    sock = os.path.join(bench.workdir, "node.sock")
    argv = [drv.BACKEND_BIN, "-u", sock, "-F"]
    node = processes.spawn("fdbackend", argv, os.path.join(bench.workdir, "fdbackend.log"),
                           stdout_pipe=True, death_signal=signal.SIGKILL)
    reader = processes.LineReader(node)
    bench.extra_backends.append(node)
    bench.commands["fd backend"] = argv
    if not reader.wait_for("LISTEN ", 10):
        raise drv.BenchError("fd-passing backend did not start:\n" + node.log_tail())

    def counters() -> Dict[str, int]:
        os.kill(node.pid, signal.SIGUSR1)
        line = reader.wait_for("COUNTERS", 5)
        if not line:
            raise drv.BenchError("fd-passing backend gave no counters: " + node.log_tail())
        return {k: int(v) for k, v in processes.parse_kv(line).items()}

    ours = bench.templates["ours"]
    cols = ("uwsgi", "fd", "trust", "nofd")
    names = ("uwsgi_unix", "ours_fd", "ours_trust", "ours_nofd")
    templates = (drv.UWSGI_CMD, ours, ours + " --fastrouter-trust-fd-passing", ours + " --no-fd-passing")
    try:
        for name, tpl in zip(names, templates):
            _start(bench, name, tpl, sock)
        data = _rps_matrix(bench, drv, "fdpass", names, sock, around=counters,
                           extra_args=("-z",))
        big = _rps_matrix(bench, drv, "fdpass 1 MiB", names, sock, around=counters,
                          extra_args=("-z", "-r", str(BIG_RESPONSE)), concurrency=(BIG_CONC,))
    finally:
        _stop(bench, names)
    ratio_cols = ["%s/uwsgi" % c for c in cols[1:]]
    blank = [""] * len(ratio_cols)
    rows = []
    for metric, label, digits in (("rps", "requests/s", 0), ("router_cpu10k", "router CPU s/10k req", 3)):
        for c in bench.a.extra_concurrency:
            u = _med(data, "uwsgi_unix", c, metric)
            rows.append(["%s c=%d" % (label, c)] + _cells(data, names, c, metric, digits)
                        + [fmt_ratio(_med(data, n, c, metric), u) for n in names[1:]])
    for metric, label, digits in (("rps", "requests/s", 0), ("router_cpu10k", "router CPU s/10k req", 3)):
        u = _med(big, "uwsgi_unix", BIG_CONC, metric)
        rows.append(["%s 1 MiB c=%d" % (label, BIG_CONC)] + _cells(big, names, BIG_CONC, metric, digits)
                    + [fmt_ratio(_med(big, n, BIG_CONC, metric), u) for n in names[1:]])

    def every_cell(name: str) -> List[dict]:
        return ([m for c in bench.a.extra_concurrency for m in data.get((name, c), [])]
                + big.get((name, BIG_CONC), []))

    frac = []
    for n in names:
        passed = sum(m["fd_passed"] for m in every_cell(n))
        total = sum(m["backend_requests"] for m in every_cell(n))
        frac.append("{:.3f}".format(passed / total) if total else "-")
    rows.append(["fd-passed fraction (all cells)"] + frac + blank)
    rows.append(["errors (all cells)"] + [str(sum(m["errors"] for m in every_cell(n))) for n in names] + blank)
    bench.extra_tables.append("fd passing to a UNIX-socket node (backend -F)\n"
                              + render_table(["metric"] + list(cols) + ratio_cols, rows))
    bench.extra_raw["fdpass"] = {"%s c=%d" % k: v for k, v in data.items()}
    bench.extra_raw["fdpass"].update({"%s c=%d 1 MiB" % k: v for k, v in big.items()})


# ------------------------------------------------------------------ procs

def phase_procs(bench, drv) -> None:
    ours = bench.templates["ours"]
    two = ours + " --master --fastrouter-processes 2"
    targets = (("uwsgi1", "uwsgi 1p", drv.UWSGI_CMD + " --fastrouter-processes 1"),
               ("uwsgi2", "uwsgi 2p", drv.UWSGI_CMD + " --fastrouter-processes 2"),
               ("ours1", "ours 1p", ours),
               ("ours2", "ours 2p", two),
               ("ours2r", "ours 2p reuseport", two + " --fastrouter-reuse-port"))
    names = tuple(name for name, _label, _tpl in targets)
    try:
        for name, _label, tpl in targets:
            _start(bench, name, tpl)
        data = _rps_matrix(bench, drv, "procs", names)
    finally:
        _stop(bench, names)
    ratios = (("uwsgi 2p/1p", "uwsgi2", "uwsgi1"), ("ours 2p/1p", "ours2", "ours1"),
              ("reuseport 2p/1p", "ours2r", "ours1"), ("reuseport/shared 2p", "ours2r", "ours2"),
              ("ours/uwsgi 2p", "ours2", "uwsgi2"))
    rows = []
    for key, label, digits in (("rps", "requests/s", 0), ("router_cpu10k", "router CPU s/10k req", 3)):
        for c in bench.a.extra_concurrency:
            med = {n: _med(data, n, c, key) for n in names}
            rows.append(["%s c=%d" % (label, c)] + _cells(data, names, c, key, digits)
                        + [fmt_ratio(med[a], med[b]) for _label, a, b in ratios])
    errs = [str(sum(m["errors"] for c in bench.a.extra_concurrency for m in data.get((n, c), []))) for n in names]
    rows.append(["errors (all cells)"] + errs + [""] * len(ratios))
    header = ["metric"] + [label for _name, label, _tpl in targets] + [label for label, _a, _b in ratios]
    bench.extra_tables.append("one against two router processes (%s)\n" % processes.pin_note()
                              + render_table(header, rows))
    bench.extra_raw["procs"] = {"%s c=%d" % k: v for k, v in data.items()}


# ------------------------------------------------------------------ reload

ERROR_KINDS = (("refused", ("err_connect",)), ("reset", ("err_io",)), ("empty", ("err_empty",)),
               ("timeout", ("err_timeout",)), ("bad status/short", ("err_status", "err_short")))


def measure_reload(bench, drv, name: str) -> dict:
    a = bench.a
    bench.restart_router(name)
    pid = bench.routers[name].pid
    argv = [drv.LOADGEN_BIN, "-p", str(bench.ports[name]), "-c", "16", "-d", str(a.reload_duration),
            "-w", "1", "-t", "5000"]
    bench.loadgen_cmds.setdefault("reload", argv)
    sent = []

    def hup_evenly() -> None:
        t0 = time.monotonic()
        for i in range(a.reloads):
            at = t0 + a.reload_duration * (i + 0.5) / a.reloads
            while time.monotonic() < at:
                time.sleep(min(0.01, max(0.0, at - time.monotonic())))
            child = bench.routers[name]
            if child.alive():
                os.kill(pid, signal.SIGHUP)
                sent.append(time.monotonic() - t0)

    m = bench.measure_loadgen(name, 16, argv, during=hup_evenly, duration=a.reload_duration)
    m["hups_sent"] = len(sent)
    m["main_pid_alive"] = bench.routers[name].alive()
    m["serves_after"] = processes.wait_serving(bench.routers[name], bench.ports[name], 15.0)
    bench.stop_router(name)
    return m


def phase_reload(bench, drv) -> None:
    ours = bench.templates["ours"]
    names = ("uwsgi_m", "ours_m1", "ours_m2")
    labels = ("uwsgi --master", "ours --master 1p", "ours --master 2p")
    templates = {"uwsgi_m": drv.UWSGI_CMD, "ours_m1": ours + " --master",
                 "ours_m2": ours + " --master --fastrouter-processes 2"}
    data: Dict[str, List[dict]] = {}
    try:
        for rnd in range(bench.a.rounds):
            for name in drv.rotate(names, rnd):
                bench.templates[name] = templates[name]
                m = measure_reload(bench, drv, name)
                data.setdefault(name, []).append(m)
                kinds = ", ".join("%s %d" % (k, sum(m["err_detail"].get(x, 0) for x in keys))
                                  for k, keys in ERROR_KINDS)
                drv.log("   reload round %d %-8s ok %d, failed %d (%s), longest gap %.0f ms, HUPs %d, "
                          "main pid alive %s, serves after %s"
                          % (rnd + 1, name, m["requests"], m["errors"], kinds, m["max_gap_us"] / 1000.0,
                             m["hups_sent"], m["main_pid_alive"], m["serves_after"]))
    finally:
        _stop(bench, names)

    def med(name: str, fn) -> str:
        v = report.median([fn(m) for m in data.get(name, [])])
        return "-" if v is None else "{:,.0f}".format(v)

    rows = [["requests ok"] + [med(n, lambda m: m["requests"]) for n in names],
            ["requests failed"] + [med(n, lambda m: m["errors"]) for n in names]]
    for kind, keys in ERROR_KINDS:
        rows.append(["  " + kind] + [med(n, lambda m, ks=keys: sum(m["err_detail"].get(x, 0) for x in ks))
                                     for n in names])
    rows.append(["longest gap without a completion (ms)"] + [med(n, lambda m: m["max_gap_us"] / 1000.0)
                                                             for n in names])
    rows.append(["slowest request (ms)"] + [med(n, lambda m: m["max_us"] / 1000.0) for n in names])
    rows.append(["SIGHUPs sent"] + [med(n, lambda m: m["hups_sent"]) for n in names])
    rows.append(["main pid survived / serves afterwards"]
                + ["%s / %s" % ("yes" if all(m["main_pid_alive"] for m in data.get(n, [])) else "NO",
                                "yes" if all(m["serves_after"] for m in data.get(n, [])) else "NO")
                   if data.get(n) else "-" for n in names])
    title = ("graceful reloads: c=16 for %g s, %d x SIGHUP to the main pid, 5 s request timeout (median of %d)"
             % (bench.a.reload_duration, bench.a.reloads, bench.a.rounds))
    bench.extra_tables.append(title + "\n" + render_table(["metric"] + list(labels), rows))
    bench.extra_raw["reload"] = data


def run(bench, phase: str, drv) -> None:
    """Run ``phase`` on ``bench``; ``drv`` is the driver module (its constants, log and helpers)."""
    {"fdpass": phase_fdpass, "procs": phase_procs, "reload": phase_reload}[phase](bench, drv)
