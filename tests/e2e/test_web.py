"""The web page at the gateway's root, in a real headless Chromium: sign in (the Basic prompt),
create a cluster with non-default options from the generated form, watch it turn RUNNING with
its events, scale, adapt, open the dashboard, copy the snippet, stop it; another user never sees
it; the admin's page shows every user's clusters, usage and the gateway's health; hostile user
names and option values render as text; a cross-site request is refused. Screenshots of the
user's and the admin's page go to docs/images/.
"""

import http.server
import json
import threading
from pathlib import Path

import pytest

from browser import Browser
from conftest import OPTIONS_CONFIG, cluster_status, new_cluster, wait_for

pytestmark = [pytest.mark.local_only, pytest.mark.not_helm]  # the page is the same on every backend

# A user name and an option value that would run script if they were ever treated as markup.
HOSTILE = '"><img src=x id=pwned-name onerror="window.__pwned=1">'
HOSTILE_VALUE = '<script>window.__pwned=2</script>"><img src=x id=pwned-opt onerror="window.__pwned=3">'
BOB, ADMIN = "bob-web", "ada-web"
PASSWORD = "web-pass"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "images"


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers("web", password=PASSWORD, admin_users=[ADMIN],
                          cluster={"options": OPTIONS_CONFIG, "max_workers": 4})


def page_url(server):
    return server.url + "/"


def open_page(browser, server):
    browser.viewport(1280, 900)
    browser.open(page_url(server))
    # The page signs in, then builds the form and reads the clusters: done when not busy.
    browser.wait_js("!!document.querySelector('#whoami strong') &&"
                    " !document.querySelector('main').hasAttribute('aria-busy')",
                    what="the signed-in user and the page's first read")
    assert browser.eval("document.getElementById('create').disabled") is False


def row_text(browser, name, selector):
    return browser.eval(
        f"(() => {{ const r = document.querySelector('tr[data-cluster=\"{name}\"]');"
        f" return r ? (r.querySelector('{selector}') || {{}}).textContent || '' : null; }})()")


def no_injection(browser):
    """Nothing user-controlled became markup: no foreign elements, no script ran."""
    assert browser.eval("window.__pwned === undefined"), "injected script ran"
    assert browser.eval("document.querySelectorAll('img, #pwned-name, #pwned-opt').length") == 0
    assert browser.eval("document.scripts.length") == 1


