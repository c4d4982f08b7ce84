"""The authorization matrix: every endpoint (REST API, dashboards, the scheduler proxy) against
every kind of caller (no credentials, bad credentials, an expired token, the owner, another user
of the same group, a user of another group, an admin, the cluster token of another cluster)
gives exactly the expected status, and no refusal changes anything.

JWT auth is used because it has all these callers (groups, expiry); the rules are the same for
every authenticator (they sit above it).
"""

import time

import pytest
from dask_gateway import Gateway
from distributed import Client

from conftest import REPO, new_cluster, wait_workers

jwt = pytest.importorskip("jwt")
import sys  # noqa: E402

sys.path.insert(0, str(REPO / "python" / "dask-gateway-jwt"))
from dask_gateway_jwt import JWTAuth  # noqa: E402

pytestmark = pytest.mark.local_only  # the rules sit above the backend seam

SECRET = "authz-matrix-secret-of-32-bytes!!"
GROUPS = {"alice": ["team-a"], "amy": ["team-a"], "bob": ["team-b"], "olga": ["ops"]}


def token(user, expired=False):
    now = int(time.time())
    exp = now - 120 if expired else now + 600
    return jwt.encode({"sub": user, "exp": exp, "iat": now - 200, "groups": GROUPS[user]},
                      SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def env(module_servers, tmp_path_factory):
    secret = tmp_path_factory.mktemp("authz") / "secret"
    secret.write_text(SECRET)
    server = module_servers("authz", dashboard_auth=True, auth={
        "type": "jwt", "jwt": {"secret_file": str(secret), "leeway": 0, "admin_groups": ["ops"]},
    })
    alice = Gateway(server.url, auth=JWTAuth(token=token("alice")))
    bob = Gateway(server.url, auth=JWTAuth(token=token("bob")))
    a = new_cluster(alice)
    b = new_cluster(bob)
    a.scale(1)
    with a.get_client(set_as_default=False) as client:
        wait_workers(client, 1)
    [sched] = server.cluster_processes(b.name, role="scheduler")
    b_token = open(sched.environ()["DASK_GATEWAY_API_TOKEN"]).read().strip()
    try:
        yield server, a, b, b_token
    finally:
        a.shutdown()
        b.shutdown()


CALLERS = ["none", "bad", "expired", "owner", "same-group", "other-group", "admin",
           "other-cluster-token"]


def headers_for(caller, b_token):
    return {
        "none": {},
        "bad": {"Authorization": "Bearer not.a.jwt"},
        "expired": {"Authorization": f"Bearer {token('alice', expired=True)}"},
        "owner": {"Authorization": f"Bearer {token('alice')}"},
        "same-group": {"Authorization": f"Bearer {token('amy')}"},
        "other-group": {"Authorization": f"Bearer {token('bob')}"},
        "admin": {"Authorization": f"Bearer {token('olga')}"},
        "other-cluster-token": {"Authorization": f"token {b_token}"},
    }[caller]


# Expected status per endpoint, in CALLERS order. 401 for everything unauthenticated (a
# cluster token is not a user credential), 403 for users on another's cluster, 404 for
# dashboards of another's cluster (they do not reveal that it exists).
READS = {
    "GET /api/v1/options": [401, 401, 401, 200, 200, 200, 200, 401],
    "GET /api/v1/clusters/": [401, 401, 401, 200, 200, 200, 200, 401],
    "GET /api/v1/clusters/{a}": [401, 401, 401, 200, 403, 403, 200, 401],
    "GET /api/v1/clusters/{a}/details": [401, 401, 401, 200, 403, 403, 200, 401],
    "GET /clusters/{a}/status": [401, 401, 401, 200, 404, 404, 200, 401],
}
WRITES = {
    "POST /api/v1/clusters/{a}/scale": ({"count": 2}, [401, 401, 401, 403, 403, 401]),
    "POST /api/v1/clusters/{a}/adapt": ({"minimum": 0, "maximum": 3},
                                        [401, 401, 401, 403, 403, 401]),
    "DELETE /api/v1/clusters/{a}": (None, [401, 401, 401, 403, 403, 401]),
    "POST /api/v1/clusters/{a}/heartbeat": ({"count": 5, "active_workers": [],
                                             "closing_workers": [], "closed_workers": []},
                                            [401, 401, 401, 401, 401, 401]),
    "POST /api/v1/clusters/": ({"cluster_options": {}}, [401, 401, 401, None, None, 401]),
}
REFUSED = ["none", "bad", "expired", "same-group", "other-group", "other-cluster-token"]


def call(server, endpoint, a, headers, body=None):
    method, path = endpoint.split(" ", 1)
    return server.http(method, path.format(a=a.name), headers=headers, body=body)


def snapshot(server):
    r = server.http("GET", "/api/v1/clusters/?details",
                    headers={"Authorization": f"Bearer {token('olga')}"})
    assert r.status == 200
    return {name: (d["owner"], d["status"], d["workers"]) for name, d in r.json().items()}


def test_reads(env):
    server, a, _, b_token = env
    failures = []
    for endpoint, expected in READS.items():
        for caller, want in zip(CALLERS, expected):
            r = call(server, endpoint, a, headers_for(caller, b_token))
            if r.status != want:
                failures.append(f"{endpoint} as {caller}: {r.status}, expected {want}")
    assert not failures, "\n".join(failures)
    # What each sees in the list.
    def listed(caller):
        return call(server, "GET /api/v1/clusters/", a, headers_for(caller, b_token)).json()
    assert a.name in listed("owner") and a.name in listed("admin")
    assert a.name not in listed("same-group") and a.name not in listed("other-group")


def accepted_writes(server, cluster):
    """The scale, adapt and stop requests the gateway accepted for `cluster`: it records each
    as an event of the cluster before it answers."""
    r = server.http("GET", f"/api/v1/clusters/{cluster.name}/events",
                    headers={"Authorization": f"Bearer {token('olga')}"})
    return [e for e in r.json()["events"]
            if e["reason"] in ("ScaleRequested", "AdaptRequested", "Stopping")]


def test_refusals_change_nothing(env):
    server, a, b, b_token = env
    before = snapshot(server)
    writes_before = accepted_writes(server, a)
    failures = []
    for endpoint, (body, expected) in WRITES.items():
        for caller, want in zip(REFUSED, expected):
            if want is None:
                continue
            r = call(server, endpoint, a, headers_for(caller, b_token),
                     body=body if body is not None else None)
            if r.status != want:
                failures.append(f"{endpoint} as {caller}: {r.status}, expected {want}")
    assert not failures, "\n".join(failures)
    assert snapshot(server) == before
    # None of the refused requests was accepted on the side.
    assert accepted_writes(server, a) == writes_before


def test_the_scheduler_proxy_needs_the_clusters_own_credentials(env):
    server, a, b, _ = env
    # B's certificate (what bob's client holds) does not open A's scheduler through the proxy.
    with pytest.raises(OSError):  # distributed's connect failure (a TimeoutError here)
        Client(a.scheduler_address, security=b.security, timeout=8, set_as_default=False)
    # A's own does.
    with Client(a.scheduler_address, security=a.security, timeout=30,
                set_as_default=False) as client:
        assert client.submit(lambda: 7).result(timeout=60) == 7


def test_owner_and_admin_may_act(env):
    server, a, _, b_token = env
    owner = headers_for("owner", b_token)
    admin = headers_for("admin", b_token)
    assert call(server, "POST /api/v1/clusters/{a}/scale", a, owner, {"count": 1}).status == 200
    assert call(server, "POST /api/v1/clusters/{a}/adapt", a, admin,
                {"minimum": 1, "maximum": 1}).status == 200
    r = call(server, "GET /api/v1/clusters/{a}/details", a, admin)
    assert r.json()["owner"] == "alice"


def test_a_dashboard_path_that_percent_encodes_the_cluster_name_is_not_found(env):
    server, a, _, b_token = env
    owner = headers_for("owner", b_token)
    assert server.http("GET", f"/clusters/{a.name}/status", headers=owner).status == 200
    # The same name with one character percent-encoded: no link the gateway makes. Its decoded
    # rest must not be forwarded (a `%3F` would become a query, a `%2F` a path separator).
    encoded = f"%{ord(a.name[0]):02X}{a.name[1:]}"
    for rest in ["status", "x%3Fy=1", "a%2Fb"]:
        r = server.http("GET", f"/clusters/{encoded}/{rest}", headers=owner)
        assert r.status == 404, (rest, r)
