"""Two users and an admin on one gateway (wire-protocol 4.1, 16.11, 16.12, 10.2).

bob must not see or touch alice's cluster, neither through the API nor by presenting his own
cluster's TLS credentials to her scheduler; alice's cluster keeps running throughout. The
configured admin user sees every cluster.
"""

import ssl

import aiohttp
import pytest
from distributed import Client

from conftest import connect, new_cluster, tls_probe, wait_workers

pytestmark = pytest.mark.chart  # two users through the chart too (tests/run-kube)

ALICE = "alice-users"
BOB = "bob-users"
ADMIN = "root-admin"  # configured in shared_server's admin_users


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def alice(server):
    return server.gateway(ALICE)


@pytest.fixture(scope="module")
def bob(server):
    return server.gateway(BOB)


@pytest.fixture(scope="module")
def alice_cluster(alice):
    c = new_cluster(alice)
    c.scale(1)
    yield c
    c.close()


@pytest.fixture(scope="module")
def bob_cluster(bob):
    c = new_cluster(bob)
    yield c
    c.close()


def assert_alice_ok(alice, alice_cluster):
    assert alice.get_cluster(alice_cluster.name).status.name == "RUNNING"
    with alice_cluster.get_client(set_as_default=False) as client:
        wait_workers(client, 1, timeout=90)
        assert client.submit(lambda x: x + 1, 1, pure=False).result(timeout=60) == 2


def test_bob_lists_nothing(alice_cluster, bob):
    assert bob.list_clusters() == []
    everything = bob.list_clusters(status=["pending", "running", "stopping", "stopped", "failed"])
    assert alice_cluster.name not in [c.name for c in everything]


@pytest.mark.parametrize(
    "action",
    ["get_cluster", "scale_cluster", "adapt_cluster", "stop_cluster", "connect"],
)
def test_bob_is_forbidden(alice, bob, alice_cluster, action):
    name = alice_cluster.name
    call = {
        "get_cluster": lambda: bob.get_cluster(name),
        "scale_cluster": lambda: bob.scale_cluster(name, 2),
        "adapt_cluster": lambda: bob.adapt_cluster(name, minimum=0, maximum=2),
        "stop_cluster": lambda: bob.stop_cluster(name),
        "connect": lambda: connect(bob, name),
    }[action]
    with pytest.raises(aiohttp.ClientResponseError) as e:
        call()
    assert e.value.status == 403
    assert alice.get_cluster(name).status.name == "RUNNING"


@pytest.mark.parametrize(
    "method,suffix,body",
    [
        ("GET", "", None),
        ("GET", "?wait", None),
        ("POST", "/scale", {"count": 0}),
        ("POST", "/adapt", {"minimum": 0, "maximum": 0, "active": True}),
        ("DELETE", "", None),
    ],
)
def test_bob_forbidden_on_the_wire(server, alice_cluster, method, suffix, body):
    r = server.http(method, f"/api/v1/clusters/{alice_cluster.name}{suffix}", user=BOB, body=body)
    assert r.status == 403, r
    assert r.content_type.startswith("application/json"), r
    assert "error" in r.json()


def test_alice_unaffected_by_bob(alice, alice_cluster):
    assert_alice_ok(alice, alice_cluster)


def test_bob_credentials_do_not_open_alice_scheduler(server, alice, alice_cluster, bob_cluster):
    alice_addr = f"gateway://{server.host}:{server.scheduler_port}/{alice_cluster.name}"
    # Positive control: the same address with alice's credentials works.
    with Client(alice_addr, security=alice_cluster.security, timeout=30,
                set_as_default=False) as ok:
        assert ok.submit(lambda: 7, pure=False).result(timeout=60) == 7

    with pytest.raises((OSError, TimeoutError)):
        with Client(alice_addr, security=bob_cluster.security, timeout=15, set_as_default=False):
            pass

    # The same at the TLS level: bob's context does not complete a handshake with alice's
    # scheduler (her certificate is not his trust anchor), and the proxy routed by SNI.
    ctx = bob_cluster.security.get_connection_args("client")["ssl_context"]
    probe = tls_probe(server.scheduler_port, f"daskgateway-{alice_cluster.name}", ctx=ctx,
                      host=server.host)
    assert not probe.handshake_ok, probe
    assert probe.received, f"no ServerHello from alice's scheduler: {probe}"

    assert_alice_ok(alice, alice_cluster)


def test_own_credentials_reach_own_scheduler(server, bob_cluster):
    ctx = bob_cluster.security.get_connection_args("client")["ssl_context"]
    probe = tls_probe(server.scheduler_port, f"daskgateway-{bob_cluster.name}", ctx=ctx,
                      host=server.host)
    assert probe.handshake_ok, probe
    assert probe.peer_der == ssl.PEM_cert_to_DER_cert(bob_cluster.security.tls_cert)


def test_admin_sees_and_reads_all_clusters(server, alice_cluster, bob_cluster):
    admin = server.gateway(ADMIN)
    names = [c.name for c in admin.list_clusters()]
    assert alice_cluster.name in names and bob_cluster.name in names
    report = admin.get_cluster(alice_cluster.name)
    assert report.status.name == "RUNNING"
    assert report.tls_cert is not None


def test_bob_stop_did_not_stop_alice(alice, alice_cluster):
    # after every forbidden attempt above, alice's cluster is still hers and running
    assert [c.name for c in alice.list_clusters()] == [alice_cluster.name]
    assert_alice_ok(alice, alice_cluster)


def test_dashboard_auth_keeps_dashboards_private(module_servers):
    """With `dashboard_auth: true` only the owner (or an admin) sees a dashboard; by default
    (the other tests) dashboards are open, as in the reference."""
    srv = module_servers("dashauth", dashboard_auth=True, admin_users=[ADMIN])
    gw = srv.gateway(ALICE)
    c = new_cluster(gw)
    try:
        path = f"/clusters/{c.name}/status"
        anonymous = srv.http("GET", path)
        assert anonymous.status == 401
        assert anonymous.headers["WWW-Authenticate"] == "Basic"
        assert srv.http("GET", path, user=BOB).status == 404
        for user in (ALICE, ADMIN):
            r = srv.http("GET", path, user=user)
            assert r.status == 200, (user, r)
            assert b"Bokeh" in r.body
    finally:
        c.shutdown()
