"""A hostile user against other users' browsers: dashboards are user-controlled content, and
the API must not act on a visitor's credentials for another site or for a dashboard page.

Driven by a real headless Chromium (tests/e2e/browser.py) logged in as the victim the way a
user is: it answers the gateway's Basic prompt, gets the session cookie, and keeps both.
"""

import http.server
import json
import threading
import urllib.parse

import pytest

from browser import Browser
from conftest import new_cluster

pytestmark = pytest.mark.not_helm  # one module-scoped gateway of its own per configuration

PASSWORD = "pw"
ALICE = "alice-victim"
MALLORY = "mallory-attacker"


def add_page(client, path, html=None, echo_headers=False):
    """Registers a Tornado handler on the cluster's own scheduler, as any user can with
    `run_on_scheduler`: it serves `html`, or echoes the request's headers as JSON."""

    def register(dask_scheduler=None, path=path, html=html, echo=echo_headers):
        import json as _json

        from tornado import web

        class Page(web.RequestHandler):
            def get(self):
                if echo:
                    self.set_header("Content-Type", "application/json")
                    self.set_header("Set-Cookie", "planted=1; Path=/; Domain=127.0.0.1")
                    self.finish(_json.dumps({k: v for k, v in self.request.headers.get_all()}))
                else:
                    self.set_header("Content-Type", "text/html")
                    self.finish(html)

        dask_scheduler.http_application.add_handlers(r".*", [(path, Page)])

    client.run_on_scheduler(register)


# What a page of mallory's tries in the victim's browser; `window.attack` holds the outcome.
ATTACK = """<!doctype html><title>innocent</title><script>
window.attack = (async () => {
  const api = "%(prefix)s/api/v1/clusters/";
  const out = {origin: self.origin};
  try { out.cookie = document.cookie; } catch (e) { out.cookie = "error: " + e.name; }
  try {
    const r = await fetch(api, {credentials: "include"});
    out.list = await r.text();
  } catch (e) { out.list = "error: " + e; }
  try {
    await fetch(api, {method: "POST", credentials: "include", mode: "no-cors",
                      headers: {"Content-Type": "text/plain"},
                      body: '{"cluster_options": {}}'});
    out.post_plain = "sent";
  } catch (e) { out.post_plain = "error: " + e; }
  try {
    const r = await fetch(api, {method: "POST", credentials: "include",
                                headers: {"Content-Type": "application/json"},
                                body: '{"cluster_options": {}}'});
    out.post_json = r.status;
  } catch (e) { out.post_json = "error: " + e; }
  return out;
})();
</script>"""


def all_clusters(gw):
    return {c.name for c in gw.list_clusters(status=["pending", "running", "stopping",
                                                      "stopped", "failed"])}


def log_in(browser, srv):
    """The victim opens the gateway's API in the browser and types their credentials."""
    browser.open(f"{srv.url}/api/v1/clusters/")
    body = browser.eval("document.body.innerText")
    assert body.strip().startswith("{"), body
    cookies = browser.cookies(srv.url + "/")
    assert cookies and all(c["httpOnly"] and c["sameSite"] == "Lax" for c in cookies), cookies


@pytest.fixture(scope="module")
def srv(module_servers):
    return module_servers("security", password=PASSWORD)


@pytest.fixture(scope="module")
def mallory_cluster(srv):
    gw = srv.gateway(MALLORY)
    c = new_cluster(gw)
    with c.get_client(set_as_default=False) as client:
        add_page(client, "/innocent", html=ATTACK % {"prefix": srv.prefix})
        add_page(client, "/headers", echo_headers=True)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def alice(srv):
    gw = srv.gateway(ALICE)
    c = new_cluster(gw)
    yield gw, c
    c.shutdown()


def test_dashboard_requests_carry_no_gateway_credentials(srv, mallory_cluster, alice):
    """What the scheduler (user code) receives through the dashboard route: neither the
    visitor's Authorization header nor the gateway's session cookie; and its answer cannot
    set that cookie."""
    r = srv.http("GET", "/api/v1/clusters/", user=ALICE)
    session = r.headers["Set-Cookie"].split(";")[0]
    r = srv.http("GET", f"/clusters/{mallory_cluster.name}/headers", user=ALICE,
                 headers={"Cookie": f"theirs=1; {session}"})
    assert r.status == 200, r
    seen = {k.lower(): v for k, v in r.json().items()}
    assert "authorization" not in seen, seen
    assert seen.get("cookie") == "theirs=1", seen
    assert r.headers["Content-Security-Policy"].startswith("sandbox allow-scripts"), r.headers
    assert "allow-same-origin" not in r.headers["Content-Security-Policy"]
    # The scheduler's own cookies pass, confined to its route (no other page of the gateway,
    # and no other user's dashboard, receives them); one named like the gateway's session
    # would not pass.
    route = urllib.parse.urlsplit(mallory_cluster.dashboard_link).path.rsplit("/status", 1)[0]
    assert route.endswith(f"/clusters/{mallory_cluster.name}"), route
    assert r.headers.get_all("Set-Cookie") == [f"planted=1; Path={route}/"]


