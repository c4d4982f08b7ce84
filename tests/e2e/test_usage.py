"""Usage accounting (`GET /api/v1/usage`, `gateway-cli usage`, the usage counters of
`/metrics`): two users run known resources for a known time and get what they requested × time,
per user, group and cluster; each user sees only their own use, admins everyone's; the totals
survive a gateway kill -9 and restart. On Kubernetes the resources are what the pods request.
"""

import csv
import io
import json
import os
import subprocess
import time

import pytest

from conftest import new_cluster, wait_for, wait_status, wait_workers
from test_cli import cli_binary

pytestmark = pytest.mark.not_helm  # the module's own server settings (an admin, resources)

ALICE, BOB, ADMIN = "ursula-usage", "victor-usage", "wanda-usage"
SCHED_CORES, WORKER_CORES = 0.2, 0.1
SCHED_MEM, WORKER_MEM = 1 << 30, 512 << 20
# Clocks of a test and of the gateway's accounting agree to within this much on each bound.
SLACK = 0.03


@pytest.fixture(scope="module")
def server(module_servers):
    # On Kubernetes, pods request exactly what the settings name (what accounting reads).
    return module_servers("usage", admin_users=[ADMIN], kube_exact_requests=True,
                          groups=[{"group": "analysts", "cluster": {"worker_cores": WORKER_CORES}}],
                          auth={"groups": {"analysts": [BOB]}},
                          cluster={"scheduler_cores": SCHED_CORES, "worker_cores": WORKER_CORES,
                                   "scheduler_memory": SCHED_MEM, "worker_memory": WORKER_MEM,
                                   "options": []})


def usage(server, user=ADMIN, **query):
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    r = server.http("GET", "/api/v1/usage" + (f"?{qs}" if qs else ""), user=user)
    assert r.status == 200, (r.status, r.body)
    return r.json()


def row(report, **key):
    found = [r for r in report["rows"] if all(r[k] == v for k, v in key.items())]
    assert len(found) == 1, (key, report)
    return found[0]


class Span:
    """What a cluster ran, as the test saw it: lower bounds from moments things were surely
    running, upper bounds from moments before they were asked for or after they were gone."""

    def __init__(self):
        self.t = {}

    def mark(self, what):
        self.t[what] = time.time()

    def bounds(self, workers):
        t = self.t
        low_cores = (SCHED_CORES * (t["stop_asked"] - t["running"])
                     + workers * WORKER_CORES * (t["stop_asked"] - t["workers_up"]))
        high_cores = (SCHED_CORES * (t["stopped"] - t["create_asked"])
                      + workers * WORKER_CORES * (t["stopped"] - t["scale_asked"]))
        low_mem = (SCHED_MEM * (t["stop_asked"] - t["running"])
                   + workers * WORKER_MEM * (t["stop_asked"] - t["workers_up"]))
        high_mem = (SCHED_MEM * (t["stopped"] - t["create_asked"])
                    + workers * WORKER_MEM * (t["stopped"] - t["scale_asked"]))
        return (low_cores, high_cores), (low_mem, high_mem)


def run_for(gw, seconds, workers, span):
    span.mark("create_asked")
    cluster = new_cluster(gw)
    wait_status(gw, cluster.name, "RUNNING")
    span.mark("running")
    span.mark("scale_asked")
    client = None
    if workers:
        cluster.scale(workers)
        client = cluster.get_client(set_as_default=False)
        wait_workers(client, workers)
    span.mark("workers_up")
    return cluster, client


def finish(gw, cluster, client, span):
    if client is not None:
        client.close()
    span.mark("stop_asked")
    cluster.shutdown()
    wait_status(gw, cluster.name, "STOPPED")
    span.mark("stopped")


def assert_within(got, bounds, what):
    low, high = bounds
    assert low * (1 - SLACK) <= got <= high * (1 + SLACK), f"{what}: {got} not in [{low}, {high}]"


