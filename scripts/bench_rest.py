"""What the benchmark scripts share: one REST call to a gateway, timed, and a percentile."""

import base64
import json
import time
import urllib.error
import urllib.request


def basic_header(user):
    """The Authorization header of `user` with an empty password (simple auth)."""
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


def rest(url, method, path, user, body=None, timeout=120):
    """One API request to the gateway at `url` with Basic auth: (status or None when no answer
    came, parsed body or text or the error, seconds)."""
    headers = {"Authorization": basic_header(user)}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(url + path, method=method, headers=headers, data=data)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except OSError as e:
        return None, repr(e), time.perf_counter() - t0
    took = time.perf_counter() - t0
    try:
        return status, json.loads(raw or b"null"), took
    except ValueError:
        return status, raw.decode("utf-8", "replace"), took


def percentile(values, q):
    """The `q` quantile (0..1) of `values`, nearest rank; None if there are none."""
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else None
