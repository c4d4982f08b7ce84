"""Groups and per-group policies with the stock client: which options a group sees and their
bounds, per-group cluster counts and worker quotas, and lifetime policies (maximum lifetime,
"no client for N seconds") that stop clusters by themselves and say why.

Groups come from `auth.groups` here (the simple authenticator has none of its own); JWT and
JupyterHub groups go through the same code (test_jwt.py, test_jupyterhub.py).
"""

import socket
import ssl
import subprocess
import sys
import time

import pytest
from dask_gateway import GatewayWarning

from conftest import holds, new_cluster, wait_for, wait_workers

GPU_OPTIONS = [
    {"field": "worker_cores", "type": "int", "default": 1, "min": 1, "max": 8,
     "target": "worker_cores"},
    {"field": "accelerator", "type": "select", "default": "none", "options": ["none", "a100"]},
]


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers(
        "groups",
        admin_users=["groups-admin"],
        auth={"groups": {"gpu": ["gina"], "short": ["sam"], "attended": ["ada"],
                         "ops": ["olga"]},
              "admin_groups": ["ops"]},
        cluster={"max_clusters_per_user": 1},
        groups=[
            {"group": "gpu", "cluster": {"max_clusters_per_user": 2,
                                         "max_workers_per_user": 2,
                                         "options": GPU_OPTIONS}},
            {"group": "short", "cluster": {"max_lifetime": 25}},
            {"group": "attended", "cluster": {"no_client_timeout": 8}},
        ],
    )


def details(server, user, name):
    r = server.http("GET", f"/api/v1/clusters/{name}/details", user=user)
    assert r.status == 200, r
    return r.json()


def test_each_group_sees_its_own_options_and_bounds(server):
    plain = server.gateway("pat").cluster_options()
    gpu = server.gateway("gina").cluster_options()
    assert "accelerator" not in plain and "accelerator" in gpu
    # The server enforces the group's bounds, whatever the client sends.
    for user, cores, status in [("pat", 6, 422), ("gina", 9, 422)]:
        r = server.http("POST", "/api/v1/clusters/", user=user,
                        body={"cluster_options": {"worker_cores": cores}})
        assert r.status == status, r
    r = server.http("POST", "/api/v1/clusters/", user="pat",
                    body={"cluster_options": {"accelerator": "a100"}})
    assert r.status == 422 and "accelerator" in r.json()["error"], r
    assert server.gateway("pat").list_clusters() == []


def test_group_quotas_and_policy_recorded(server):
    gw = server.gateway("gina")
    first = new_cluster(gw, worker_cores=1, accelerator="a100")
    second = new_cluster(gw)
    try:
        assert details(server, "gina", first.name)["group"] == "gpu"
        # Two clusters for the gpu group, one for everyone else.
        r = server.http("POST", "/api/v1/clusters/", user="gina", body={})
        assert r.status == 422 and "maximum per user is 2" in r.json()["error"], r
        # Two workers across both clusters: the second scale is clipped, naming the quota.
        first.scale(2)
        with pytest.warns(GatewayWarning) as rec:
            second.scale(2)
        msgs = [str(w.message) for w in rec]
        assert any("quota of 2 workers per user" in m for m in msgs), msgs
        with first.get_client(set_as_default=False) as client:
            wait_workers(client, 2)
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
    finally:
        first.shutdown()
        second.shutdown()
    pat = server.gateway("pat")
    c = new_cluster(pat)
    try:
        r = server.http("POST", "/api/v1/clusters/", user="pat", body={})
        assert r.status == 422 and "maximum per user is 1" in r.json()["error"], r
        assert details(server, "pat", c.name)["group"] is None
    finally:
        c.shutdown()