def test_bokeh_dashboard_works_in_its_sandbox(srv, alice):
    _, cluster = alice
    with Browser(credentials=(ALICE, PASSWORD)) as browser:
        browser.open(f"{srv.url}/clusters/{cluster.name}/status")
        assert browser.eval("self.origin") == "null", "the dashboard must not share our origin"
        roots = browser.wait_js(
            "window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].roots().length",
            timeout=60, what="the Bokeh document to render")
        assert roots >= 1
        logs = [" ".join(str(a.get("value")) for a in e["params"].get("args", []))
                for e in browser.events if e.get("method") == "Runtime.consoleAPICalled"]
        assert any("Websocket connection 0 is now open" in line for line in logs), logs


def test_a_users_page_cannot_act_with_a_visitors_session(srv, mallory_cluster, alice):
    gw, own = alice
    before = all_clusters(gw)
    with Browser(credentials=(ALICE, PASSWORD)) as browser:
        log_in(browser, srv)
        browser.open(f"{srv.url}/clusters/{mallory_cluster.name}/innocent")
        out = browser.eval("window.attack", timeout=60)
    assert out["origin"] == "null", out
    assert out["cookie"].startswith("error"), out
    assert out["list"].startswith("error"), out
    assert own.name not in out["list"]
    assert str(out["post_json"]).startswith("error"), out
    assert all_clusters(gw) == before, "nothing may be created in the victim's name"


def test_without_the_sandbox_the_same_page_reads_the_visitors_clusters(module_servers):
    """The control for the test above: with `dashboard_csp: ""` the attack works, so the
    test above can fail (and operators see what the setting protects)."""
    srv = module_servers("security-off", password=PASSWORD, dashboard_csp="")
    gw = srv.gateway(ALICE)
    mine = new_cluster(gw)
    evil = new_cluster(srv.gateway(MALLORY))
    try:
        with evil.get_client(set_as_default=False) as client:
            add_page(client, "/innocent", html=ATTACK % {"prefix": srv.prefix})
        with Browser(credentials=(ALICE, PASSWORD)) as browser:
            log_in(browser, srv)
            browser.open(f"{srv.url}/clusters/{evil.name}/innocent")
            out = browser.eval("window.attack", timeout=60)
        assert out["origin"] != "null"
        assert mine.name in json.loads(out["list"]), out
    finally:
        srv.stop_all_clusters()


class _EvilSite(http.server.BaseHTTPRequestHandler):
    page = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args):
        pass


def test_a_cross_site_form_post_is_refused(srv, alice):
    """Another site (http://localhost:P is another site than http://127.0.0.1) submits a form
    with a JSON-looking text/plain body to the API while the victim is logged in."""
    gw, _ = alice
    before = all_clusters(gw)
    target = f"{srv.url}/api/v1/clusters/"
    page = f"""<!doctype html><body>
<form method="POST" enctype="text/plain" action="{target}">
<input name='{{"cluster_options": {{}}, "x": "' value='"}}'></form>
<script>
fetch("{target}", {{method: "POST", mode: "no-cors", credentials: "include",
                    headers: {{"Content-Type": "text/plain"}}, body: '{{"cluster_options": {{}}}}'}})
  .finally(() => document.forms[0].submit());
</script></body>"""
    handler = type("Evil", (_EvilSite,), {"page": page.encode()})
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        with Browser(credentials=(ALICE, PASSWORD)) as browser:
            log_in(browser, srv)
            browser.open(f"http://localhost:{site.server_address[1]}/")
            answer = browser.wait_js(
                "location.href.includes('/api/v1/clusters') && document.body.innerText",
                timeout=30, what="the form's answer")
        assert "Cross-origin request refused" in answer, answer
    finally:
        site.shutdown()
    assert all_clusters(gw) == before, "nothing may be created in the victim's name"


@pytest.mark.local_only  # the local gateway listens on loopback; on Kubernetes on all addresses
def test_a_rebound_host_name_reaches_nothing(srv):
    # DNS rebinding: a page at attacker.example points its own name at the gateway's loopback
    # address, then uses the API as its "own origin" from a visitor's browser.
    before = len(srv.gateway(ALICE).list_clusters())
    for path, method in [("/api/v1/clusters/", "GET"), ("/api/v1/clusters/", "POST"),
                         ("/", "GET"), ("/api/health", "GET")]:
        port = f":{srv.port}"
        r = srv.http(method, path, user=ALICE, body={} if method == "POST" else None,
                     headers={"Host": f"attacker.example{port}",
                              "Origin": f"http://attacker.example{port}"})
        assert r.status == 403, (path, r.status, r.body)
    assert len(srv.gateway(ALICE).list_clusters()) == before
    # The gateway's own names still work: its address and localhost.
    for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}"):
        r = srv.http("GET", "/api/v1/clusters/", user=ALICE, headers={"Host": host})
        assert r.status == 200, (host, r.status, r.body)