def test_a_user_runs_a_cluster_from_the_page_and_others_never_see_it(server):
    with Browser(credentials=(HOSTILE, PASSWORD)) as browser:
        open_page(browser, server)
        assert browser.eval("document.querySelector('#whoami strong').textContent") == HOSTILE
        # The form is generated from GET /api/v1/options: same fields, types and bounds.
        fields = browser.eval("[...document.querySelectorAll('#option-fields [name]')]"
                              ".map(e => [e.name, e.type, e.min || null, e.max || null])")
        assert [f[0] for f in fields] == [o["field"] for o in OPTIONS_CONFIG]
        assert fields[0] == ["worker_cores", "number", "1", "4"]
        assert browser.eval("document.getElementById('opt-profile').tagName") == "SELECT"
        # A value out of bounds is refused in the API's words, and nothing is created.
        browser.eval("document.getElementById('opt-worker_cores').value = '9';"
                     "document.getElementById('create').click()")
        notice = browser.wait_js("!document.getElementById('notice').hidden &&"
                                 " document.getElementById('notice').textContent",
                                 what="the refusal")
        assert "worker_cores" in notice and "4" in notice, notice
        # It stays after the page's own polls have run (every 2 s) and succeeded: a refusal is
        # not wiped by a background read before the user has read it.
        browser.pump(2.5)
        assert browser.eval("!document.getElementById('notice').hidden &&"
                            " document.getElementById('notice').textContent") == notice
        assert server.gateway(HOSTILE).list_clusters() == []
        # Non-default options, one worker at start.
        browser.eval(
            "document.getElementById('opt-worker_cores').value = '2';"
            f"document.getElementById('opt-image').value = {json.dumps(HOSTILE_VALUE)};"
            "document.getElementById('opt-profile').value = 'large';"
            "document.getElementById('new-workers').value = '1';"
            "document.getElementById('create').click()")
        name = browser.wait_js("(document.querySelector('tr[data-cluster]') || {}).dataset"
                               "?.cluster", what="the new cluster's row")
        gw = server.gateway(HOSTILE)
        options = gw.get_cluster(name).options
        assert (options["worker_cores"], options["image"], options["profile"]) == \
            (2, HOSTILE_VALUE, "large")
        wait_for(lambda: row_text(browser, name, ".status") == "RUNNING", 90,
                 what="the row to say RUNNING")
        wait_for(lambda: row_text(browser, name, "td.num") == "1 / 1", 90,
                 what="the worker asked for at creation")
        # Its details opened with it: events live, the options (as text) and the snippets.
        assert browser.eval(f"[...document.querySelectorAll('tr[data-cluster=\"{name}\"] button')]"
                            ".some(b => b.textContent === 'Hide details')")
        browser.wait_js("[...document.querySelectorAll('ul.events .why')]"
                        ".some(e => e.textContent === 'Running')", what="the Running event")
        details = browser.eval("document.querySelector('tr.detail').textContent")
        assert HOSTILE_VALUE in details
        snippet = browser.eval("document.querySelector('pre.snippet').textContent")
        assert f'gateway.connect("{name}")' in snippet and server.url in snippet
        # Scale to 2 from the row's form.
        browser.eval(f"(() => {{ const r = document.querySelector('tr[data-cluster=\"{name}\"]');"
                     " const f = r.querySelector('form[aria-label=Scale]');"
                     " f.querySelector('input').value = '2'; f.requestSubmit(); })()")
        wait_for(lambda: row_text(browser, name, "td.num") == "2 / 2", 90,
                 what="two workers")
        browser.wait_js("[...document.querySelectorAll('ul.events .why')]"
                        ".some(e => e.textContent === 'ScaleRequested')",
                        what="the scale request's event, live")
        # Adaptive scaling between 1 and 2.
        browser.eval(f"(() => {{ const r = document.querySelector('tr[data-cluster=\"{name}\"]');"
                     " const f = r.querySelector('form[aria-label=Adapt]');"
                     " const [lo, hi] = f.querySelectorAll('input'); lo.value = '1';"
                     " hi.value = '2'; f.requestSubmit(); })()")
        browser.wait_js("[...document.querySelectorAll('ul.events .why')]"
                        ".some(e => e.textContent === 'AdaptRequested')", what="adapt's event")
        # The dashboard opens (through the gateway, at the link the page gives).
        href = browser.eval(f"document.querySelector('tr[data-cluster=\"{name}\"] a').href")
        assert href == f"{server.url}/clusters/{name}/status"
        assert browser.eval(f"fetch({json.dumps(href)}).then(r => r.status)") == 200
        no_injection(browser)
        # Every control has a name a screen reader says, and nothing is reached only by mouse.
        unnamed = browser.eval(
            "[...document.querySelectorAll('input, select, textarea, button')].filter(e =>"
            " !(e.labels && e.labels.length) && !e.getAttribute('aria-label')"
            " && !e.textContent.trim()).map(e => e.outerHTML)")
        assert unnamed == [], unnamed
        assert browser.eval("[...document.querySelectorAll('[tabindex]')]"
                            ".every(e => Number(e.getAttribute('tabindex')) >= 0)")
        browser.screenshot(DOCS / "web-user.png")

        # Another user: not on their page, and its events are refused to them.
        with Browser(credentials=(BOB, PASSWORD)) as other:
            open_page(other, server)
            other.wait_js("document.getElementById('no-clusters').hidden === false",
                          what="bob's empty list")
            assert other.eval(f"document.querySelector('tr[data-cluster=\"{name}\"]')") is None
            status = other.eval(f"fetch('api/v1/clusters/{name}/events').then(r => r.status)")
            assert status == 403

        # Stop from the page: a first click asks, a second one stops.
        stop = (f"[...document.querySelectorAll('tr[data-cluster=\"{name}\"] button')]"
                ".find(b => b.classList.contains('danger'))")
        browser.eval(f"{stop}.click()")
        assert browser.eval(f"{stop}.textContent") == "Confirm stop"
        assert gw.get_cluster(name).status.name == "RUNNING"
        browser.eval(f"{stop}.click()")
        # The browser's requests go on only while it is attended (it answers sign-in prompts).
        wait_for(lambda: (browser.pump(0.3), cluster_status(gw, name))[1] == "STOPPED", 60,
                 what="the cluster to stop")
        wait_for(lambda: row_text(browser, name, ".status") is None, 30,
                 what="the stopped cluster to leave the active list")


