"""Bad input: each request gets its documented error and changes nothing.

After every check the user's cluster list (all states) is unchanged and the user's cluster is
still RUNNING with no workers; the server stays healthy after malformed traffic on its port.
"""

import ssl

import pytest

from conftest import (
    basic_auth_header,
    n_workers,
    new_cluster,
    raw_exchange,
    tls_probe,
    wait_status,
    wait_workers,
)
from dask_gateway import GatewayClusterError

pytestmark = pytest.mark.chart  # bad input at the chart's front door too (tests/run-kube)

USER = "mallory-bad-input"
ALL_STATES = "PENDING,RUNNING,STOPPING,STOPPED,FAILED"


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def gw(server):
    return server.gateway(USER)


@pytest.fixture(scope="module")
def cluster(gw):
    c = new_cluster(gw)
    yield c
    c.close()


def snapshot(server):
    r = server.http("GET", f"/api/v1/clusters/?status={ALL_STATES}", user=USER)
    assert r.status == 200, r
    return {name: m["status"] for name, m in r.json().items()}


@pytest.fixture
def unchanged(server, cluster):
    """Asserts after the test that nothing changed for USER and the server is healthy.

    Setup resets the cluster to 0 wanted workers, so that a bad request that did scale it
    (a failure of an earlier test) does not spill into the next test."""
    with cluster.get_client(set_as_default=False) as client:
        if n_workers(client):
            cluster.scale(0)
            wait_workers(client, 0, timeout=60)
    before = snapshot(server)
    assert before[cluster.name] == "RUNNING"
    yield
    r = server.health()
    assert r.status == 200 and r.json() == {"status": "pass"}, r
    assert server.is_alive()
    after = snapshot(server)
    for name in set(after) - set(before):  # don't let a wrongly created cluster leak on
        server.http("DELETE", f"/api/v1/clusters/{name}", user=USER)
    assert after == before
    with cluster.get_client(set_as_default=False) as client:
        assert n_workers(client) == 0


def assert_json_error(r, status, *substrings):
    assert r.status == status, r
    assert r.content_type.split(";")[0] == "application/json", r
    msg = r.json()["error"]
    assert isinstance(msg, str) and msg
    for s in substrings:
        assert s in msg, (s, msg)
    return msg


# -- cluster creation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"cluster_options": {',  # malformed JSON
        b"\xff\xfe not json",
        b"",
        b"[1, 2]",  # not an object
        b'"a string"',
        b"42",
        b'{"cluster_options": [1]}',  # options not an object
        b'{"cluster_options": "worker_cores=2"}',
    ],
)
def test_create_with_bad_body(server, unchanged, body):
    r = server.http("POST", "/api/v1/clusters/", user=USER, body=body,
                    headers={"Content-Type": "application/json"})
    assert_json_error(r, 422)


@pytest.mark.parametrize(
    "options,field",
    [
        ({"unknown_option": 1}, "unknown_option"),
        ({"worker_cores": "2"}, "worker_cores"),
        ({"worker_cores": 1.5}, "worker_cores"),
        ({"worker_cores": 5}, "worker_cores"),
        ({"worker_memory": "lots"}, "worker_memory"),
        ({"worker_memory": 0.1}, "worker_memory"),
        ({"image": 5}, "image"),
        ({"profile": 1}, "profile"),
        ({"profile": "medium"}, "profile"),
        ({"debug": "yes"}, "debug"),
        ({"environment": ["A=1"]}, "environment"),
        ({"environment": 3}, "environment"),
        # No process could start with it (the kernel's limit is 128 KiB per variable).
        ({"environment": {"PYTHONBIG": "v" * 200_000}}, "cluster_options take"),
        ({"environment": {"BIG": "v" * 40_000}}, "BIG is longer than 32768 bytes"),
        ({"environment": {f"V{i}": "1" for i in range(300)}}, "at most 256 environment"),
    ],
)
def test_create_with_bad_option(gw, unchanged, options, field):
    with pytest.raises(ValueError) as e:
        gw.submit(**options)
    assert field in str(e.value)


def test_unknown_fields_message_lists_them_sorted(server, unchanged):
    r = server.http("POST", "/api/v1/clusters/", user=USER,
                    body={"cluster_options": {"zeta": 1, "alpha": 2}})
    msg = assert_json_error(r, 422, "alpha", "zeta")
    assert msg.index("alpha") < msg.index("zeta")


