"""wire-protocol.md section 16, the minimum compatibility checklist, items 1-10 and 14-15
(11-13 live in test_users.py, test_bad_input.py and test_workload.py).

Runs against the shared server (Basic auth with a shared password, max_workers = 2).
"""

import time

import aiohttp
import pytest

from conftest import (
    DEFAULT_OPTIONS,
    EXPECTED_OPTIONS,
    SHARED_PASSWORD,
    check_options,
    cluster_status,
    n_workers,
    new_cluster,
    scheduler_log,
    wait_for,
    wait_status,
    wait_workers,
)
from dask_gateway import GatewayClusterError, GatewayWarning

# User names are arbitrary strings (wire-protocol 15.15).
USER = "alice@non-alpha.characters"
MODEL_KEYS = {"name", "status", "dashboard_route", "start_time", "stop_time", "options",
              "tls_cert", "tls_key"}
ALL_STATES = ["pending", "running", "stopping", "stopped", "failed"]


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def G(server):
    return server.gateway(USER)


@pytest.fixture(scope="module")
def cluster(G):
    c = new_cluster(G)  # default options
    yield c
    c.close()


def is_json(resp):
    return resp.content_type.split(";")[0].strip() == "application/json"


# 1 -----------------------------------------------------------------------------------------
def test_health_and_version(server, G):
    r = server.http("GET", "/api/health")
    assert r.status == 200 and is_json(r), r
    assert r.json() == {"status": "pass"}

    r = server.http("GET", "/api/version")
    assert r.status == 200 and is_json(r), r
    assert isinstance(r.json()["version"], str)

    v = G.get_versions()
    assert set(v) == {"server", "client"}
    assert isinstance(v["server"]["version"], str) and v["server"]["version"]
    assert "version" in v["client"]
    # The log goes to a file here, not a terminal: no colour codes in it.
    if getattr(server, "log_path", None) is not None:
        assert b"\x1b[" not in server.log_path.read_bytes()


# 2 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,path",
    [("GET", "/api/v1/clusters/"), ("GET", "/api/v1/options"), ("POST", "/api/v1/clusters/"),
     ("GET", "/api/v1/clusters/somename"), ("DELETE", "/api/v1/clusters/somename")],
)
def test_unauthenticated_request_gets_basic_challenge(server, method, path):
    body = {"cluster_options": {}} if method == "POST" else None
    r = server.http(method, path, body=body)
    assert r.status == 401, r
    assert r.headers.get("WWW-Authenticate", "").split()[0] == "Basic", r.headers
    assert is_json(r), r
    assert isinstance(r.json().get("error"), str)


# 3 -----------------------------------------------------------------------------------------
def test_new_user_lists_nothing_and_cookie_is_replayable(server):
    user = "cookie-monster"
    gw = server.gateway(user)
    assert gw.list_clusters() == []
    jar = list(gw._session.cookie_jar)
    assert jar, "the authenticated response set no session cookie"

    cookie = "; ".join(f"{m.key}={m.value}" for m in jar)
    r = server.http("GET", "/api/v1/clusters/", headers={"Cookie": cookie})
    assert r.status == 200, r
    assert is_json(r) and r.json() == {}

    # The raw authenticated response carries Set-Cookie too.
    r = server.http("GET", "/api/v1/clusters/", user=user)
    assert r.status == 200, r
    assert r.headers.get_all("Set-Cookie"), r.headers

    # An unknown cookie value counts as no credentials at all: 401 again, not 403.
    bogus = "; ".join(f"{m.key}=not-a-valid-session-{m.value[:4]}" for m in jar)
    r = server.http("GET", "/api/v1/clusters/", headers={"Cookie": bogus})
    assert r.status == 401, r


# 4 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("password", ["wrong", ""])
def test_wrong_password_is_401(server, password):
    gw = server.gateway(USER, password=password)
    with pytest.raises(aiohttp.ClientResponseError) as e:
        gw.list_clusters()
    assert e.value.status == 401


def test_right_password_with_colons_and_spaces(server):
    assert ":" in SHARED_PASSWORD and " " in SHARED_PASSWORD
    assert server.gateway("colon-user").list_clusters() == []


# 5 -----------------------------------------------------------------------------------------
def test_cluster_options_match_configuration(G):
    check_options(G.cluster_options())


