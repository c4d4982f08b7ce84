"""Kerberos authentication against a real MIT KDC (Debian's packages, tests/env/kdc): the stock
client's `KerberosAuth` gets tickets from the KDC, the gateway accepts them with its keytab and
answers with the mutual-authentication token the client insists on. Replayed and forged tokens
are refused; Kerberos users get groups from `auth.groups`; browsers reach dashboards with
SPNEGO (`WWW-Authenticate: Negotiate`).
"""

import base64

import pytest

from conftest import HELM, GatewayServer, new_cluster, wait_workers

kerberos = pytest.importorskip("kerberos", reason="pykerberos is not installed")

# Authentication sits above the backend seam: the local backend is enough.
pytestmark = [
    pytest.mark.local_only,
    pytest.mark.skipif(HELM, reason="the KDC and keytab live on this machine; a gateway pod has neither"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from kdc import Kdc

    base = tmp_path_factory.mktemp("kerberos")
    kdc = Kdc(base / "kdc", users={"alice": "alice-password", "bob": "bob-password",
                                    "olga": "olga-password"})
    server = GatewayServer("kerberos", base / "gateway", dashboard_auth=True)
    server.config["auth"] = {
        "type": "kerberos",
        "kerberos": {"keytab": str(kdc.keytab)},
        "groups": {"team-k": ["alice"], "ops": ["olga"]},
        "admin_groups": ["ops"],
    }
    server.config["groups"] = [{"group": "team-k", "cluster": {"max_clusters_per_user": 3}}]
    server.extra_env = {k: v for k, v in kdc.server_env().items() if k != "KRB5_KTNAME"}
    server.start()
    try:
        yield server, kdc
    finally:
        server.shutdown()
        kdc.stop()


def login_as(monkeypatch, kdc, user):
    for k, v in kdc.env(kdc.kinit(user)).items():
        monkeypatch.setenv(k, v)


def negotiate_header(host="127.0.0.1"):
    """What KerberosAuth computes: a fresh token for HTTP@host from the current ticket cache."""
    _, ctx = kerberos.authGSSClientInit(
        f"HTTP@{host}", gssflags=kerberos.GSS_C_MUTUAL_FLAG | kerberos.GSS_C_SEQUENCE_FLAG)
    kerberos.authGSSClientStep(ctx, "")
    return "Negotiate " + kerberos.authGSSClientResponse(ctx)


def test_stock_client_with_kerberos_tickets(env, monkeypatch):
    from dask_gateway import Gateway
    from dask_gateway.auth import KerberosAuth

    server, kdc = env
    login_as(monkeypatch, kdc, "alice")
    alice = Gateway(server.url, auth=KerberosAuth())
    cluster = new_cluster(alice)
    try:
        cluster.scale(1)
        with cluster.get_client(set_as_default=False) as client:
            wait_workers(client, 1)
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        assert [c.name for c in alice.list_clusters()] == [cluster.name]
        r = server.http("GET", f"/api/v1/clusters/{cluster.name}/details",
                        headers={"Authorization": negotiate_header()})
        assert r.status == 200 and r.json()["owner"] == "alice", r
        assert r.json()["group"] == "team-k"
        assert r.headers["WWW-Authenticate"].startswith("Negotiate "), r.headers
        # bob: another principal, another user.
        login_as(monkeypatch, kdc, "bob")
        assert Gateway(server.url, auth=KerberosAuth()).list_clusters() == []
        # olga is an admin through the ops group.
        login_as(monkeypatch, kdc, "olga")
        olga = Gateway(server.url, auth=KerberosAuth())
        assert cluster.name in [c.name for c in olga.list_clusters()]
    finally:
        cluster.shutdown()


def test_replayed_forged_and_missing_tickets_are_refused(env, monkeypatch):
    server, kdc = env
    login_as(monkeypatch, kdc, "bob")
    header = negotiate_header()
    first = server.http("POST", "/api/v1/clusters/", headers={"Authorization": header},
                        body={"cluster_options": {"worker_cores": 99}})
    assert first.status == 422, first  # authenticated; the options are what is wrong
    assert first.headers["WWW-Authenticate"].startswith("Negotiate ")
    # The same token again is a replay.
    again = server.http("GET", "/api/v1/clusters/", headers={"Authorization": header})
    assert again.status == 401 and "replay" in again.json()["error"].lower(), again
    forged = "Negotiate " + base64.b64encode(b"\x60\x82\x01\x00not a kerberos token").decode()
    for value in (forged, "Negotiate ", "Negotiate !!!", "Basic Ym9iOg=="):
        r = server.http("GET", "/api/v1/clusters/", headers={"Authorization": value})
        assert r.status == 401, (value, r)
    r = server.http("GET", "/api/v1/clusters/")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Negotiate"
    # A ticket for another service's host name is not for us.
    with pytest.raises(kerberos.GSSError):
        negotiate_header("nowhere.invalid")
    # Nothing was created along the way.
    login_as(monkeypatch, kdc, "bob")
    r = server.http("GET", "/api/v1/clusters/", headers={"Authorization": negotiate_header()})
    assert r.status == 200 and r.json() == {}


def test_dashboards_take_spnego(env, monkeypatch):
    from dask_gateway import Gateway
    from dask_gateway.auth import KerberosAuth

    server, kdc = env
    login_as(monkeypatch, kdc, "alice")
    cluster = new_cluster(Gateway(server.url, auth=KerberosAuth()))
    try:
        path = f"/clusters/{cluster.name}/status"
        # A browser first gets the challenge that starts SPNEGO...
        r = server.http("GET", path)
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Negotiate", r
        # ...and then sends its token.
        r = server.http("GET", path, headers={"Authorization": negotiate_header()})
        assert r.status == 200 and b"bokeh" in r.body.lower(), r
        login_as(monkeypatch, kdc, "bob")
        r = server.http("GET", path, headers={"Authorization": negotiate_header()})
        assert r.status == 404, r
    finally:
        cluster.shutdown()


def test_the_web_page_takes_spnego(env, monkeypatch):
    server, kdc = env
    login_as(monkeypatch, kdc, "alice")
    r = server.http("GET", "/")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Negotiate", r
    page = server.http("GET", "/", headers={"Authorization": negotiate_header()})
    assert page.status == 200 and b"ui/app.js" in page.body, page
    cookie = page.headers["set-cookie"].split(";")[0]
    me = server.http("GET", "/api/v1/me", headers={"Cookie": cookie})
    assert me.status == 200 and me.json()["name"] == "alice"