def test_admins_by_group_see_whose_clusters_they_are(server):
    c = new_cluster(server.gateway("pat"))
    try:
        # olga is an admin through the ops group: she sees pat's cluster and its owner.
        r = server.http("GET", "/api/v1/clusters/?details", user="olga")
        assert r.status == 200
        assert r.json()[c.name]["owner"] == "pat"
        # Others get 403 on the details, and see nothing in their list.
        r = server.http("GET", f"/api/v1/clusters/{c.name}/details", user="gina")
        assert r.status == 403, r
        assert c.name not in server.http("GET", "/api/v1/clusters/?details", user="gina").json()
        server.gateway("olga").stop_cluster(c.name)
        wait_for(lambda: details(server, "pat", c.name)["status"] == "STOPPED", 30,
                 what="stopped by the admin")
        assert details(server, "pat", c.name)["reason"] == "stopped by olga"
    finally:
        c.shutdown()


def test_a_cluster_past_its_maximum_lifetime_stops_and_says_why(server):
    gw = server.gateway("sam")
    c = new_cluster(gw)
    c.scale(1)
    with c.get_client(set_as_default=False) as client:
        wait_workers(client, 1)
        assert client.submit(lambda: 41 + 1).result(timeout=60) == 42
        d = details(server, "sam", c.name)
        assert d["expires_at"] == d["start_time"] + 25_000
        # Connected or not, the cluster goes at its maximum lifetime.
        wait_for(lambda: details(server, "sam", c.name)["status"] in ("STOPPED", "STOPPING"),
                 60, what="stopped at its maximum lifetime")
    d = details(server, "sam", c.name)
    assert "maximum lifetime of 25" in d["reason"], d
    assert c.name not in [x.name for x in gw.list_clusters()]
    assert "maximum lifetime" in server.log_text()


KERNEL = """
import sys, time
from dask_gateway import Gateway, BasicAuth
gw = Gateway(sys.argv[1], auth=BasicAuth("ada", ""))
cluster = gw.new_cluster(shutdown_on_close=False)
cluster.scale(1)
client = cluster.get_client()
client.wait_for_workers(1, timeout=90)
assert client.submit(sum, [1, 2]).result() == 3
print(cluster.name, flush=True)
time.sleep(3600)
"""


def test_a_cluster_without_clients_stops_after_its_no_client_timeout(server, tmp_path):
    # A notebook kernel: creates a cluster, computes, then dies without closing anything.
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL)
    kernel = subprocess.Popen([sys.executable, str(script), server.url],
                              stdout=subprocess.PIPE, text=True)
    try:
        name = kernel.stdout.readline().strip()
        assert name, "the kernel did not start its cluster"
        # While it lives (its GatewayCluster and Client hold connections), the cluster stays
        # up, polled throughout, well past the 8 s timeout.
        holds(lambda: details(server, "ada", name)["status"] == "RUNNING", 12,
              what="the cluster running while its kernel's client is connected")
    finally:
        kernel.kill()
        kernel.wait()
    gone = time.monotonic()
    wait_for(lambda: details(server, "ada", name)["status"] in ("STOPPED", "STOPPING"),
             60, what="stopped without clients")
    assert time.monotonic() - gone >= 6
    assert "no client connected for 8" in details(server, "ada", name)["reason"]
    assert server.gateway("ada").list_clusters() == []


def client_hello(server_name):
    """The first bytes of a real TLS client for `server_name` (Python's own ClientHello)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def test_a_held_client_hello_is_no_client(server):
    # Anyone who knows a cluster's name can start a TLS handshake with its scheduler through
    # the proxy; holding it open without the cluster's credentials keeps nothing alive.
    gw = server.gateway("ada")
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.close()
    holders = []
    try:
        for _ in range(3):
            s = socket.create_connection((server.host, server.scheduler_port), timeout=30)
            s.sendall(client_hello(f"daskgateway-{name}"))
            assert s.recv(5)[:1] == b"\x16", "the scheduler answered the ClientHello"
            holders.append(s)
        wait_for(lambda: details(server, "ada", name)["status"] in ("STOPPED", "STOPPING"),
                 60, what="stopped without clients")
        assert "no client connected for 8" in details(server, "ada", name)["reason"]
    finally:
        for s in holders:
            s.close()
