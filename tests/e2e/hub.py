"""A real JupyterHub for the JupyterHub-authentication tests.

`Hub(tmpdir, service_url)` writes a `jupyterhub_config.py` into `tmpdir` and runs the stock
`jupyterhub` (with its configurable-http-proxy) from the venv of `tests/env/jupyterhub`, on free
loopback ports, as a subprocess in its own process group. The hub has:

- users `alice`, `bob`, `carol` and the admin `hubadmin`, logging in with a shared password
  (`SharedPasswordAuthenticator`: `hub.password`, and `hub.admin_password` for admins);
- groups `team-a: [alice]`, `team-b: [bob]`;
- an external service `dask-gateway` (the gateway under test, at `service_url`) with a known
  random `api_token` (`hub.service_token`), an OAuth client `service-dask-gateway` whose
  redirect URI is `service_url + callback_path` and which needs no confirmation page. The
  service's own token may read users and groups (role `dask-gateway-service`: `read:users`,
  `read:groups`), and every user may access the service (role `dask-gateway-users`:
  `access:services!service=dask-gateway`), so tokens they make carry that scope unless
  narrowed;
- an extra service `hub-admin` whose token (`hub.admin_token`) mints tokens for the tests.

Only the standard library is used here (the test venv has no `requests`), so HTTP goes through
`http_request()`, which never follows redirects: a test sees every `Location` itself.

    with Hub(tmp_path / "hub", "http://127.0.0.1:8000") as hub:
        tok = hub.token("alice")                                    # may use dask-gateway
        bare = hub.token("alice", scopes=hub.no_access_scopes("alice"))  # may not
        hub.api("GET", "/user", token=tok).json()["groups"]        # ['team-a']
        s = hub.login_session("alice")
        code = hub.authorize(s, state="xyz").query["code"]
        hub.exchange_code(code).json()["access_token"]
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ports import free_port

REPO = Path(__file__).resolve().parents[2]

_venv_cache: Path | None = None


def hub_venv() -> Path:
    """The hub's venv: $JUPYTERHUB_VENV, else the one `tests/env/jupyterhub` builds (once)."""
    global _venv_cache
    if os.environ.get("JUPYTERHUB_VENV"):
        return Path(os.environ["JUPYTERHUB_VENV"])
    if _venv_cache is None:
        out = subprocess.run([str(REPO / "tests" / "env" / "jupyterhub")], check=True,
                             text=True, stdout=subprocess.PIPE, timeout=900)
        _venv_cache = Path(out.stdout.strip().splitlines()[-1])
    return _venv_cache


# --- HTTP without redirects ---------------------------------------------------------------


class Response:
    """What `http_request` got back: status, headers, body (and helpers)."""

    def __init__(self, status: int, headers, body: bytes, url: str):
        self.status, self.headers, self.body, self.url = status, headers, body, url

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    @property
    def location(self) -> str | None:
        """The redirect target, made absolute."""
        loc = self.headers.get("Location")
        return urllib.parse.urljoin(self.url, loc) if loc else None

    @property
    def query(self) -> dict[str, str]:
        """The query parameters of the redirect target (one value each)."""
        loc = self.location or ""
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(loc).query))

    def __repr__(self):
        return f"<Response {self.status} {self.url}>"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def http_request(method: str, url: str, *, token: str | None = None, auth_scheme="token",
                 headers: dict | None = None, json_body=None, form: dict | None = None,
                 cookies: http.cookiejar.CookieJar | None = None, timeout=30) -> Response:
    """One request, redirects not followed; `token` goes in `Authorization: <auth_scheme> X`."""
    headers = dict(headers or {})
    data = None
    if json_body is not None:
        data = json.dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    if token is not None:
        headers["Authorization"] = f"{auth_scheme} {token}"
    handlers = [_NoRedirect()]
    if cookies is not None:
        handlers.append(urllib.request.HTTPCookieProcessor(cookies))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return Response(resp.status, resp.headers, resp.read(), url)
    except urllib.error.HTTPError as e:  # 3xx (not followed), 4xx, 5xx
        with e:
            return Response(e.code, e.headers, e.read(), url)


