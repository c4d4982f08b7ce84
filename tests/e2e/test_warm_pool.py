"""Warm schedulers (`cluster.warm_schedulers`): a create is served by a scheduler started ahead,
which then computes for its user only; the pool refills; pool members show in no listing and
count against nobody; their idle timeout counts from the claim; concurrent creates never share
one; a gateway killed with a full pool adopts it; a gateway that shuts down empties it.
"""

import re
import threading
import time

import pytest

from conftest import (HELM, KUBE, new_cluster, wait_computes, wait_for, wait_status,
                      wait_workers)

pytestmark = pytest.mark.chart

ADMIN = "pool-admin"


def pool_gauge(server, state="running"):
    """Unclaimed members in `state`, summed over pools, from the gateway's metrics."""
    text = server.http("GET", "/metrics").body.decode()
    return sum(
        int(n)
        for n in re.findall(
            r'^dask_gateway_warm_schedulers\{pool="[a-z0-9]+",state="%s"\} (\d+)$' % state,
            text,
            re.M,
        )
    )


def counter(server, name):
    text = server.http("GET", "/metrics").body.decode()
    m = re.search(r"^dask_gateway_%s_total (\d+)$" % name, text, re.M)
    return int(m.group(1)) if m else 0


def wait_pool_full(server, size, timeout=180):
    wait_for(lambda: pool_gauge(server) == size and pool_gauge(server, "pending") == 0,
             timeout, what=f"{size} warm schedulers running")


def handed_out(server, name, start=0):
    return f"cluster={name}" in "\n".join(
        line for line in server.log_text(start).splitlines() if "warm scheduler handed out" in line
    )


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers(
        "warm-pool",
        admin_users=[ADMIN],
        cluster={"warm_schedulers": 2, "max_clusters_per_user": 1},
    )


def test_a_create_is_served_warm_and_computes_for_its_user_only(server):
    wait_pool_full(server, 2)
    gw = server.gateway("pool-alice")
    t0 = time.monotonic()
    cluster = new_cluster(gw)
    client = cluster.get_client(set_as_default=False)
    print(f"warm create -> connected: {time.monotonic() - t0:.3f} s")
    assert handed_out(server, cluster.name)
    # Its user's, and only its user's.
    assert [c.name for c in gw.list_clusters()] == [cluster.name]
    assert server.gateway("pool-bob").list_clusters() == []
    admin_view = [c.name for c in server.gateway(ADMIN).list_clusters()]
    assert admin_view == [cluster.name], "pool members show in no listing, not even an admin's"
    cluster.scale(1)
    wait_workers(client, 1, timeout=120)
    wait_computes(client)
    # The pool refills behind it.
    wait_pool_full(server, 2)
    client.close()
    cluster.shutdown()
    gw.close()


def test_pool_members_count_against_nobody_and_cannot_be_reached(server):
    wait_pool_full(server, 2)
    gw = server.gateway("pool-carol")
    # max_clusters_per_user is 1: the two unclaimed schedulers are not carol's.
    cluster = new_cluster(gw)
    assert handed_out(server, cluster.name)
    with pytest.raises(Exception, match="maximum per user is 1"):
        gw.new_cluster()
    cluster.shutdown()
    # Nobody can name a pool member: the API answers as for an unknown cluster.
    log = server.log_text()
    started = set(re.findall(r"warm scheduler started.*cluster=(\S+)", log))
    claimed = set(re.findall(r"warm scheduler handed out.*cluster=(\S+)", log))
    unclaimed = started - claimed
    assert len(unclaimed) >= 2, (started, claimed)
    for name in unclaimed:
        r = server.http("GET", f"/api/v1/clusters/{name}", user=ADMIN)
        assert r.status == 404, (name, r)
        # Nor its dashboard, to anyone who learnt the name.
        r = server.http("GET", f"/clusters/{name}/status")
        assert r.status == 404, (name, r)
        # Stopping an unknown cluster is done (204), and stops nothing.
        r = server.http("DELETE", f"/api/v1/clusters/{name}", user=ADMIN)
        assert r.status == 204, (name, r)
    time.sleep(1)
    log = server.log_text()
    for name in unclaimed:
        assert f"stopping cluster cluster={name}" not in log, name
    gw.close()


def test_concurrent_creates_never_share_a_warm_scheduler(server):
    wait_pool_full(server, 2)
    users = [f"pool-burst-{i}" for i in range(4)]
    names, errors = {}, []

    def create(u):
        try:
            gw = server.gateway(u)
            names[u] = new_cluster(gw, shutdown_on_close=False).name
            gw.close()
        except Exception as e:  # noqa: BLE001
            errors.append((u, e))

    threads = [threading.Thread(target=create, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len(set(names.values())) == len(users), names
    for u in users:
        gw = server.gateway(u)
        assert [c.name for c in gw.list_clusters()] == [names[u]]
        gw.stop_cluster(names[u])
        gw.close()


@pytest.mark.skipif(HELM, reason="the Helm mode's gateway config comes from chart values")
def test_the_idle_timeout_counts_from_the_claim(module_servers):
    srv = module_servers("warm-idle", cluster={"warm_schedulers": 1, "idle_timeout": 4})
    wait_pool_full(srv, 1)
    starts = counter(srv, "warm_scheduler_starts")
    # Pooled longer than its idle timeout, the member asked to stop and was kept.
    time.sleep(8)
    assert pool_gauge(srv) == 1 and counter(srv, "warm_scheduler_starts") == starts
    gw = srv.gateway("pool-idle")
    cluster = new_cluster(gw, shutdown_on_close=False)
    assert handed_out(srv, cluster.name)
    # Its scheduler has been idle for over 8 s, but its user only just got it.
    time.sleep(2)
    assert gw.get_cluster(cluster.name).status.name == "RUNNING"
    # Left alone for the timeout, it is stopped as idle.
    wait_status(gw, cluster.name, "STOPPED", timeout=60)
    gw.close()


@pytest.mark.process_control
def test_a_killed_gateway_adopts_its_pool_and_a_stopped_one_empties_it(module_servers):
    srv = module_servers("warm-kill", cluster={"warm_schedulers": 2})
    wait_pool_full(srv, 2)
    schedulers = srv.processes()
    before = {p.pid for p in schedulers}
    assert len(before) == 2, schedulers
    names = set(re.findall(r"warm scheduler started.*cluster=(\S+)", srv.log_text()))
    assert len(names) == 2, names
    srv.kill9()
    srv.start()
    wait_pool_full(srv, 2)
    assert counter(srv, "warm_scheduler_starts") == 0, "the pool was adopted, not restarted"
    assert {p.pid for p in srv.processes()} == before
    gw = srv.gateway("pool-after-kill")
    cluster = new_cluster(gw)
    assert cluster.name in names
    client = cluster.get_client(set_as_default=False)
    cluster.scale(1)
    wait_workers(client, 1, timeout=120)
    wait_computes(client)
    client.close()
    cluster.close()
    gw.close()
    if KUBE:
        return  # on Kubernetes the pool outlives any one replica (see docs/configuration.md)
    # The other member is still unclaimed: a gateway that shuts down stops it.
    srv.terminate()
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in schedulers), 30,
             what="the pool's schedulers stopped with the gateway")
    assert "stopping a warm scheduler: the gateway shut down" in srv.log_text()
    assert not srv.processes()
