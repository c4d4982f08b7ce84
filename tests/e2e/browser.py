"""A real headless Chromium for the tests, driven over the DevTools protocol.

Just what the browser tests need: open pages, answer HTTP Basic prompts the way a user types
credentials, evaluate JavaScript in the page, and read cookies. The browser comes from
`tests/env/chromium` (Debian's package); each `Browser` has its own throw-away profile.
"""

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[2]


def chromium_path():
    out = subprocess.run([str(REPO / "tests" / "env" / "chromium")], check=True, text=True,
                         stdout=subprocess.PIPE, timeout=900)
    return out.stdout.strip().splitlines()[-1]


class CdpError(Exception):
    """A DevTools command failed."""


class Browser:
    """One headless Chromium process with a fresh profile, and one tab in it."""

    def __init__(self, credentials=None):
        """`credentials` = (user, password) answers every HTTP Basic prompt, as a user would."""
        self.profile = Path(tempfile.mkdtemp(prefix="dgrs-chromium-"))
        self.proc = subprocess.Popen(
            [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--disable-background-networking", "--disable-extensions", "--no-proxy-server",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        # Unbounded queue: events pile up while a test waits on something else (a page that
        # polls sends many), and a full queue would stop reading, keepalive pongs included.
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, max_queue=None,
                          open_timeout=30)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.events = []
        self.credentials = credentials
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Network.enable"):
            self.send(method, session=self.session)
        if credentials:
            self.send("Fetch.enable", session=self.session, handleAuthRequests=True,
                      patterns=[{"urlPattern": "*"}])

    # -- protocol ----------------------------------------------------------------------------
    def send(self, method, session=None, timeout=60, **params):
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        with self._lock:
            self.ws.send(json.dumps(msg))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CdpError(f"{method}: no answer within {timeout}s")
                reply = json.loads(self.ws.recv(timeout=left))
                if reply.get("id") == msg_id:
                    if "error" in reply:
                        raise CdpError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self._on_event(reply)

    def _on_event(self, event):
        method = event.get("method", "")
        params = event.get("params", {})
        if method == "Fetch.requestPaused":
            self._send_async("Fetch.continueRequest", requestId=params["requestId"])
        elif method == "Page.javascriptDialogOpening":
            # A confirm() or alert() is answered OK, as a user clicking through would.
            self._send_async("Page.handleJavaScriptDialog", accept=True)
            self.events.append(event)
        elif method == "Fetch.authRequired":
            user, password = self.credentials
            self._send_async("Fetch.continueWithAuth", requestId=params["requestId"],
                             authChallengeResponse={"response": "ProvideCredentials",
                                                    "username": user, "password": password})
        else:
            self.events.append(event)

    def _send_async(self, method, **params):
        """Sends a command whose answer is not waited for (from inside the event loop)."""
        msg = {"id": next(self._ids), "method": method, "params": params,
               "sessionId": self.session}
        self.ws.send(json.dumps(msg))

    def pump(self, seconds):
        """Handles events (auth prompts, paused requests) for `seconds`."""
        deadline = time.monotonic() + seconds
        with self._lock:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    self._on_event(json.loads(self.ws.recv(timeout=left)))
                except TimeoutError:
                    break

    # -- what tests use ------------------------------------------------------------------------
    def open(self, url, timeout=60):
        """Navigates the tab to `url` and waits for its load event."""
        self.events.clear()
        result = self.send("Page.navigate", session=self.session, url=url)
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise CdpError(f"{url} did not finish loading within {timeout}s")
            self.pump(0.2)

    def eval(self, expression, timeout=60):
        """Evaluates JavaScript in the page (awaiting a promise) and returns its JSON value."""
        result = self.send("Runtime.evaluate", session=self.session, timeout=timeout,
                           expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise CdpError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_js(self, expression, timeout=60, what=None):
        """Waits until `expression` is truthy in the page; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            self.pump(0.25)

    def viewport(self, width, height, mobile=False):
        """Sets the tab's viewport size (CSS pixels), as a laptop or a phone would have."""
        self.send("Emulation.setDeviceMetricsOverride", session=self.session, width=width,
                  height=height, deviceScaleFactor=1, mobile=mobile)

    def screenshot(self, path, full_page=True):
        """Writes a PNG of the page (the whole page by default) to `path`."""
        import base64
        params = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics", session=self.session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                              "scale": 1}
        data = self.send("Page.captureScreenshot", session=self.session, **params)["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))

    def cookies(self, url):
        return self.send("Network.getCookies", session=self.session, urls=[url])["cookies"]

    def close(self):
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, 9)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