class HubSession:
    """A browser-like cookie jar logged in to the hub (see `Hub.login_session`)."""

    def __init__(self, hub: "Hub", user: str):
        self.hub, self.user = hub, user
        self.cookies = http.cookiejar.CookieJar()
        self.login_response: Response | None = None

    def request(self, method: str, url: str, **kwargs) -> Response:
        """`url` may be absolute or a path on the hub's public URL."""
        if url.startswith("/"):
            url = self.hub.url + url
        return http_request(method, url, cookies=self.cookies, **kwargs)

    def get(self, url: str, **kwargs) -> Response:
        return self.request("GET", url, **kwargs)

    def xsrf(self) -> str | None:
        """The hub's `_xsrf` cookie, to send back as form field `_xsrf` on a POST."""
        return next((c.value for c in self.cookies if c.name == "_xsrf"), None)

    def cookie_header(self) -> str:
        """`name=value; ...` of every cookie, e.g. for a raw client or a browser."""
        return "; ".join(f"{c.name}={c.value}" for c in self.cookies)


# --- the hub -------------------------------------------------------------------------------


class Hub:
    """A running JupyterHub with one external service; see the module docstring."""

    def __init__(self, tmpdir, service_url: str, *, callback_path="/api/oauth_callback",
                 service_name="dask-gateway", users=("alice", "bob", "carol"),
                 admin_users=("hubadmin",), groups=None, service_access=None,
                 service_scopes=("read:users", "read:groups"),
                 oauth_client_allowed_scopes=None, proxied=True, extra_config="", start=True,
                 timeout=60):
        """
        tmpdir:        where the config, sqlite db, cookie secret, pid files and log go.
        service_url:   where the gateway listens (no trailing slash); also the URL the proxy
                       routes `/services/<service_name>/` to.
        callback_path: appended to service_url to make the OAuth redirect URI.
        service_access: users given `access:services!service=<service_name>` (default: all
                       users and admins); others can log in but not use the service.
        service_scopes: what the service's own api_token may do.
        oauth_client_allowed_scopes: extra scopes the service's OAuth tokens may carry.
        proxied:       give the service `url` = service_url, so the proxy routes
                       /services/<service_name>/... to service_url + the same path. The hub
                       then probes that URL once at startup (~1 s when nothing listens yet);
                       False leaves `url` out.
        extra_config:  Python appended to jupyterhub_config.py.
        """
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.service_url = service_url.rstrip("/")
        self.service_name = service_name
        self.oauth_client_id = f"service-{service_name}"
        self.oauth_redirect_uri = self.service_url + callback_path
        self.users = list(users)
        self.admin_users = list(admin_users)
        self.groups = {"team-a": ["alice"], "team-b": ["bob"]} if groups is None else groups
        self.service_access = list(self.users + self.admin_users if service_access is None
                                   else service_access)
        self.service_scopes = list(service_scopes)
        self.oauth_client_allowed_scopes = list(oauth_client_allowed_scopes or [])
        self.proxied = proxied
        self.extra_config = extra_config
        self.password = "pw-" + secrets.token_hex(8)          # >= 8 characters
        self.admin_password = "admin-pw-" + secrets.token_hex(16)  # >= 32 characters
        self.service_token = secrets.token_hex(32)
        self.admin_token = secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "jupyterhub.log"
        self.startup_seconds: float | None = None
        if start:
            self.start(timeout=timeout)

    # URLs
    @property
    def url(self) -> str:
        """The public URL (through configurable-http-proxy), as a browser sees it."""
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        """The hub's REST API, straight to the hub (what services get as JUPYTERHUB_API_URL)."""
        return f"http://127.0.0.1:{self.hub_port}/hub/api"

    @property
    def public_api_url(self) -> str:
        """The same API through the proxy."""
        return f"{self.url}/hub/api"

    def authorize_url(self, state="xyz", redirect_uri=None, **extra) -> str:
        """The URL a service redirects a browser to, to start the OAuth code flow."""
        query = {"client_id": self.oauth_client_id,
                 "redirect_uri": redirect_uri or self.oauth_redirect_uri,
                 "response_type": "code", "state": state, **extra}
        return f"{self.url}/hub/api/oauth2/authorize?" + urllib.parse.urlencode(query)

    # lifecycle
    def _config(self) -> str:
        service = {"name": self.service_name, "api_token": self.service_token,
                   "oauth_redirect_uri": self.oauth_redirect_uri, "oauth_no_confirm": True,
                   "oauth_client_allowed_scopes": self.oauth_client_allowed_scopes}
        if self.proxied:
            service["url"] = self.service_url
        services = [service, {"name": "hub-admin", "api_token": self.admin_token}]
        roles = [
            {"name": f"{self.service_name}-service", "scopes": self.service_scopes,
             "services": [self.service_name]},
            {"name": f"{self.service_name}-users", "users": self.service_access,
             "scopes": [f"access:services!service={self.service_name}"]},
            # mint/revoke users' tokens, manage users and groups
            {"name": "hub-admin", "services": ["hub-admin"],
             "scopes": ["admin:users", "admin:groups", "tokens", "read:roles"]},
        ]
        d = str(self.dir)
        return f"""# Written by tests/e2e/hub.py
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{self.proxy_port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{self.hub_port}"
c.JupyterHub.hub_connect_url = "http://127.0.0.1:{self.hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{str(self.venv / "bin" / "configurable-http-proxy")!r}]
c.ConfigurableHTTPProxy.pid_file = {d + "/proxy.pid"!r}
c.JupyterHub.pid_file = {d + "/jupyterhub.pid"!r}
c.JupyterHub.db_url = {"sqlite:///" + d + "/jupyterhub.sqlite"!r}
c.JupyterHub.cookie_secret_file = {d + "/cookie_secret"!r}
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
# nothing is ever spawned: a browser that follows the post-login redirect lands on /hub/home
c.JupyterHub.default_url = "/hub/home"
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = {self.password!r}
c.SharedPasswordAuthenticator.admin_password = {self.admin_password!r}
c.Authenticator.allowed_users = {set(self.users)!r}
c.Authenticator.admin_users = {set(self.admin_users)!r}
c.JupyterHub.load_groups = {{name: {{"users": members}} for name, members in {self.groups!r}.items()}}
c.JupyterHub.services = {services!r}
c.JupyterHub.load_roles = {roles!r}
c.JupyterHub.log_level = "DEBUG"
{self.extra_config}
"""

    def start(self, timeout=60):
        """Writes the config, starts the hub and waits for its API via the proxy."""
        self.venv = hub_venv()
        last_error = None
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.hub_port, self.proxy_port, self.proxy_api_port = (free_port() for _ in range(3))
            (self.dir / "jupyterhub_config.py").write_text(self._config())
            env = dict(os.environ)
            env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
            for var in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL", "CONFIGPROXY_AUTH_TOKEN",
                        "PYTHONPATH", "VIRTUAL_ENV"):
                env.pop(var, None)
            t0 = time.monotonic()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "jupyterhub"), "-f", str(self.dir / "jupyterhub_config.py")],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
            log.close()
            try:
                self._wait_ready(timeout)
                self.startup_seconds = time.monotonic() - t0
                return self
            except RuntimeError as e:
                last_error = e
                self.stop()
                if "Address already in use" not in self.log_tail():
                    break
        raise last_error

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                # through the proxy: the hub is up and has registered its route
                if http_request("GET", self.public_api_url + "/", timeout=2).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyterhub did not answer within {timeout}s:\n"
                                   + self.log_tail())
            time.sleep(0.1)

    def stop(self, timeout=15):
        """SIGTERM to the hub (it stops its proxy), then SIGKILL to whatever is left."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the hub's group
            except ProcessLookupError:
                pass
            proc.wait()
        # the proxy runs in a session of its own; the hub normally stops it on SIGTERM
        pid_file = self.dir / "proxy.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
            pid_file.unlink(missing_ok=True)

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines=60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # REST API
    def api(self, method: str, path: str, *, token: str | None = None, json_body=None,
            **kwargs) -> Response:
        """`path` relative to api_url (e.g. "/user"); `token` defaults to the admin token."""
        return http_request(method, self.api_url + path,
                            token=self.admin_token if token is None else token,
                            json_body=json_body, **kwargs)

    def token(self, user: str, scopes=None, *, note="e2e", expires_in=None) -> str:
        """A new API token of `user`, minted with the admin token.

        scopes=None: the `token` role, i.e. everything the user may do, including
        `access:services!service=dask-gateway` if the user is in `service_access`.
        A list narrows it, e.g. `no_access_scopes(user)` for a token without the service.
        """
        body = {"note": note}
        if scopes is not None:
            body["scopes"] = list(scopes)
        if expires_in is not None:
            body["expires_in"] = expires_in
        r = self.api("POST", f"/users/{user}/tokens", json_body=body)
        if r.status != 201:
            raise RuntimeError(f"minting a token for {user}: {r.status} {r.text}")
        return r.json()["token"]

    def access_scope(self) -> str:
        return f"access:services!service={self.service_name}"

    @staticmethod
    def no_access_scopes(user: str) -> list[str]:
        """Scopes for a valid token of `user` that lacks access to the service."""
        return [f"read:users:name!user={user}"]

    # browser side
    def login_session(self, user: str, password: str | None = None, *,
                      next_url: str | None = None) -> HubSession:
        """Logs in through the hub's form, as a browser would: GET /hub/login for the `_xsrf`
        cookie and hidden field, then POST them with the credentials. Raises on failure.

        `next_url` (e.g. `authorize_url()`) goes in `?next=`, as after the hub's redirect of
        a browser that was not logged in; the 302 of the POST is `session.login_response`
        (its Location is `next_url` made relative, or /hub/ without one)."""
        if password is None:
            password = self.admin_password if user in self.admin_users else self.password
        s = HubSession(self, user)
        login = "/hub/login"
        if next_url:
            split = urllib.parse.urlsplit(next_url)
            nxt = split.path + ("?" + split.query if split.query else "")
            login += "?" + urllib.parse.urlencode({"next": nxt})
        page = s.get(login)
        if page.status != 200:
            raise RuntimeError(f"GET {login}: {page.status}")
        m = re.search(r'name="_xsrf"\s+value="([^"]+)"', page.text)
        xsrf = m.group(1) if m else s.xsrf()
        r = s.request("POST", login,
                      form={"username": user, "password": password, "_xsrf": xsrf})
        s.login_response = r
        if r.status != 302 or not any(c.name == "jupyterhub-session-id" for c in s.cookies) \
                or not any(c.name == "jupyterhub-hub-login" for c in s.cookies):
            raise RuntimeError(f"login of {user} failed: {r.status} {r.text[:300]}")
        return s

    def authorize(self, session: HubSession | None, state="xyz", **kwargs) -> Response:
        """GET the authorize URL with the session's cookies (or none): a 302 either to
        `<redirect_uri>?code=...&state=...` or, without a login, to /hub/login?next=..."""
        url = self.authorize_url(state, **kwargs)
        if session is None:
            return http_request("GET", url)
        return session.get(url)

    def exchange_code(self, code: str, *, redirect_uri=None, client_secret=None) -> Response:
        """The service's side of the code flow: POST {api_url}/oauth2/token."""
        return http_request("POST", self.api_url + "/oauth2/token", form={
            "client_id": self.oauth_client_id,
            "client_secret": self.service_token if client_secret is None else client_secret,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri or self.oauth_redirect_uri,
        })


if __name__ == "__main__":  # manual use: python tests/e2e/hub.py [service_url]
    import tempfile
    with Hub(tempfile.mkdtemp(prefix="dgrs-hub-"),
             sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000") as hub:
        print(f"hub at {hub.url} (API {hub.api_url}), started in {hub.startup_seconds:.1f}s; "
              f"service token {hub.service_token}; password {hub.password}; Ctrl-C stops it",
              flush=True)
        try:
            while hub.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