# -- scale and adapt -----------------------------------------------------------------------


@pytest.mark.parametrize("count", [-1, 1.5, "2", None, True, [1]])
def test_scale_with_bad_count(server, cluster, unchanged, count):
    r = server.http("POST", f"/api/v1/clusters/{cluster.name}/scale", user=USER,
                    body={"count": count})
    assert_json_error(r, 422, "non-negative integer")


@pytest.mark.parametrize("body", [b"{}", b"not json", b"[3]", b"3", b""])
def test_scale_with_bad_body(server, cluster, unchanged, body):
    r = server.http("POST", f"/api/v1/clusters/{cluster.name}/scale", user=USER,
                    body=body, headers={"Content-Type": "application/json"})
    assert_json_error(r, 422)


@pytest.mark.parametrize("body", [b"[0, 1, true]", b"not json", b"", b'{"minimum": 0, "maximum": 1, "active": "yes"}'])
def test_adapt_with_bad_body(server, cluster, unchanged, body):
    r = server.http("POST", f"/api/v1/clusters/{cluster.name}/adapt", user=USER,
                    body=body, headers={"Content-Type": "application/json"})
    assert_json_error(r, 422)


def test_scale_negative_through_client(gw, cluster, unchanged):
    with pytest.raises(ValueError, match="non-negative integer"):
        cluster.scale(-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        gw.scale_cluster(cluster.name, 2.5)


@pytest.mark.parametrize(
    "body",
    [
        {"minimum": -1, "maximum": 2, "active": True},
        {"minimum": 0, "maximum": -2, "active": True},
        {"minimum": "1", "maximum": 2, "active": True},
        {"minimum": 0, "maximum": 1.5, "active": True},
        {"minimum": 5, "maximum": 2, "active": True},
    ],
)
def test_adapt_with_bad_bounds(server, cluster, unchanged, body):
    r = server.http("POST", f"/api/v1/clusters/{cluster.name}/adapt", user=USER, body=body)
    assert_json_error(r, 422)


def test_adapt_negative_through_client(cluster, unchanged):
    with pytest.raises(ValueError):
        cluster.adapt(minimum=-1, maximum=1)


def test_adapt_minimum_above_maximum_starts_no_worker(server, cluster, unchanged):
    def adapts():
        r = server.http("GET", f"/api/v1/clusters/{cluster.name}/events", user=USER)
        return [e for e in r.json()["events"] if e["reason"] == "AdaptRequested"]

    before = adapts()
    with pytest.raises(ValueError, match="minimum <= maximum"):
        cluster.adapt(minimum=5, maximum=2)
    # The gateway records an adapt it forwards to the scheduler as an event before it answers:
    # this one never reached the scheduler, so it can start no worker.
    assert adapts() == before
    with cluster.get_client(set_as_default=False) as client:
        assert n_workers(client) == 0


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", None]
)
def test_non_json_bodies_are_415(server, cluster, unchanged, content_type):
    """Bodies that browsers send cross-site without a preflight are refused, even when the text
    is valid JSON and the credentials are right."""
    headers = {"Content-Type": content_type} if content_type else {}
    for path, body in [
        ("/api/v1/clusters/", b'{"cluster_options": {}}'),
        (f"/api/v1/clusters/{cluster.name}/scale", b'{"count": 1}'),
        (f"/api/v1/clusters/{cluster.name}/adapt", b'{"minimum": 1, "maximum": 1}'),
    ]:
        r = server.http("POST", path, user=USER, body=body, headers=headers)
        assert_json_error(r, 415, "application/json")


def test_cross_origin_writes_are_403(server, cluster, unchanged):
    for origin in ("http://evil.example", "null"):
        headers = {"Origin": origin}
        r = server.http("POST", "/api/v1/clusters/", user=USER, headers=headers,
                        body={"cluster_options": {}})
        assert_json_error(r, 403, "Cross-origin")
        r = server.http("POST", f"/api/v1/clusters/{cluster.name}/scale", user=USER,
                        headers=headers, body={"count": 1})
        assert_json_error(r, 403)
        r = server.http("DELETE", f"/api/v1/clusters/{cluster.name}", user=USER, headers=headers)
        assert_json_error(r, 403)


# -- unknown clusters ----------------------------------------------------------------------

GHOST = "doesnotexist0123456789abcdef0000"


