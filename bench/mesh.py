"""Run the multi-host mesh scenarios (network namespaces) and print a table.

The mesh and the scenarios live in ``tests/meshlab.py`` (``tests/test_mesh.py`` runs the
same scenarios with short settings and assertions).  This script runs them with the
settings given on the command line, for this router and, with ``--compare``, for the
uWSGI 2.0 FastRouter in the same mesh, and prints failed requests, the longest time
without an answer and the time until every router's table was right again.

Needs root (``ip netns``) and a real uWSGI (``$UWSGI_BIN``) and nginx.  All traffic stays
inside the namespaces the script creates; they are deleted at the end.

    sudo UWSGI_BIN=.../uwsgi python3 bench/mesh.py --compare --hold 10 --rate 200
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import meshlab  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    defaults = meshlab.Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", choices=sorted(meshlab.SCENARIOS),
                   help="run only this scenario (repeatable; default: all)")
    p.add_argument("--compare", action="store_true", help="also run the mesh with uWSGI 2.0 routers")
    p.add_argument("--only-uwsgi", action="store_true", help="run the mesh with uWSGI routers only")
    p.add_argument("--rounds", type=int, default=1, help="repeat every scenario N times")
    p.add_argument("--hold", type=float, default=10.0, help="seconds of load after convergence")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (all client threads)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--subscribe-freq", type=int, default=defaults.subscribe_freq)
    p.add_argument("--tolerance", type=int, default=defaults.tolerance)
    p.add_argument("--router-timeout", type=int, default=defaults.router_timeout)
    p.add_argument("--nginx-max-fails", type=int, default=defaults.nginx_max_fails,
                   help="nginx max_fails per router (nginx's own default is 1)")
    p.add_argument("--router-master", action="store_true", help="run our routers under --master")
    p.add_argument("--router-args", default="",
                   help="more options for our routers, e.g. \"--fastrouter-retry-after-connect\"")
    p.add_argument("-v", "--verbose", action="store_true", help="print notes and the first failures")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = meshlab.namespaces_available()
    if reason:
        print("cannot build the mesh: %s" % reason, file=sys.stderr)
        return 2
    kinds = ["uwsgi"] if args.only_uwsgi else (["ours", "uwsgi"] if args.compare else ["ours"])
    names = args.scenario or list(meshlab.SCENARIOS)
    results = []
    with tempfile.TemporaryDirectory(prefix="mesh") as tmp, meshlab.Mesh() as mesh:
        for kind in kinds:
            settings = meshlab.Settings(router_kind=kind, rate=args.rate, threads=args.threads,
                                        hold=args.hold, subscribe_freq=args.subscribe_freq,
                                        tolerance=args.tolerance, router_timeout=args.router_timeout,
                                        nginx_max_fails=args.nginx_max_fails,
                                        router_master=args.router_master,
                                        router_args=tuple(shlex.split(args.router_args)))
            for name in names:
                for n in range(args.rounds):
                    work = Path(tmp) / ("%s-%s-%d" % (kind, name, n))
                    work.mkdir()
                    result = meshlab.run_scenario(mesh, work, name, settings)
                    results.append(result)
                    print("%-24s %-6s failed=%d gap=%.2fs convergence=%s" % (
                        name, kind, result.failed, result.longest_gap,
                        "%.2fs" % result.convergence if result.convergence is not None else "-"),
                        file=sys.stderr, flush=True)
                    if args.verbose:
                        for line in result.notes + result.failures:
                            print("    " + line, file=sys.stderr)
    print("settings: rate %.0f/s over %d threads, hold %.0f s, subscribe-freq %d s, tolerance %d s, "
          "router timeout %d s, nginx connect/read timeout %s/%s, max_fails %d, our routers %s"
          % (args.rate, args.threads, args.hold, args.subscribe_freq, args.tolerance,
             args.router_timeout, settings.nginx_connect_timeout, settings.nginx_read_timeout,
             settings.nginx_max_fails, "under --master" if args.router_master else "without a master"))
    print(meshlab.format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