def test_options_wire_format(server):
    r = server.http("GET", "/api/v1/options", user=USER)
    assert r.status == 200 and is_json(r), r
    specs = r.json()["cluster_options"]
    assert [s["field"] for s in specs] == list(EXPECTED_OPTIONS)
    allowed_extra = {"int": {"min", "max"}, "float": {"min", "max"}, "string": set(),
                     "bool": set(), "select": {"options"}, "mapping": set()}
    for s in specs:
        label, typ, default, extra = EXPECTED_OPTIONS[s["field"]]
        assert set(s) == {"field", "label", "default", "spec"}, s
        assert s["label"] == label
        assert s["spec"]["type"] == typ
        assert set(s["spec"]) - {"type"} == allowed_extra[typ], s
        if typ == "int":  # integral JSON numbers, never 1.0
            assert all(isinstance(s["spec"][k], int) for k in ("min", "max")), s
            assert isinstance(s["default"], int) and not isinstance(s["default"], bool), s
        assert s["default"] == default


# 6 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,named",
    [
        ({"unknown_option": 1}, "unknown_option"),
        ({"worker_cores": 8}, "worker_cores"),
        ({"worker_cores": 0}, "worker_cores"),
        ({"worker_memory": 100.0}, "worker_memory"),
        ({"profile": "xl"}, "profile"),
    ],
)
def test_invalid_options_raise_valueerror_and_leave_nothing(server, options, named):
    user = "options-tester"
    gw = server.gateway(user)
    before = {c.name for c in gw.list_clusters(status=ALL_STATES)}
    with pytest.raises(ValueError) as e:
        gw.new_cluster(**options)
    assert named in str(e.value)
    assert gw.list_clusters() == []
    assert {c.name for c in gw.list_clusters(status=ALL_STATES)} == before


# 7 -----------------------------------------------------------------------------------------
def test_new_cluster_report(server, G, cluster):
    report = G.get_cluster(cluster.name)
    assert report.status.name == "RUNNING"
    assert report.options == DEFAULT_OPTIONS
    assert isinstance(report.tls_cert, str) and "BEGIN CERTIFICATE" in report.tls_cert
    assert isinstance(report.tls_key, str) and "PRIVATE KEY" in report.tls_key
    assert report.dashboard_link == f"{server.url}/clusters/{cluster.name}/status"
    assert cluster.scheduler_address == f"gateway://127.0.0.1:{server.port}/{cluster.name}"
    assert report.stop_time is None
    assert [c.name for c in G.list_clusters()] == [cluster.name]


def test_cluster_model_on_the_wire(server, cluster):
    r = server.http("GET", f"/api/v1/clusters/{cluster.name}", user=USER)
    assert r.status == 200 and is_json(r), r
    model = r.json()
    assert set(model) == MODEL_KEYS
    assert model["name"] == cluster.name
    assert model["status"] == "RUNNING"
    assert model["dashboard_route"] == f"/clusters/{cluster.name}/status"
    now_ms = time.time() * 1000
    assert isinstance(model["start_time"], int) and now_ms - 3_600_000 < model["start_time"] <= now_ms
    assert model["stop_time"] is None

    r = server.http("GET", "/api/v1/clusters/", user=USER)
    assert r.status == 200 and is_json(r), r
    listing = r.json()
    assert isinstance(listing, dict) and list(listing) == [cluster.name]
    assert set(listing[cluster.name]) == MODEL_KEYS

    r = server.http("GET", f"/api/v1/clusters/{cluster.name}?wait", user=USER)
    assert r.status == 200 and r.json()["status"] == "RUNNING"


def test_cluster_name_fits_sni(cluster):
    assert "/" not in cluster.name
    assert len(cluster.name.split(".")[0]) <= 51


# 8 -----------------------------------------------------------------------------------------
def test_scale_compute_and_scale_down(cluster):
    with cluster.get_client(set_as_default=False) as client:
        cluster.scale(2)
        wait_workers(client, 2, timeout=60)
        assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2
        cluster.scale(1)
        wait_workers(client, 1, timeout=60)
        assert client.submit(lambda x: x * 3, 3).result(timeout=60) == 9
        assert n_workers(client) == 1