def test_unknown_cluster(server, gw, unchanged):
    with pytest.raises(ValueError, match="not found"):
        gw.get_cluster(GHOST)
    with pytest.raises(ValueError):
        gw.scale_cluster(GHOST, 1)
    with pytest.raises(ValueError):
        gw.adapt_cluster(GHOST, minimum=0, maximum=1)
    with pytest.raises(ValueError):
        gw.connect(GHOST)
    gw.stop_cluster(GHOST)  # 204, no error

    r = server.http("GET", f"/api/v1/clusters/{GHOST}", user=USER)
    assert_json_error(r, 404, GHOST)
    r = server.http("POST", f"/api/v1/clusters/{GHOST}/scale", user=USER, body={"count": 1})
    assert_json_error(r, 404)
    r = server.http("POST", f"/api/v1/clusters/{GHOST}/adapt", user=USER,
                    body={"minimum": 0, "maximum": 1, "active": True})
    assert_json_error(r, 404)
    r = server.http("DELETE", f"/api/v1/clusters/{GHOST}", user=USER)
    assert r.status == 204 and r.body == b"", r


@pytest.mark.parametrize("query", ["bogus", "", "running,bogus", "RUNNING,,PENDING"])
def test_bad_status_filter(server, unchanged, query):
    r = server.http("GET", f"/api/v1/clusters/?status={query}", user=USER)
    assert_json_error(r, 422, "is not a valid ClusterStatus")


def test_status_filter_is_case_insensitive(server, cluster, unchanged):
    for q in ("running", "Running", "RUNNING", "pending,running"):
        r = server.http("GET", f"/api/v1/clusters/?status={q}", user=USER)
        assert r.status == 200, r
        assert cluster.name in r.json()


# -- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "basic-with-empty-password",
        "basic-with-wrong-password",
        "Bearer abc",
        "Basic !!!not-base64!!!",
        "Basic " + "bm9jb2xvbg==",  # "nocolon"
        "token 0123456789abcdef",
    ],
)
def test_bad_credentials_are_401(server, unchanged, authorization):
    if authorization == "basic-with-empty-password":
        authorization = basic_auth_header(USER, "")
    elif authorization == "basic-with-wrong-password":
        authorization = basic_auth_header(USER, "wrong")
    headers = {"Authorization": authorization} if authorization else {}
    r = server.http("GET", "/api/v1/clusters/", headers=headers)
    assert r.status == 401, r
    assert r.headers.get("WWW-Authenticate", "").startswith("Basic"), r.headers
    r = server.http("POST", "/api/v1/clusters/", headers=headers, body={"cluster_options": {}})
    assert r.status == 401, r


def test_heartbeat_requires_cluster_token(server, cluster, unchanged):
    body = {"scheduler_address": "tls://127.0.0.1:1", "dashboard_address": "",
            "api_address": "http://127.0.0.1:1", "count": 5, "active_workers": [],
            "closing_workers": [], "closed_workers": []}
    path = f"/api/v1/clusters/{cluster.name}/heartbeat"
    for headers in ({}, {"Authorization": "token " + "0" * 32}):
        r = server.http("POST", path, headers=headers, body=body)
        assert r.status == 401, r
        assert r.headers.get("WWW-Authenticate", "").startswith("token"), r.headers
    # user credentials do not authenticate the token-only route either
    r = server.http("POST", path, user=USER, body=body)
    assert r.status == 401, r


def test_delete_with_wrong_token_falls_back_to_user_auth(server, cluster, unchanged):
    r = server.http("DELETE", f"/api/v1/clusters/{cluster.name}",
                    headers={"Authorization": "token " + "f" * 32})
    assert r.status == 401, r


# -- malformed traffic on the public port --------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05abcde",  # a TLS record header whose body is not a ClientHello
        b"\x16\x03\x01\xff\xff" + b"\x01" * 200,  # truncated oversized record, then EOF
        b"\x16",
    ],
)
def test_garbage_on_public_port(server, unchanged, payload):
    received, closed = raw_exchange(server.port, payload, timeout=10, host=server.host)
    assert closed or received, "server neither answered nor closed"
    if received:
        status = received.split(b"\r\n")[0].split(b" ")
        assert status[0].startswith(b"HTTP/1.") and int(status[1]) in (400, 505), received[:200]


