"""Cluster events (`GET /api/v1/clusters/{name}/events`, `?follow`, `gateway-cli events`): what
happened to a cluster, in order, with the gateway's own decisions (a clipped request) and the
processes' fates (a killed worker and why); only for its owner and admins; kept across a gateway
restart and after the cluster has stopped.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import new_cluster, wait_for, wait_status, wait_workers
from test_cli import cli_binary

pytestmark = pytest.mark.local_only  # Kubernetes events come from the controller: not yet

OWNER, OTHER, ADMIN = "eve-events", "mallory-events", "olga-events"


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers("events", admin_users=[ADMIN], cluster={"max_workers": 3})


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
    assert by_reason["ScaleRequested"]["message"] == f"{OWNER} asked for 3 workers"
    clip = by_reason["RequestClipped"]
    assert clip["type"] == "Warning" and "3" in clip["message"]
    exited = by_reason["WorkerExited"]
    assert exited["type"] == "Warning" and "SIGKILL" in exited["message"], exited
    assert by_reason["Stopped"]["message"] == f"stopped by {OWNER}"

    # The follower saw the same events as they came, and ended when the cluster finished.
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    followed = [json.loads(line) for line in out.splitlines()]
    assert followed == evs


def test_only_the_owner_and_admins_see_a_clusters_events(server):
    gw = server.gateway(OWNER)
    cluster = new_cluster(gw)
    try:
        assert "Created" in reasons(events(server, cluster.name))
        assert reasons(events(server, cluster.name, user=ADMIN)) == reasons(
            events(server, cluster.name))
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


def test_events_outlive_a_gateway_restart_and_the_cluster(server):
    gw = server.gateway(OWNER)
    cluster = new_cluster(gw)
    name = cluster.name
    before = events(server, name)
    server.kill9()
    server.start()
    wait_for(lambda: "Adopted" in reasons(events(server, name)), 30, what="the Adopted event")
    after = events(server, name)
    assert after[:len(before)] == before
    adopted = after[-1]
    assert adopted["reason"] == "Adopted" and "restarted gateway" in adopted["message"]
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