# 9 -----------------------------------------------------------------------------------------
def test_scale_and_adapt_are_clipped_with_warnings(cluster):
    with pytest.warns(GatewayWarning) as rec:
        cluster.scale(3)
    msgs = [str(w.message) for w in rec if issubclass(w.category, GatewayWarning)]
    assert any("Scaling to 2 instead" in m for m in msgs), msgs
    assert (
        "Scale request of 3 workers would exceed resource limit of 2 workers. "
        "Scaling to 2 instead." in msgs
    ), msgs

    with cluster.get_client(set_as_default=False) as client:
        wait_workers(client, 2, timeout=60)

    with pytest.warns(GatewayWarning) as rec:
        cluster.adapt(maximum=3)
    msgs = [str(w.message) for w in rec if issubclass(w.category, GatewayWarning)]
    assert any("Using `maximum=2, minimum=0` instead" in m for m in msgs), msgs
    assert (
        "Adapt with `maximum=3, minimum=0` workers would exceed resource limit of 2 workers. "
        "Using `maximum=2, minimum=0` instead." in msgs
    ), msgs


def test_scale_within_limit_does_not_warn(cluster, recwarn):
    cluster.scale(2)
    cluster.adapt(minimum=0, maximum=2)
    assert not [w for w in recwarn if issubclass(w.category, GatewayWarning)]


# 10 ----------------------------------------------------------------------------------------
def test_adapt_starts_workers_on_demand_and_back_to_zero(cluster):
    with cluster.get_client(set_as_default=False) as client:
        cluster.adapt(minimum=0, maximum=2)
        wait_workers(client, 0, timeout=120)
        fut = client.submit(lambda x: x + 41, 1, pure=False)
        wait_for(lambda: n_workers(client) >= 1, 90, what="a worker started by adapt")
        assert fut.result(timeout=90) == 42
        del fut
        wait_workers(client, 0, timeout=120)


# 14 ----------------------------------------------------------------------------------------
def test_close_stops_cluster(server, G, cluster):
    name = cluster.name
    assert cluster.shutdown_on_close
    cluster.close()
    assert name not in [c.name for c in G.list_clusters()]
    stopped = wait_for(
        lambda: [c for c in G.list_clusters(status="stopped") if c.name == name],
        60,
        what="cluster listed with status=stopped",
    )
    assert stopped[0].status.name == "STOPPED"
    assert stopped[0].stop_time is not None
    assert stopped[0].tls_cert is None and stopped[0].tls_key is None
    assert stopped[0].dashboard_link is None

    G.stop_cluster(name)  # idempotent
    with pytest.raises(GatewayClusterError, match="already stopped"):
        G.connect(name)

    # and its processes are gone
    wait_for(lambda: not server.cluster_processes(name), 60,
             what=f"processes of stopped cluster {name} to exit")


# 15 ----------------------------------------------------------------------------------------
def test_idle_timeout_stops_cluster(module_servers):
    srv = module_servers("idle", cluster={"idle_timeout": 5})
    gw = srv.gateway("idle-user")
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.close()
    wait_for(lambda: name not in [x.name for x in gw.list_clusters()], 60,
             what="idle cluster to leave the active list")
    status = wait_for(
        lambda: (s := gw.get_cluster(name).status.name) in ("STOPPED", "FAILED") and s,
        30, what="idle cluster to finish stopping",
    )
    assert status == "STOPPED"
    assert gw.get_cluster(name).stop_time is not None


def test_work_waiting_for_workers_is_not_idle(module_servers):
    # Dask queues tasks that have no worker yet; the stock preload's idle test does not count
    # them, so it asks the gateway to stop a cluster whose workers take longer than the
    # timeout to start. The gateway asks Dask itself and keeps the cluster.
    srv = module_servers("idle", cluster={"idle_timeout": 5})
    gw = srv.gateway("idle-queued")
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    with c.get_client(set_as_default=False) as client:
        fut = client.submit(sum, [1, 2, 3], pure=False)
        # The preload asks twice: its first request was answered without a stop.
        wait_for(lambda: scheduler_log(srv, name).count("has been idle") >= 2, 60,
                 what="the scheduler to ask twice to be stopped as idle")
        assert cluster_status(gw, name) == "RUNNING"
        c.scale(1)
        assert fut.result(timeout=120) == 6
    # With its work done it is idle, and stopped.
    wait_status(gw, name, "STOPPED", timeout=60)
    gw.close()