def test_tls_for_unknown_cluster_is_closed_without_data(server, unchanged):
    probe = tls_probe(server.scheduler_port, "daskgateway-doesnotexist", host=server.host)
    assert probe.eof and probe.received == b"" and not probe.handshake_ok, probe


def test_tls_without_sni(server, unchanged):
    # Not for a scheduler and no HTTPS configured: closed, or answered as bad HTTP.
    probe = tls_probe(server.port, None, host=server.host)
    assert not probe.handshake_ok, probe
    assert probe.eof or probe.error is not None, probe
    assert probe.received == b"" or probe.received.startswith(b"HTTP/1."), probe


def test_tls_with_other_sni(server, unchanged):
    probe = tls_probe(server.port, "example.com", host=server.host)
    assert not probe.handshake_ok, probe


def test_huge_header(server, unchanged):
    payload = (b"GET /api/v1/clusters/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20)
               + b"\r\n\r\n")
    received, closed = raw_exchange(server.port, payload, timeout=15, host=server.host)
    assert closed or received
    if received:
        status = received.split(b"\r\n")[0]
        assert status.startswith(b"HTTP/1.") and (b" 431 " in status or b" 400 " in status), status


def test_many_headers(server, unchanged):
    payload = b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"
    received, closed = raw_exchange(server.port, payload, timeout=15, host=server.host)
    assert closed or received
    assert not received or received.startswith(b"HTTP/1."), received[:200]


def test_slow_fragmented_clienthello_still_routes(server, cluster, unchanged):
    # The proxy must wait for the whole ClientHello, however it is fragmented by TCP.
    ctx = cluster.security.get_connection_args("client")["ssl_context"]
    probe = tls_probe(server.scheduler_port, f"daskgateway-{cluster.name}", ctx=ctx,
                      first_chunk=7, delay=0.01, host=server.host)
    assert probe.handshake_ok, probe
    assert probe.peer_der == ssl.PEM_cert_to_DER_cert(cluster.security.tls_cert)


def test_large_clienthello_still_routes(server, cluster, unchanged):
    # ~10 KiB ClientHello (long ALPN list), as post-quantum key shares produce: must be parsed
    # up to the 16 KiB record limit, not just 4 KiB.
    ctx = cluster.security.get_connection_args("client")["ssl_context"]
    ctx.set_alpn_protocols([f"proto-{i:03d}-" + "x" * 40 for i in range(200)])
    probe = tls_probe(server.scheduler_port, f"daskgateway-{cluster.name}", ctx=ctx,
                      host=server.host)
    assert probe.handshake_ok, probe
    assert probe.peer_der == ssl.PEM_cert_to_DER_cert(cluster.security.tls_cert)


def test_unknown_api_path_is_404(server, unchanged):
    r = server.http("GET", "/api/v1/nothing-here", user=USER)
    assert r.status == 404, r
    r = server.http("GET", "/clusters/doesnotexist/status")
    assert r.status == 404, r


def test_stopped_cluster_is_not_running(server, gw, cluster):
    # Stop a cluster right after submitting it (PENDING -> STOPPING -> STOPPED); then scale and
    # adapt answer 409 ("not running") and connect says "already stopped". Runs last: it adds a
    # stopped cluster to this user's list.
    name = gw.submit()
    gw.stop_cluster(name)
    wait_status(gw, name, "STOPPED", timeout=60)
    with pytest.raises(GatewayClusterError, match="not running"):
        gw.scale_cluster(name, 1)
    with pytest.raises(GatewayClusterError, match="not running"):
        gw.adapt_cluster(name, minimum=0, maximum=1)
    with pytest.raises(GatewayClusterError, match="already stopped"):
        gw.connect(name)
    gw.stop_cluster(name)
    assert gw.get_cluster(name).status.name == "STOPPED"
    assert gw.get_cluster(cluster.name).status.name == "RUNNING"


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("PUT", "/api/v1/clusters/", None, 405),
        ("GET", "/api/v1/no-such-endpoint", None, 404),
        ("GET", "/api/v1/clusters/%ff", None, 400),
        ("POST", "/api/v1/clusters/", b"[" * 3_000_000, 413),
    ],
)
def test_every_api_error_is_json(server, unchanged, method, path, body, status):
    headers = {"Content-Type": "application/json"} if body else {}
    r = server.http(method, path, user=USER, body=body, headers=headers)
    assert_json_error(r, status)
