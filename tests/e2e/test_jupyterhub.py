"""JupyterHub authentication against a real JupyterHub (tests/env/jupyterhub: the hub from PyPI
with configurable-http-proxy from npm): the stock client's `JupyterHubAuth` with real hub
tokens, the hub's scopes honoured, hub groups feeding group policies, hub admins, and browsers
reaching dashboards through the hub's OAuth login.
"""

import time
import urllib.parse
from http.cookies import SimpleCookie

import aiohttp
import pytest
from dask_gateway import Gateway, JupyterHubAuth

from conftest import HELM, GatewayServer, new_cluster, wait_workers

# Authentication sits above the backend seam: the local backend is enough.
pytestmark = [
    pytest.mark.local_only,
    pytest.mark.skipif(HELM, reason="the hub listens on this machine's loopback, which a gateway pod cannot reach"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from hub import Hub

    base = tmp_path_factory.mktemp("jupyterhub")
    server = GatewayServer("jupyterhub", base / "gateway", dashboard_auth=True)
    hub = Hub(base / "hub", server.url, service_access=["alice", "bob", "hubadmin"])
    token_file = base / "service-token"
    token_file.write_text(hub.service_token + "\n")
    server.config["auth"] = {
        "type": "jupyterhub",
        "jupyterhub": {
            "api_url": hub.api_url,
            "public_url": hub.url + "/hub",
            "api_token_file": str(token_file),
            "service_name": "dask-gateway",
            "oauth_redirect_uri": server.url + "/api/oauth_callback",
            "hub_admins_are_admins": True,
        },
    }
    server.config["groups"] = [{"group": "team-a", "cluster": {"max_clusters_per_user": 2}}]
    server.config["cluster"]["max_clusters_per_user"] = 1
    server.start()
    try:
        yield server, hub
    finally:
        server.shutdown()
        hub.stop()


def hub_gateway(server, token):
    return Gateway(server.url, auth=JupyterHubAuth(api_token=token))


def raw(server, method, path, token=None, scheme="jupyterhub", **kwargs):
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    return server.http(method, path, headers=headers, **kwargs)


def test_stock_client_with_hub_tokens(env):
    server, hub = env
    alice = hub_gateway(server, hub.token("alice"))
    bob = hub_gateway(server, hub.token("bob"))
    cluster = new_cluster(alice)
    try:
        cluster.scale(1)
        with cluster.get_client(set_as_default=False) as client:
            wait_workers(client, 1)
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        assert [c.name for c in alice.list_clusters()] == [cluster.name]
        # Bob is another user: he sees none of it and cannot stop it.
        assert bob.list_clusters() == []
        with pytest.raises(aiohttp.ClientResponseError) as refused:
            bob.stop_cluster(cluster.name)
        assert refused.value.status == 403
        # alice is in the hub group team-a: its policy applies (two clusters, not one).
        r = raw(server, "GET", f"/api/v1/clusters/{cluster.name}/details", hub.token("alice"))
        assert r.status == 200 and r.json()["group"] == "team-a", r
        second = new_cluster(alice)
        second.shutdown()
        # The hub's admin is a gateway admin here (hub_admins_are_admins).
        admin = raw(server, "GET", "/api/v1/clusters/?details", hub.token("hubadmin"))
        assert admin.json()[cluster.name]["owner"] == "alice"
    finally:
        cluster.shutdown()


def test_the_hub_decides_and_refusals_change_nothing(env):
    server, hub = env
    before = raw(server, "GET", "/api/v1/clusters/?details", hub.token("hubadmin")).json()
    no_access = hub.token("alice", scopes=hub.no_access_scopes("alice"))
    expiring = hub.token("bob", expires_in=1)
    time.sleep(2.5)
    carol = hub.token("carol")  # carol may log in to the hub but not use the gateway
    for token, why in [
        (no_access, "no access to the dask-gateway service"),
        ("0123456789abcdef0123456789abcdef", "does not accept this token"),
        (expiring, "does not accept this token"),
        (carol, "no access to the dask-gateway service"),
    ]:
        r = raw(server, "POST", "/api/v1/clusters/", token, body={})
        assert r.status == 401, (why, r)
        assert r.headers["WWW-Authenticate"] == "jupyterhub"
        assert why in r.json()["error"], r
        assert token not in r.body.decode()
    # No credentials, or another method's: the challenge, so the client sends its token.
    r = raw(server, "GET", "/api/v1/clusters/")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "jupyterhub"
    r = server.http("GET", "/api/v1/clusters/", user="alice")  # Basic
    assert r.status == 401
    # Hub-style schemes work too.
    for scheme in ("token", "Bearer"):
        assert raw(server, "GET", "/api/v1/clusters/", hub.token("bob"), scheme=scheme).status == 200
    after = raw(server, "GET", "/api/v1/clusters/?details", hub.token("hubadmin")).json()
    assert after == before


def test_a_hub_token_beside_another_users_session_is_its_own_user(env):
    """A browser that kept alice's session cookie, behind something that adds bob's token:
    the token decides, and a revoked or unknown one is refused even beside a valid session."""
    server, hub = env
    r = raw(server, "GET", "/api/v1/me", hub.token("alice"))
    assert r.status == 200 and r.json()["name"] == "alice", r
    cookie = "; ".join(f"{k}={v}" for k, v in cookies_of(r).items())
    assert cookie, r.headers
    with_cookie = {"Cookie": cookie}
    assert raw(server, "GET", "/api/v1/me", headers=with_cookie).json()["name"] == "alice"
    r = raw(server, "GET", "/api/v1/me", hub.token("bob"), headers=with_cookie)
    assert r.status == 200 and r.json()["name"] == "bob", r
    r = raw(server, "GET", "/api/v1/me", "0123456789abcdef0123456789abcdef", headers=with_cookie)
    assert r.status == 401, r


def cookies_of(resp):
    jar = SimpleCookie()
    for value in resp.headers.get_all("Set-Cookie") or []:
        jar.load(value)
    return {k: m.value for k, m in jar.items()}


def browser_login(server, hub, user, path):
    """A browser without a gateway session opening `path`: sent to the hub, logged in there,
    back through the callback. Returns the gateway's cookies and where it was sent last."""
    r = server.http("GET", path)
    assert r.status == 302, r
    authorize = r.headers["Location"]
    assert authorize.startswith(hub.url + "/hub/api/oauth2/authorize?"), authorize
    state_cookies = cookies_of(r)
    session = hub.login_session(user)
    r = session.get(authorize)
    assert r.status == 302, r
    back = urllib.parse.urlsplit(r.location)
    assert back.path == server.prefix + "/api/oauth_callback"
    cookie = "; ".join(f"{k}={v}" for k, v in state_cookies.items())
    r = server.http("GET", f"{back.path}?{back.query}", raw_path=True, headers={"Cookie": cookie})
    assert r.status == 302, r
    return cookies_of(r), r.headers["Location"]


def test_dashboards_log_in_through_the_hub(env):
    server, hub = env
    alice = hub_gateway(server, hub.token("alice"))
    cluster = new_cluster(alice)
    try:
        path = f"/clusters/{cluster.name}/status"
        cookies, location = browser_login(server, hub, "alice", path)
        assert location == server.prefix + path
        session = "; ".join(f"{k}={v}" for k, v in cookies.items() if v)
        r = server.http("GET", path, headers={"Cookie": session})
        assert r.status == 200, r
        assert b"bokeh" in r.body.lower()
        # Bob logs in too, but alice's dashboard is not his.
        cookies, _ = browser_login(server, hub, "bob", path)
        session = "; ".join(f"{k}={v}" for k, v in cookies.items() if v)
        assert server.http("GET", path, headers={"Cookie": session}).status == 404
        # A callback whose state does not match the browser's cookie is refused.
        r = server.http("GET", path)
        state_cookie = "; ".join(f"{k}={v}" for k, v in cookies_of(r).items())
        r = server.http("GET", "/api/oauth_callback?code=abc&state=forged",
                        headers={"Cookie": state_cookie})
        assert r.status == 400, r
        r = server.http("GET", "/api/oauth_callback?code=abc&state=x")
        assert r.status == 400, r
    finally:
        cluster.shutdown()


def test_the_web_page_logs_in_through_the_hub(env):
    server, hub = env
    r = server.http("GET", "/")
    assert r.status == 302 and r.headers["location"].startswith(hub.url), r
    cookies, location = browser_login(server, hub, "alice", "/")
    assert location == server.prefix + "/"
    session = "; ".join(f"{k}={v}" for k, v in cookies.items() if v)
    page = server.http("GET", "/", headers={"Cookie": session})
    assert page.status == 200 and b"ui/app.js" in page.body
    assert "script-src 'self'" in page.headers["content-security-policy"]
    me = server.http("GET", "/api/v1/me", headers={"Cookie": session})
    assert me.status == 200 and me.json()["name"] == "alice"


def test_a_dead_hub_is_a_clear_502_and_known_sessions_keep_working(env):
    server, hub = env
    token = hub.token("bob")
    r = raw(server, "GET", "/api/v1/clusters/", token)
    assert r.status == 200
    session = "; ".join(f"{k}={v}" for k, v in cookies_of(r).items())
    hub.stop()
    fresh = "f" * 32
    r = raw(server, "GET", "/api/v1/clusters/", fresh)
    assert r.status == 502 and "JupyterHub" in r.json()["error"], r
    # Bob's session cookie does not need the hub.
    assert server.http("GET", "/api/v1/clusters/", headers={"Cookie": session}).status == 200