def test_the_admin_sees_everyone_usage_and_health(server):
    gw_bob = server.gateway(BOB)
    bobs = new_cluster(gw_bob)
    hostile = new_cluster(server.gateway(HOSTILE))
    try:
        with Browser(credentials=(ADMIN, PASSWORD)) as browser:
            open_page(browser, server)
            assert browser.eval("document.getElementById('whoami').textContent").endswith(
                "(admin)")
            for c in (bobs, hostile):
                browser.wait_js(f"!!document.querySelector('tr[data-cluster=\"{c.name}\"]')",
                                what=f"cluster {c.name}")
            owner = browser.eval(f"document.querySelector('tr[data-cluster=\"{hostile.name}\"]')"
                                 ".children[1].textContent")
            assert owner == HOSTILE
            # Filter by user.
            browser.eval("(() => { const f = document.getElementById('filter-user');"
                         " f.value = 'bob'; f.dispatchEvent(new Event('input')); })()")
            browser.wait_js(f"!document.querySelector('tr[data-cluster=\"{hostile.name}\"]')",
                            what="the filter to hide other users")
            assert browser.eval(f"!!document.querySelector('tr[data-cluster=\"{bobs.name}\"]')")
            browser.eval("(() => { const f = document.getElementById('filter-user');"
                         " f.value = ''; f.dispatchEvent(new Event('input')); })()")
            # Usage per user, everyone's, and the health panel.
            users = browser.wait_js(
                "(() => { const u = [...document.querySelectorAll('#usage tbody tr td:first-child')]"
                ".map(td => td.textContent); return u.length >= 2 && u; })()",
                what="usage rows")
            assert HOSTILE in users and BOB in users
            browser.wait_js("document.getElementById('health-list').children.length > 0",
                            what="the health panel")
            assert not browser.eval("document.getElementById('health').hidden")
            no_injection(browser)
            browser.screenshot(DOCS / "web-admin.png")
            # A phone: nothing wider than the screen but the tables' own scrolling.
            browser.viewport(390, 844, mobile=True)
            browser.open(page_url(server))
            browser.wait_js(f"!!document.querySelector('tr[data-cluster=\"{bobs.name}\"]')",
                            what="the list on a phone")
            wide = browser.eval(
                "[...document.querySelectorAll('body *')].filter(e => !e.closest('.table-wrap')"
                " && e.getBoundingClientRect().right > 391).map(e => e.tagName + '#' + e.id"
                " + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))")
            assert browser.eval("document.documentElement.scrollWidth") <= 390, wide
            browser.screenshot(DOCS / "web-phone.png")
        # A user's page has no admin parts, and the overview is refused to them.
        with Browser(credentials=(BOB, PASSWORD)) as browser:
            open_page(browser, server)
            assert browser.eval("document.getElementById('health').hidden")
            assert browser.eval("fetch('api/v1/overview').then(r => r.status)") == 403
    finally:
        bobs.shutdown()
        hostile.shutdown()


class _AttackerPage(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self):  # noqa: N802 - the stdlib's name
        body = (
            "<!doctype html><script>"
            f"fetch({json.dumps(self.target)}, {{method: 'POST', mode: 'no-cors',"
            " credentials: 'include', headers: {'Content-Type': 'text/plain'},"
            " body: JSON.stringify({cluster_options: {}})}).then(() => document.title = 'sent',"
            " () => document.title = 'sent');"
            "</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_cross_site_request_with_the_users_session_is_refused(server):
    handler = type("Attacker", (_AttackerPage,), {"target": server.url + "/api/v1/clusters/"})
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        with Browser(credentials=(BOB, PASSWORD)) as browser:
            open_page(browser, server)  # bob is signed in: a session cookie and Basic credentials
            before = len(server.gateway(BOB).list_clusters())
            browser.open(f"http://127.0.0.1:{attacker.server_address[1]}/")
            browser.wait_js("document.title === 'sent'", what="the attacker's request")
            browser.pump(1)
            assert len(server.gateway(BOB).list_clusters()) == before
    finally:
        attacker.shutdown()
