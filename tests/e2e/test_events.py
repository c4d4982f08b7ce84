"""Cluster events (`GET /api/v1/clusters/{name}/events`, `?follow`, `gateway-cli events`): what
happened to a cluster, in order, with the gateway's own decisions (a clipped request) and the
processes' fates (a killed worker and why); only for its owner and admins; kept across a gateway
restart and after the cluster has stopped (local backend). On Kubernetes: the Events of the
cluster's pods (a worker that cannot be scheduled says why) and the gateway's own, which it
records on the DaskCluster.
"""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import OPTIONS_CONFIG, new_cluster, wait_for, wait_status, wait_workers
from test_cli import cli_binary

pytestmark = pytest.mark.not_helm  # the module's own server settings (an admin, a worker cap)

OWNER, OTHER, ADMIN = "eve-events", "mallory-events", "olga-events"


@pytest.fixture(scope="module")
def server(module_servers):
    # On Kubernetes, pods request the cores their settings name (a 4-core worker must not fit).
    return module_servers("events", admin_users=[ADMIN], kube_exact_requests=True,
                          cluster={"max_workers": 3, "options": OPTIONS_CONFIG})


def events(server, name, user=OWNER):
    r = server.http("GET", f"/api/v1/clusters/{name}/events", user=user)
    assert r.status == 200, (r.status, r.body)
    body = r.json()
    assert set(body) == {"events"}
    return body["events"]


def reasons(evs):
    return [e["reason"] for e in evs]


