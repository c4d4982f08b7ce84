"""Restart stress (not part of tests/run; `scripts/restart-stress` runs it): the gateway restarts
N times while several users' open Clients compute throughout, and every Client must reconnect.

- Local backend: the gateway process is killed (SIGKILL) and stopped (SIGTERM), alternately, and
  started again at once on the same config and data directory.
- Through the Helm chart (E2E_BACKEND=helm): the gateway pods are force-deleted (their process
  gets SIGKILL) and deleted gracefully (preStop, then SIGTERM), alternately; the Deployment
  replaces them.

Each Client runs a small task after another (a task may fail while the gateway is away). For
each restart and Client it records how long after the restart began the Client computed again,
prints a table, and fails if any Client was lost for good or did not compute again within
`STRESS_RECONNECT_TIMEOUT` seconds. `STRESS_RESTARTS` (default 20) and `STRESS_CLIENTS`
(default 3) size it.
"""

import collections
import json
import os
import random
import re
import statistics
import threading
import time

import pytest

from conftest import HELM, KubeEnv, new_cluster, wait_for, wait_workers

pytestmark = pytest.mark.stress

RESTARTS = int(os.environ.get("STRESS_RESTARTS", "20"))
CLIENTS = int(os.environ.get("STRESS_CLIENTS", "3"))
RECONNECT_TIMEOUT = float(os.environ.get("STRESS_RECONNECT_TIMEOUT", "60"))


class Computing(threading.Thread):
    """Runs one small task after another on `client`, recording when each succeeded and which
    errors it met; stops at `stop` or when the Client has closed itself (lost)."""

    def __init__(self, name, client, stop):
        super().__init__(daemon=True, name=f"computing-{name}")
        self.client, self.stop = client, stop
        self.successes = []
        self.errors = collections.Counter()
        self.lost = None

    def run(self):
        x = 0
        while not self.stop.is_set():
            x += 1
            try:
                assert self.client.submit(lambda v: v + 1, x, pure=False).result(timeout=10) == x + 1
                self.successes.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - the gateway may be away; counted
                # By kind: task keys, addresses and ports vary from one error to the next.
                what = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+\.\d+\.\d+\.\d+:\d+", "…", str(e))
                self.errors[f"{type(e).__name__}: {what[:70]}"] += 1
                if self.client.status in ("closing", "closed"):
                    self.lost = f"{type(e).__name__}: {e}"
                    return
                time.sleep(0.05)
            time.sleep(0.02)

    def computed_since(self, t):
        return next((s for s in self.successes if s > t), None)


def restart(server, i):
    """Restart number i: alternately the hard and the graceful way. Returns its name."""
    if HELM:
        force = i % 2 == 0
        old = set(server.gateway_pods())
        args = ["delete", "pod", "-n", server.namespace, "--wait=false",
                "-l", f"app.kubernetes.io/instance={server.release},{server.GATEWAY_PODS}"]
        if force:
            args += ["--grace-period=0", "--force"]
        KubeEnv.get().kubectl(*args)
        wait_for(lambda: (now := set(server.gateway_pods())) and not (now & old), 180,
                 what="the gateway pod to be replaced")
        return "pod force-deleted" if force else "pod deleted"
    if i % 2 == 0:
        server.kill9()
        how = "SIGKILL"
    else:
        server.terminate()
        how = "SIGTERM"
    server.start()
    return how


def test_open_clients_survive_every_restart(server_factory):
    server = server_factory("stress", cluster={"heartbeat_period": 2})
    stop = threading.Event()
    clusters, workers = [], []
    try:
        for n in range(CLIENTS):
            gw = server.gateway(f"stress-user-{n}")
            c = new_cluster(gw, shutdown_on_close=False)
            c.scale(1)
            client = c.get_client(set_as_default=False)
            wait_workers(client, 1, timeout=120)
            clusters.append((gw, c))
            w = Computing(n, client, stop)
            w.start()
            workers.append(w)
        rng = random.Random(7)
        rows = []
        for i in range(RESTARTS):
            time.sleep(rng.uniform(0.5, 2.0))
            t0 = time.monotonic()
            how = restart(server, i)
            up = time.monotonic() - t0
            wait_for(lambda: all(w.lost or w.computed_since(t0) for w in workers),
                     RECONNECT_TIMEOUT + up, interval=0.1,
                     what=f"every open client to compute after restart {i + 1} ({how})")
            rows.append((how, up, [None if w.lost else w.computed_since(t0) - t0 for w in workers]))
            if any(w.lost for w in workers):
                break
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)

    # The report: one line per restart, then totals.
    print(f"\nrestart stress: {len(rows)} restarts, {CLIENTS} open clients")
    print(f"{'#':>3}  {'how':<18} {'gateway back':>12}  reconnected after (s)")
    for i, (how, up, times) in enumerate(rows, 1):
        cells = " ".join("lost" if t is None else f"{t:5.2f}" for t in times)
        print(f"{i:>3}  {how:<18} {up:>11.2f}s  {cells}")
    done = [t for _, _, times in rows for t in times if t is not None]
    total = len(rows) * CLIENTS
    print(f"reconnects: {len(done)} of {total}; median {statistics.median(done):.2f} s, "
          f"max {max(done):.2f} s" if done else f"reconnects: 0 of {total}")
    errors = collections.Counter()
    for w in workers:
        errors.update(w.errors)
    print("errors the clients met while the gateway was away:",
          json.dumps(dict(errors.most_common()), indent=1))
    lost = [f"client {n}: {w.lost}" for n, w in enumerate(workers) if w.lost]
    assert not lost, lost
    for gw, c in clusters:
        c.close()
        gw.stop_cluster(c.name)
