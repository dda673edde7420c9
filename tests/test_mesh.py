"""The router as a citizen of a multi-host mesh built from network namespaces.

Two router hosts, three uWSGI node hosts subscribing to both routers over UDP, an nginx
host with both routers in one ``upstream`` (``uwsgi_next_upstream error timeout``) and
a client host, joined by a bridge; see ``tests/meshlab.py`` for the layout.  Every
scenario runs under a steady load of bodyless GETs through nginx and measures the failed
requests, the longest time without an answer and the time until every router's table
is right again; ``bench/mesh.py`` runs the same scenarios longer and prints a table.

The goal asserted: no failed bodyless request through nginx while at least one router
and one node of the key are alive.  Scenario (b) needs more than that: a SIGSTOPped node
is alive for the kernel (connects to it succeed) but never answers.  A request routed to
it waits for the router's ``--fastrouter-timeout``; when nginx's retry on the other router
lands on the frozen node too, the request fails, until the node leaves the tables once
it misses its announces for ``--subscription-tolerance`` seconds.  With
``--fastrouter-retry-after-connect`` our routers send such a request to another node at
that time-out (and mark the frozen one), so scenario (b) runs with it and asserts the
goal; uWSGI's routers (``ROUTER_UNDER_TEST=uwsgi``) have no such option, and there the
scenario only reports its failures and asserts that the tables converge and that the
mesh answers again afterwards.

With ``ROUTER_UNDER_TEST=uwsgi`` the routers are uWSGI 2.0's (see ``tests/support.py``).

Needs root for ``ip netns``: skipped with the reason where namespaces cannot be made,
failed instead when ``$CI`` is set.  All traffic stays inside the namespaces the module
creates (private addresses on veths that exist only there); they are deleted at the
end, pass or fail.
"""

from __future__ import annotations

import os
import sys

import pytest

import meshlab
from support import Proc, nginx_bin, reference_mode, uwsgi_bin

pytestmark = [pytest.mark.slow, pytest.mark.interop]


@pytest.fixture(scope="module")
def mesh():
    reason = meshlab.namespaces_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail("CI must run the mesh test: %s" % reason)
        pytest.skip(reason)
    uwsgi_bin()
    nginx_bin()
    with meshlab.Mesh() as built:
        yield built


def run(mesh, sock_dir, name, master=False, router_args=()):
    if master and reference_mode():
        pytest.skip("uWSGI's routers always run under a master")
    kind = "uwsgi" if reference_mode() else "ours"
    settings = meshlab.Settings(hold=1.5, router_kind=kind, router_master=master,
                                router_args=tuple(router_args))
    result = meshlab.run_scenario(mesh, sock_dir, name, settings)
    print("\n" + meshlab.format_table([result]))
    for line in result.notes + result.failures:
        print("    " + line)
    return result


def assert_goal(result):
    assert result.failed == 0, "failed requests with a router and a node alive:\n%s" % (
        "\n".join(result.failures))
    assert result.convergence is not None, "the routers' tables were not right within the bound"


def test_killing_a_router_fails_no_request_and_the_restarted_router_relearns_the_nodes(mesh, sock_dir):
    assert_goal(run(mesh, sock_dir, "a-kill-router"))


def test_a_frozen_node_and_a_killed_node_leave_the_tables(mesh, sock_dir):
    """With retry after connect our routers lose no request; uWSGI's routers are
    measured only: requests that nginx's retry also sends to the frozen node fail after
    the routers' --fastrouter-timeout."""
    result = run(mesh, sock_dir, "b-stop-and-kill-nodes",
                 router_args=["--fastrouter-retry-after-connect"])
    if not reference_mode():
        assert_goal(result)
    assert result.convergence is not None, "the routers' tables did not drop n1 and n2"
    assert result.failed_after == 0, "requests failed after the tables were right:\n%s" % (
        "\n".join(result.failures))


def test_a_router_cut_off_and_back_fails_no_request_and_relearns_the_nodes(mesh, sock_dir):
    """Our router expires nodes that miss their announces once a second, so r2's table
    empties while it is cut off; uWSGI 2.0 expires them only when a request looks them up."""
    result = run(mesh, sock_dir, "c-router-link-down-up")
    assert_goal(result)
    if not reference_mode():
        assert any("expired its nodes" in note for note in result.notes), result.notes


def test_a_node_restarted_on_a_new_port_replaces_the_old_one_everywhere(mesh, sock_dir):
    assert_goal(run(mesh, sock_dir, "d-node-new-port"))


def test_a_chained_router_gets_the_nodes_through_resubscribe(mesh, sock_dir):
    result = run(mesh, sock_dir, "e-chained-router")
    assert_goal(result)
    assert "r3 served a request directly: yes" in result.notes, result.notes


@pytest.mark.parametrize("name", ["a-kill-router", "d-node-new-port", "e-chained-router"])
def test_routers_under_master_fail_no_request(mesh, sock_dir, name):
    """Scenarios (a), (d) and (e) with our routers under ``--master``."""
    result = run(mesh, sock_dir, name, master=True)
    assert_goal(result)
    if name == "e-chained-router":
        assert "r3 served a request directly: yes" in result.notes, result.notes


def test_ip_netns_exec_runs_the_program_under_the_pid_we_stop(mesh):
    """``ip netns exec`` execs the program: the PID the mesh stops is the program's own."""
    proc = Proc(mesh.argv("cli", [sys.executable, "-c", "import os; print('pid=%d' % os.getpid())"]))
    try:
        assert int(proc.wait_for_log(r"pid=(\d+)").group(1)) == proc.pid
    finally:
        proc.stop()