def follow_with_cli(server, name, user=OWNER):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_CONFIG"] = "/nonexistent"
    return subprocess.Popen(
        [cli_binary(), "--address", server.url, "--user", user, "-o", "json", "events", name,
         "--follow"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.local_only  # kills a worker process
def test_a_lifecycle_is_told_in_order_and_followed_live(server):
    gw = server.gateway(OWNER)
    cluster = new_cluster(gw)
    follower = follow_with_cli(server, cluster.name)
    try:
        cluster.scale(5)  # clipped to max_workers 3
        client = cluster.get_client(set_as_default=False)
        wait_workers(client, 3)
        # A worker dies: its nanny is killed (as the kernel's OOM killer would).
        nanny = next(iter(client.run(os.getppid).values()))
        os.killpg(nanny, signal.SIGKILL)
        wait_for(lambda: "WorkerExited" in reasons(events(server, cluster.name)), 30,
                 what="the killed worker's event")
        wait_workers(client, 3)
        client.close()
    finally:
        cluster.shutdown()
    wait_status(gw, cluster.name, "STOPPED")
    wait_for(lambda: "Stopped" in reasons(events(server, cluster.name)), 30,
             what="the Stopped event")

    evs = events(server, cluster.name)
    for e in evs:
        assert set(e) == {"time", "type", "reason", "message", "source"}
        assert e["type"] in ("Normal", "Warning")
    got = reasons(evs)
    order = ["Created", "Running", "ScaleRequested", "RequestClipped", "WorkersStarting",
             "WorkerExited", "Stopping", "Stopped"]
    positions = [got.index(r) for r in order]
    assert positions == sorted(positions), got
    assert [e["time"] for e in evs] == sorted(e["time"] for e in evs)
    by_reason = {e["reason"]: e for e in evs}
    assert by_reason["ScaleRequested"]["message"] == f"{OWNER} asked for 5 workers; 3 granted"
    clip = by_reason["RequestClipped"]
    assert clip["type"] == "Warning" and "3" in clip["message"]
    exited = by_reason["WorkerExited"]
    assert exited["type"] == "Warning" and "SIGKILL" in exited["message"], exited
    assert by_reason["Stopped"]["message"] == f"stopped by {OWNER}"
    # Each of the three workers running at the stop is told about, before the cluster's end.
    stopping = got.index("Stopping")
    assert got[stopping:].count("WorkerStopped") == 3, got
    assert got[-1] == "Stopped", got
    # Workers go first, then the scheduler, which then ends by itself (not killed).
    log = server.data_dir / "clusters" / cluster.name / "logs" / "scheduler.log"
    assert "End scheduler" in log.read_text(), log.read_text()[-2000:]

    # The follower saw the same events as they came, and ended when the cluster finished.
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    followed = [json.loads(line) for line in out.splitlines()]
    assert followed == evs
    # Without --follow, JSON is the same API objects.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_CONFIG"] = "/nonexistent"
    listed = subprocess.run([cli_binary(), "--address", server.url, "--user", OWNER, "-o",
                             "json", "events", cluster.name], env=env, text=True,
                            capture_output=True, timeout=60)
    assert listed.returncode == 0 and json.loads(listed.stdout) == evs, listed


def test_only_the_owner_and_admins_see_a_clusters_events(server):
    gw = server.gateway(OWNER)
    cluster = new_cluster(gw)
    try:
        cluster.scale(1)
        wait_for(lambda: "ScaleRequested" in reasons(events(server, cluster.name)), 30,
                 what="the scale request's event")
        # An admin reads the same history (the owner's later read may have more).
        seen_by_admin = events(server, cluster.name, user=ADMIN)
        assert events(server, cluster.name)[:len(seen_by_admin)] == seen_by_admin
        for path in (f"/api/v1/clusters/{cluster.name}/events",
                     f"/api/v1/clusters/{cluster.name}/events?follow"):
            r = server.http("GET", path, user=OTHER)
            assert r.status == 403, (r.status, r.body)
            assert cluster.name not in json.dumps(r.json()).replace(
                f"cluster {cluster.name}", "")  # only named in the refusal itself
            assert server.http("GET", path).status == 401
        assert server.http("GET", "/api/v1/clusters/nosuchcluster/events",
                           user=OWNER).status == 404
        assert server.http("GET", "/api/v1/clusters/..%2f..%2fetc/events",
                           user=OWNER).status in (404, 422)
    finally:
        cluster.shutdown()


@pytest.mark.local_only  # restarts the gateway process; Kubernetes keeps Events for an hour
def test_events_outlive_a_gateway_restart_and_the_cluster(server):
    gw = server.gateway(OWNER)
    cluster = new_cluster(gw)
    name = cluster.name
    cluster.scale(1)
    with cluster.get_client(set_as_default=False) as client:
        wait_workers(client, 1, timeout=90)
    before = events(server, name)
    server.kill9()
    # A worker that dies while no gateway watches is told about after the restart.
    workers = server.cluster_processes(name, "worker")
    assert workers, "the worker (and its nanny) run"
    for p in workers:
        p.kill()
    psutil.wait_procs(workers, timeout=30)
    server.start()
    wait_for(lambda: "Adopted" in reasons(events(server, name)), 30, what="the Adopted event")
    after = events(server, name)
    assert after[:len(before)] == before
    new = after[len(before):]
    assert reasons(new)[:2] == ["Adopted", "WorkerExited"], new
    adopted, lost = new[0], new[1]
    assert "restarted gateway with 0 workers" in adopted["message"], adopted
    assert lost["type"] == "Warning"
    assert "ended while the gateway was down; it is replaced" in lost["message"], lost
    gw2 = server.gateway(OWNER)
    gw2.stop_cluster(name)
    wait_status(gw2, name, "STOPPED")
    wait_for(lambda: reasons(events(server, name))[-1] == "Stopped", 30,
             what="the Stopped event")
    # A stopped cluster's history stays readable, and following it ends at once.
    start = time.monotonic()
    r = server.http("GET", f"/api/v1/clusters/{name}/events?follow", user=OWNER, timeout=30)
    assert r.status == 200
    assert r.headers.get("content-type", "").startswith("text/event-stream")
    streamed = [json.loads(line[len("data:"):]) for line in r.body.decode().splitlines()
                if line.startswith("data:")]
    assert streamed == events(server, name)
    assert time.monotonic() - start < 20


@pytest.mark.kube_only
def test_a_worker_that_cannot_be_scheduled_says_why(server):
    # Workers of 4 cores on a node of 2: the scheduler's FailedScheduling Event on the pod.
    gw = server.gateway(OWNER)
    cluster = new_cluster(gw, worker_cores=4)
    try:
        cluster.scale(1)

        def failed_scheduling():
            return [e for e in events(server, cluster.name) if e["reason"] == "FailedScheduling"]

        wait_for(failed_scheduling, 60, what="a FailedScheduling event")
        [first, *_] = failed_scheduling()
        assert first["type"] == "Warning"
        assert first["source"].startswith("Pod/dask-worker-"), first
        assert "cpu" in first["message"].lower(), first
        # The controller's and the gateway's own events are on the DaskCluster (what
        # `kubectl describe daskcluster` shows).
        by_reason = {e["reason"]: e for e in events(server, cluster.name)}
        assert by_reason["Running"]["source"] == "controller"
        assert by_reason["Running"]["message"].startswith("the scheduler is up at tls://")
        assert by_reason["ScaleRequested"]["source"] == "gateway"
        assert by_reason["ScaleRequested"]["message"] == f"{OWNER} asked for 1 worker"
        # Another user sees none of it.
        r = server.http("GET", f"/api/v1/clusters/{cluster.name}/events", user=OTHER)
        assert r.status == 403
    finally:
        cluster.shutdown()