def test_two_users_get_what_they_requested_times_how_long(server):
    since = int(time.time() * 1000)
    gw_a, gw_b = server.gateway(ALICE), server.gateway(BOB)
    span_a, span_b = Span(), Span()
    a, client_a = run_for(gw_a, 20, 2, span_a)
    b, client_b = run_for(gw_b, 20, 0, span_b)
    try:
        # While they run, their use grows and shows what they request now (on Kubernetes the
        # controller writes a running cluster's changes within 5 s).
        now = SCHED_CORES + 2 * WORKER_CORES
        first = wait_for(lambda: (r := row(usage(server, since=since), user=ALICE))["cores_now"]
                         == pytest.approx(now) and r, 30, what="alice's cores now")
        time.sleep(20)
        assert row(usage(server, since=since), user=ALICE)["core_seconds"] > first["core_seconds"]
    finally:
        finish(gw_a, a, client_a, span_a)
        finish(gw_b, b, client_b, span_b)

    report = usage(server, since=since)
    assert report["by"] == "user" and report["since"] == since
    cores_a, mem_a = span_a.bounds(2)
    cores_b, mem_b = span_b.bounds(0)
    ra, rb = row(report, user=ALICE), row(report, user=BOB)
    assert_within(ra["core_seconds"], cores_a, "alice's core-seconds")
    assert_within(ra["memory_byte_seconds"], mem_a, "alice's memory-byte-seconds")
    assert_within(rb["core_seconds"], cores_b, "bob's core-seconds")
    assert_within(rb["memory_byte_seconds"], mem_b, "bob's memory-byte-seconds")
    assert (ra["clusters_created"], ra["clusters_active"]) == (1, 1)
    assert ra["cores_now"] == 0 and rb["cores_now"] == 0

    # By group: bob's cluster ran under the analysts policy, alice's under the default.
    by_group = usage(server, since=since, by="group")
    assert row(by_group, group="analysts")["core_seconds"] == pytest.approx(rb["core_seconds"])
    assert row(by_group, group=None)["core_seconds"] == pytest.approx(ra["core_seconds"])
    # By cluster: one row each, named.
    by_cluster = usage(server, since=since, by="cluster")
    assert row(by_cluster, cluster=a.name)["user"] == ALICE
    assert row(by_cluster, cluster=b.name)["group"] == "analysts"
    # A window that ends before anything ran is empty; half a window is about half.
    assert usage(server, since=0, until=since - 1)["rows"] == []

    # CSV, for spreadsheets.
    r = server.http("GET", f"/api/v1/usage?since={since}&format=csv", user=ADMIN)
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(r.body.decode())))
    assert {line["user"] for line in lines} >= {ALICE, BOB}

    # gateway-cli usage, as the admin.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_CONFIG"] = "/nonexistent"
    out = subprocess.run([cli_binary(), "--address", server.url, "--user", ADMIN, "-o", "json",
                          "usage", "--since", str(since)], env=env, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["user"]: r for r in json.loads(out.stdout)}
    assert ALICE in rows, out.stdout
    assert rows[ALICE]["core_hours"] == pytest.approx(ra["core_seconds"] / 3600, abs=0.01)
    out = subprocess.run([cli_binary(), "--address", server.url, "--user", ADMIN, "usage",
                          "--since", str(since), "--by", "cluster", "--owner", BOB, "--csv"],
                         env=env, text=True, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(line["user"], line["cluster"]) for line in lines] == [(BOB, b.name)]

    # The counters of /metrics (gateway totals; per-user labels are an option).
    text = server.http("GET", "/metrics").body.decode()
    total = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("dask_gateway_usage_core_seconds_total"))
    assert total >= ra["core_seconds"] + rb["core_seconds"] - 1e-6


def test_users_see_only_their_own_use(server):
    since = int(time.time() * 1000) - 1
    gw = server.gateway(ALICE)
    cluster = new_cluster(gw)
    try:
        wait_status(gw, cluster.name, "RUNNING")
        own = usage(server, user=ALICE, since=since, by="cluster")
        assert [r["cluster"] for r in own["rows"]] == [cluster.name]
        # Bob sees none of it, and may not ask for it.
        theirs = usage(server, user=BOB, since=since, by="cluster")
        assert cluster.name not in json.dumps(theirs)
        r = server.http("GET", f"/api/v1/usage?user={ALICE}", user=BOB)
        assert r.status == 403, (r.status, r.body)
        assert server.http("GET", f"/api/v1/usage?user={BOB}", user=BOB).status == 200
        assert server.http("GET", "/api/v1/usage").status == 401
        # The admin may narrow to one user.
        r = server.http("GET", f"/api/v1/usage?since={since}&user={ALICE}&by=cluster",
                        user=ADMIN)
        assert [x["cluster"] for x in r.json()["rows"]] == [cluster.name]
        # Bad input is refused with a reason, and changes nothing.
        for query, needle in [("since=yesterday", "since"), ("by=planet", "by must be"),
                              ("since=10&until=5", "before until"), ("format=xml", "format"),
                              ("limit=5", "unknown parameter")]:
            r = server.http("GET", f"/api/v1/usage?{query}", user=ALICE)
            assert r.status == 422, (query, r.status, r.body)
            assert needle in r.json()["error"], (query, r.body)
    finally:
        cluster.shutdown()


@pytest.mark.process_control
def test_usage_survives_a_gateway_kill_and_restart(server):
    since = int(time.time() * 1000)
    gw = server.gateway(ALICE)
    span = Span()
    cluster, client = run_for(gw, 0, 1, span)
    name = cluster.name
    client.close()
    time.sleep(5)
    before = row(usage(server, since=since, by="cluster"), cluster=name)["core_seconds"]
    server.kill9()
    time.sleep(5)  # the processes or pods keep running meanwhile, and keep counting
    server.start()
    gw2 = server.gateway(ALICE)
    wait_status(gw2, name, "RUNNING")
    time.sleep(3)
    span.mark("stop_asked")
    gw2.stop_cluster(name)
    wait_status(gw2, name, "STOPPED")
    span.mark("stopped")
    wait_for(lambda: row(usage(server, since=since, by="cluster"), cluster=name)["cores_now"] == 0,
             30, what="the usage record to close")
    after = row(usage(server, since=since, by="cluster"), cluster=name)
    assert after["core_seconds"] > before
    cores, mem = span.bounds(1)
    assert_within(after["core_seconds"], cores, "core-seconds across the restart")
    assert_within(after["memory_byte_seconds"], mem, "memory-byte-seconds across the restart")
