"""JWT bearer authentication with the stock Python client and `dask_gateway_jwt.JWTAuth`
(python/dask-gateway-jwt): HS256 with a shared secret file, and RS256/ES256 with keys from a
JWKS URL served by the test on loopback, including key rotation and refused tokens."""

import http.server
import json
import sys
import threading
import time

import dask
import pytest
from dask_gateway import Gateway

from conftest import REPO, new_cluster, wait_for

# PyJWT[crypto] is in the newest environment's lock (requirements.in); the oldest-release
# environment runs only the smoke set and does not carry it.
jwt = pytest.importorskip("jwt")
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from jwt.algorithms import ECAlgorithm, RSAAlgorithm  # noqa: E402

sys.path.insert(0, str(REPO / "python" / "dask-gateway-jwt"))
from dask_gateway_jwt import JWTAuth  # noqa: E402

pytestmark = pytest.mark.local_only  # authentication does not depend on the backend

SECRET = "a-shared-secret-of-32-bytes-long!"
ISSUER = "https://idp.example"
AUDIENCE = "dask"


def claims(user, **extra):
    now = int(time.time())
    return {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600,
            "groups": ["data"], **extra}


def hs256(user, **extra):
    return jwt.encode(claims(user, **extra), SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def hs_server(module_servers, tmp_path_factory):
    secret = tmp_path_factory.mktemp("jwt") / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    return module_servers("jwt-hs256", stop_clusters_on_shutdown=True, auth={
        "type": "jwt",
        "jwt": {"secret_file": str(secret), "issuer": ISSUER, "audience": AUDIENCE,
                "leeway": 5, "admin_groups": ["ops"]},
    })


def bearer(srv, token, path="/api/v1/clusters/"):
    return srv.http("GET", path, headers={"Authorization": f"Bearer {token}"})


def test_the_stock_client_works_with_a_token(hs_server):
    gw = Gateway(hs_server.url, auth=JWTAuth(token=hs256("jwt-alice")))
    cluster = new_cluster(gw)
    try:
        cluster.scale(1)
        with cluster.get_client(set_as_default=False) as client:
            assert client.submit(lambda x: x + 1, 41).result(timeout=90) == 42
        # Another user's token sees nothing of it; an admin group sees it.
        other = Gateway(hs_server.url, auth=JWTAuth(token=hs256("jwt-bob")))
        assert other.list_clusters() == []
        admin = Gateway(hs_server.url, auth=JWTAuth(token=hs256("jwt-carol", groups=["ops"])))
        assert [c.name for c in admin.list_clusters()] == [cluster.name]
    finally:
        cluster.shutdown()


@pytest.mark.parametrize(
    "token,reason",
    [
        (lambda: hs256("u", exp=int(time.time()) - 120), "expired"),
        (lambda: hs256("u", nbf=int(time.time()) + 600), "not valid yet"),
        (lambda: hs256("u", aud="other"), "wrong audience"),
        (lambda: hs256("u", iss="https://evil.example"), "wrong issuer"),
        # A configured audience or issuer must be in the token, not merely not contradicted.
        (lambda: jwt.encode({k: v for k, v in claims("u").items() if k != "aud"}, SECRET,
                            algorithm="HS256"), "wrong audience"),
        (lambda: jwt.encode({k: v for k, v in claims("u").items() if k != "iss"}, SECRET,
                            algorithm="HS256"), "wrong issuer"),
        (lambda: jwt.encode(claims("u"), "another-secret-32-bytes-long!!!!", algorithm="HS256"),
         "bad signature"),
        (lambda: "not-a-token", "malformed"),
    ],
)
def test_refused_tokens_say_why_without_echoing_them(hs_server, token, reason):
    t = token()
    r = bearer(hs_server, t)
    assert r.status == 401, r
    assert r.headers["WWW-Authenticate"] == "Bearer"
    msg = r.json()["error"]
    assert reason in msg and t not in msg, msg


def test_no_token_or_basic_is_challenged(hs_server):
    r = hs_server.http("GET", "/api/v1/clusters/")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = hs_server.http("GET", "/api/v1/clusters/", user="jwt-alice", password="x")
    assert r.status == 401


def test_jwtauth_from_dask_config_rereads_its_file(hs_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(hs256("jwt-dave"))
    auth = JWTAuth(token_file=str(token_file))
    first = auth.pre_request(None)[0]["Authorization"]
    token_file.write_text(hs256("jwt-erin") + "\n")
    second = auth.pre_request(None)[0]["Authorization"]
    assert first != second and second == "Bearer " + token_file.read_text().strip()
    with dask.config.set({"gateway.address": hs_server.url,
                          "gateway.auth.type": "dask_gateway_jwt.JWTAuth",
                          "gateway.auth.kwargs": {"token_file": str(token_file)}}):
        gw = Gateway()
        assert isinstance(gw.auth, JWTAuth)
        assert gw.list_clusters() == []


# -- RS256 / ES256 from a JWKS URL -------------------------------------------------------------

class Idp:
    """A JWKS endpoint on loopback whose keys the test can rotate."""

    def __init__(self):
        self.keys = {}
        self.jwks = {"keys": []}
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps(idp.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def add(self, kid, kind):
        if kind == "RS256":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        self.keys[kid] = (key, kind)
        self.jwks = {"keys": self.jwks["keys"] + [{**jwk, "kid": kid, "use": "sig", "alg": kind}]}

    def remove(self, kid):
        self.jwks = {"keys": [k for k in self.jwks["keys"] if k["kid"] != kid]}

    def token(self, kid, user, **extra):
        key, kind = self.keys[kid]
        return jwt.encode(claims(user, **extra), key, algorithm=kind, headers={"kid": kid})


@pytest.fixture(scope="module")
def idp():
    p = Idp()
    p.add("k1", "RS256")
    yield p
    p.server.shutdown()


@pytest.fixture(scope="module")
def jwks_server(module_servers, idp):
    return module_servers("jwt-jwks", stop_clusters_on_shutdown=True, auth={
        "type": "jwt",
        "jwt": {"jwks_url": idp.url, "issuer": ISSUER, "audience": AUDIENCE},
    })


def test_rs256_tokens_from_the_jwks(jwks_server, idp):
    gw = Gateway(jwks_server.url, auth=JWTAuth(token=idp.token("k1", "jwks-alice")))
    assert gw.list_clusters() == []
    r = bearer(jwks_server, idp.token("k1", "jwks-alice", exp=int(time.time()) - 300))
    assert r.status == 401 and "expired" in r.json()["error"]


def test_a_rotated_key_is_fetched_and_unknown_keys_are_refused(jwks_server, idp):
    idp.add("k2", "ES256")  # the IdP publishes a new (EC) key and signs with it
    token = idp.token("k2", "jwks-bob")
    # The gateway refetches on an unknown kid, at most every few seconds.
    wait_for(lambda: bearer(jwks_server, token).status == 200, 20, interval=1,
             what="the gateway to accept a token signed with the rotated key")
    idp.keys["k3"] = idp.keys["k1"]  # a kid the IdP never published
    r = bearer(jwks_server, idp.token("k3", "jwks-bob"))
    assert r.status == 401 and "unknown signing key" in r.json()["error"], r
    # A token with an RS256 header but an HS256 signature made with the public key is refused.
    forged = jwt.api_jws.PyJWS().encode(
        json.dumps(claims("jwks-mallory")).encode(), b"public-key-bytes-used-as-secret",
        algorithm="HS256", headers={"kid": "k1"})
    r = bearer(jwks_server, forged)
    assert r.status == 401, r


def test_gateway_cli_with_a_token(hs_server):
    import os
    import subprocess

    from test_cli import cli_binary

    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(DASK_CONFIG="/nonexistent", DASK_GATEWAY_JWT=hs256("jwt-frank"))
    r = subprocess.run([cli_binary(), "--address", hs_server.url, "--auth", "jwt", "-o", "json",
                        "list"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r
    env["DASK_GATEWAY_JWT"] = hs256("jwt-frank", exp=int(time.time()) - 300)
    r = subprocess.run([cli_binary(), "--address", hs_server.url, "--auth", "jwt", "list"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "expired" in r.stderr, r
