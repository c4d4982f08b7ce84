"""Kubernetes backend benchmark, driven by scripts/bench-kube (not a test: it prints numbers).

Against the control plane of tests/kube-env, with the gateway running under the least-privilege
ServiceAccount the Helm chart ships (manifests/dask-gateway-rs.yaml):

1. create -> scheduler reachable: `Gateway.new_cluster()` until a `distributed.Client`
   through the proxy has answered (median of several clusters), with the gateway's share.
2. 0 -> N worker pods created and Running after one `cluster.scale(N)`, with the controller's
   API writes for that scale-up (from /metrics). Worker pods run a no-op stand-in for
   `dask worker` (a PATH shim): this measures the gateway, controller, API server and kubelet,
   not Python imports of 100 Dask workers on 2 cores. Then a scale-up of real Dask workers
   until they have joined the scheduler.
3. create -> scheduler reachable from a warm pool: the same as 1 on a gateway with
   `warm_schedulers: 1`, each round once the pool has a ready scheduler again, split into
   `new_cluster()` (the claim) and `get_client()` + the first RPC.
4. Gateway RSS with M DaskCluster objects in its watch cache (a second gateway with the
   controller off, so the objects stay PENDING and no pods start), and list latency.
5. Burst (`--only burst`): U users each create a cluster at the same moment through the REST
   API, then scale it to W no-op workers as soon as it is RUNNING (field notes 7.9: a 30-user
   tutorial that could not reach the gateway; 100 concurrent clusters hitting timeouts). Every
   answer's status and latency, each cluster's time to RUNNING, the time until every worker pod
   is Running, the gateway's CPU and the controller's API writes.
6. Fairness (`--only fair`): F clusters scale up at the same moment and a newcomer creates a
   cluster right after; the newcomer's create -> scheduler Pod object and -> RUNNING, with the
   controller's write budget low enough that the scale-ups queue seconds of writes.
"""

import argparse
import base64
import collections
import concurrent.futures
import gc
import http.client
import json
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

import manifests
from bench_rest import basic_header, percentile, rest

REPO = Path(__file__).resolve().parents[1]
KUBE_ENV = REPO / "tests" / "kube-env"
BRIDGE_IP = os.environ.get("KUBE_ENV_BRIDGE_IP", "10.244.0.1")
# The Dask image in the test cluster (scripts/bench-kube builds and imports it).
DASK_IMAGE = os.environ["BENCH_DASK_IMAGE"]

# Worker pods whose container sleeps instead of running Dask (the gateway's arguments go to
# `sh -c` as positional parameters and are ignored): what is measured is the gateway,
# controller, API server and kubelet, not Python start-ups of Dask workers on 2 cores.
NO_OP_COMMAND = ["sh", "-c", "exec sleep infinity", "--"]
NO_OP_WORKER = {"extraContainerConfig": {"command": NO_OP_COMMAND, "readinessProbe": None}}


def sh(*args, input=None, check=True):
    r = subprocess.run(args, input=input, text=True, capture_output=True)
    if check and r.returncode:
        sys.exit(f"{' '.join(args)} failed: {r.stderr}")
    return r.stdout


class Kube:
    def __init__(self, kubeconfig, kubectl):
        self.kubeconfig, self.kubectl_bin = kubeconfig, kubectl

    def kubectl(self, *args, input=None, check=True):
        return sh(self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args, input=input, check=check)

    def namespace(self, name):
        ns = f"bench-{name}-{os.urandom(3).hex()}"
        self.kubectl("create", "namespace", ns)
        self.kubectl("apply", "-n", ns, "-f", "-",
                     input=yaml.safe_dump_all(manifests.gateway_rbac(ns)))
        kc = sh(str(KUBE_ENV / "sa-kubeconfig"), ns,
                manifests.SERVICE_ACCOUNT).strip().splitlines()[-1]
        return ns, kc

    def pods(self, ns, selector):
        return json.loads(self.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json"))["items"]


class PodWatch:
    """A watch of one namespace's pods (the API server's watch, read line by line), keeping
    when each pod was first seen and first seen Running, by this process's monotonic clock."""

    def __init__(self, kubeconfig, ns, workdir):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
        files = {}
        for key in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
            path = Path(workdir) / f"watch-{key}.pem"
            path.write_bytes(base64.b64decode(user.get(key) or cluster[key]))
            path.chmod(0o600)
            files[key] = str(path)
        ctx = ssl.create_default_context(cafile=files["certificate-authority-data"])
        ctx.load_cert_chain(files["client-certificate-data"], files["client-key-data"])
        url = urllib.parse.urlsplit(cluster["server"])
        self.connect = lambda: http.client.HTTPSConnection(url.hostname, url.port, context=ctx)
        self.path = f"/api/v1/namespaces/{ns}/pods?watch=1"
        self.conn = None
        self.cond = threading.Condition()
        self.pods = {}  # name -> {"component", "added", "running"}
        self.closed = False
        response = self._open(None)
        threading.Thread(target=self._read, args=(response,), daemon=True).start()

    def _open(self, resource_version):
        """(Re)opens the watch, from `resource_version` on if given."""
        self.conn = self.connect()
        path = self.path + (f"&resourceVersion={resource_version}" if resource_version else "")
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        if response.status != 200:
            sys.exit(f"watch {path}: HTTP {response.status}")
        return response

    def _read(self, response):
        # The API server may end a watch at any time (its timeout, a watcher it finds too slow
        # on a loaded machine): it is resumed from the last resourceVersion seen, so no event
        # is lost and none is seen twice.
        resource_version = None
        try:
            while True:
                for line in response:
                    now = time.perf_counter()
                    event = json.loads(line)
                    pod = event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"watch error: {pod.get('message')}")
                    resource_version = pod["metadata"]["resourceVersion"]
                    name = pod["metadata"]["name"]
                    component = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
                    with self.cond:
                        if event["type"] == "DELETED":
                            self.pods.pop(name, None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            seen = self.pods.setdefault(name, {"component": component, "added": now,
                                                               "running": None})
                            if pod.get("status", {}).get("phase") == "Running" and seen["running"] is None:
                                seen["running"] = now
                        self.cond.notify_all()
                if self.closed:
                    break
                self.conn.close()
                response = self._open(resource_version)
        except Exception as e:  # the watch failed: waits fail with the reason below
            if not self.closed:
                print(f"pod watch ended: {e!r}", file=sys.stderr)
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, predicate, timeout, what):
        """Waits until `predicate(pods)` returns a value other than None, and returns it."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                value = predicate(self.pods)
                if value is not None:
                    return value
                if self.closed:
                    sys.exit(f"the pod watch ended while waiting for {what}")
                left = deadline - time.perf_counter()
                if left <= 0:
                    seen = {}
                    for p in self.pods.values():
                        k = (p["component"] or "?") + (" Running" if p["running"] else "")
                        seen[k] = seen.get(k, 0) + 1
                    sys.exit(f"timed out after {timeout} s waiting for {what}; pods seen: {seen}")
                self.cond.wait(left)

    def close(self):
        # Shut the socket down rather than close it: a close while the reader thread is in
        # an SSL read can block; a shutdown ends that read at once.
        self.closed = True
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass


class Gateway:
    def __init__(self, binary, workdir, kubeconfig, namespace, port, extra=None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        cfg = {
            "address": f"0.0.0.0:{port}",
            "api_url": f"http://{BRIDGE_IP}:{port}/api",
            "backend": "kubernetes",
            "log_level": "warn",
            "kubernetes": {"namespace": namespace, "instance": "bench", "image": DASK_IMAGE},
            # Small requests, so that 100 workers fit the test node (2 CPU, 24 GiB).
            "cluster": {"heartbeat_period": 5, "scheduler_cores": 0.1, "scheduler_memory": "1G",
                        "worker_cores": 0.01, "worker_memory": "128M", "worker_threads": 1},
        }
        for k, v in (extra or {}).items():
            if isinstance(v, dict):
                cfg.setdefault(k, {}).update(v)
            else:
                cfg[k] = v
        path = Path(workdir) / f"gateway-{port}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, KUBECONFIG=kubeconfig)
        self.log = open(Path(workdir) / f"gateway-{port}.log", "w")
        self.proc = subprocess.Popen([binary, "--config", str(path)], env=env,
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(self.url + "/api/health", timeout=2).status == 200:
                    return
            except Exception:
                time.sleep(0.2)
        sys.exit(f"gateway on {port} did not become healthy")

    def metric(self, name, **labels):
        """The sum of the series of `name` whose labels include `labels` (0 if there is none)."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        total = 0.0
        for series, value in re.findall(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
            if all(re.search(rf'[{{,]{k}="{re.escape(v)}"[,}}]', series) for k, v in labels.items()):
                total += float(value)
        return total

    def rss_mib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def auth_headers(user):
    return {"Authorization": basic_header(user)}


def bench_create(gw, n):
    from dask_gateway import BasicAuth
    from dask_gateway import Gateway as StockGateway
    g = StockGateway(gw.url, auth=BasicAuth("bench-create", ""))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        c = g.new_cluster()
        with c.get_client(set_as_default=False) as client:
            client.scheduler_info()
        times.append(time.perf_counter() - t)
        c.shutdown()
        gc.collect()
    g.close()
    return times


def warm_pool_ready(gw):
    """Whether the gateway's warm pool has a running scheduler and none starting."""
    return (gw.metric("dask_gateway_warm_schedulers", state="running") >= 1
            and gw.metric("dask_gateway_warm_schedulers", state="pending") == 0)


def bench_warm(gw, n):
    """Create -> reachable from a warm pool of one, `n` times: each round waits until the pool
    has refilled and its scheduler has settled. Returns (total, new_cluster) seconds per round."""
    from dask_gateway import BasicAuth
    from dask_gateway import Gateway as StockGateway
    g = StockGateway(gw.url, auth=BasicAuth("bench-warm", ""))
    rows = []
    for _ in range(n):
        deadline = time.time() + 120
        while not warm_pool_ready(gw):
            if time.time() > deadline:
                sys.exit("the warm pool did not refill within 120 s")
            time.sleep(0.1)
        time.sleep(1.0)  # as a pool waits between users
        claims = gw.metric("dask_gateway_warm_scheduler_claims_total")
        t = time.perf_counter()
        c = g.new_cluster()
        t1 = time.perf_counter()
        with c.get_client(set_as_default=False) as client:
            client.scheduler_info()
        rows.append((time.perf_counter() - t, t1 - t))
        if gw.metric("dask_gateway_warm_scheduler_claims_total") != claims + 1:
            sys.exit("a create that should have claimed the warm scheduler started a cold one")
        c.shutdown()
        gc.collect()
    g.close()
    return rows


def bench_scale(kube, ns, gw, n, real_workers):
    from dask_gateway import BasicAuth
    from dask_gateway import Gateway as StockGateway
    g = StockGateway(gw.url, auth=BasicAuth("bench-scale", ""))
    c = g.new_cluster()
    oid = c.name.rsplit(".", 1)[-1]
    selector = f"dask-gateway-rs.io/cluster={oid},app.kubernetes.io/component=dask-worker"
    writes0 = gw.metric("dask_gateway_controller_api_writes_total")
    created0 = gw.metric("dask_gateway_controller_pods_created_total")
    t0 = time.perf_counter()
    c.scale(n)
    # All Pod objects exist once the API server has acknowledged the controller's n creates:
    # its counter, read over loopback every few milliseconds (a kubectl poll costs ~0.2 s).
    created = None
    while created is None and time.perf_counter() < t0 + 120:
        if gw.metric("dask_gateway_controller_pods_created_total") - created0 >= n:
            created = time.perf_counter() - t0
        else:
            time.sleep(0.005)
    running = joined = None
    client = c.get_client(set_as_default=False) if real_workers else None
    deadline = t0 + 900
    while time.perf_counter() < deadline:
        pods = kube.pods(ns, selector)
        now = time.perf_counter() - t0
        if created is None and len(pods) >= n:
            created = now
        if running is None and sum(p["status"].get("phase") == "Running" for p in pods) >= n:
            running = now
        if real_workers and joined is None and len(client.scheduler_info(n_workers=-1)["workers"]) >= n:
            joined = now
        if running is not None and (joined is not None or not real_workers):
            break
        time.sleep(0.1)
    time.sleep(2)  # let the status writes that follow settle
    writes = gw.metric("dask_gateway_controller_api_writes_total") - writes0
    if client:
        client.close()
    c.shutdown()
    g.close()
    return created, running, joined, writes


CREATORS = 16  # concurrent callers of the 1,000-cluster create run


def bench_memory(kube, binary, workdir, m):
    ns, kc = kube.namespace("memory")
    gw = Gateway(binary, workdir, kc, ns, 8191, {"kubernetes": {"controller": False}})
    idle = gw.rss_mib()
    statuses = {}
    lock = threading.Lock()

    def create(i):
        req = urllib.request.Request(gw.url + "/api/v1/clusters/", method="POST",
                                     data=b'{"cluster_options": {}}',
                                     headers={**auth_headers(f"user{i % 50}"),
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        with lock:
            statuses[code] = statuses.get(code, 0) + 1

    # Creators at once, so the rate is the gateway's and the API server's, not one client's.
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CREATORS) as pool:
        list(pool.map(create, range(m)))
    create_rate = m / (time.perf_counter() - t)
    print(f"  {m} creates from {CREATORS} concurrent callers: answers {statuses}")
    time.sleep(3)
    full = gw.rss_mib()
    lat = []
    for _ in range(20):
        t = time.perf_counter()
        urllib.request.urlopen(urllib.request.Request(
            gw.url + "/api/v1/clusters/", headers=auth_headers("user1")), timeout=30).read()
        lat.append(time.perf_counter() - t)
    gw.stop()
    kube.kubectl("delete", "namespace", ns, "--wait=false")
    return idle, full, create_rate, statistics.median(lat)


def cpu_seconds(pids):
    """User + system CPU seconds of processes `pids`, from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


# Pod sizes of the burst: real Dask schedulers with small requests, so that 50 clusters with a
# worker each fit the test node (2 CPU, 24 GiB, 110 pods); workers are no-op stand-ins.
BURST_SCHEDULER_CORES, BURST_SCHEDULER_MEMORY = 0.02, "400M"
BURST_WORKER_MEMORY = "32M"


def run_burst(url, users, per_user, worker_pods, pids):
    """`users` users create a cluster each at the same moment through the REST API at `url` (one
    call each, released by a barrier), wait until it is RUNNING as the stock client does, and
    scale it to `per_user` workers; then waits (at most 300 s) until `worker_pods()` (the
    worker pods, as the API server lists them) has that many Running. `pids`: the gateway's
    processes, whose CPU is counted. Returns what it measured; the clusters are left running
    (see `stop_burst`)."""
    t0 = []
    barrier = threading.Barrier(users, action=lambda: t0.append(time.perf_counter()))
    rows = [None] * users

    def user(i):
        name = f"burst{i}"
        barrier.wait()
        status, body, took = rest(url, "POST", "/api/v1/clusters/", name, {"cluster_options": {}})
        row = rows[i] = {"user": name, "create_status": status, "create_s": took, "error": None}
        if status != 201 or not isinstance(body, dict) or "name" not in body:
            row["error"] = f"create answered {status}: {str(body)[:200]}"
            return
        cluster = row["cluster"] = body["name"]
        # As the stock client waits: `?wait` (held until the cluster leaves PENDING, or the
        # server's timeout), again 0.5 s after each PENDING answer.
        deadline = time.perf_counter() + 600
        while time.perf_counter() < deadline:
            st, info, _ = rest(url, "GET", f"/api/v1/clusters/{cluster}?wait", name)
            if st != 200 or not isinstance(info, dict):
                row["error"] = f"get answered {st}: {str(info)[:200]}"
                return
            if info.get("status") != "PENDING":
                row["final"] = info.get("status")
                row["running_s"] = time.perf_counter() - t0[0]
                break
            time.sleep(0.5)
        if row.get("final") != "RUNNING":
            row["error"] = f"{cluster} ended {row.get('final', 'PENDING after 600 s')}"
            return
        st, body, _ = rest(url, "POST", f"/api/v1/clusters/{cluster}/scale", name,
                           {"count": per_user})
        if st != 200:
            row["error"] = f"scale answered {st}: {str(body)[:200]}"

    cpu0 = cpu_seconds(pids)
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = sum(per_user for r in rows if r and not r["error"])
    workers_running, pods = None, []
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        pods = worker_pods()
        if sum(p["status"].get("phase") == "Running" for p in pods) >= want:
            workers_running = time.perf_counter() - t0[0]
            break
        time.sleep(0.5)
    time.sleep(2)  # the status writes that follow the last workers
    phases = dict(collections.Counter(p["status"].get("phase") for p in pods))
    statuses = dict(collections.Counter(str(r["create_status"]) for r in rows))
    lat = [r["create_s"] for r in rows if r["create_status"] is not None]
    running = [r["running_s"] for r in rows if r.get("final") == "RUNNING"]
    rnd = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {
        "users": users, "workers_each": per_user, "statuses": statuses,
        "create_latency_s": {"p50": rnd(percentile(lat, 0.5)), "p99": rnd(percentile(lat, 0.99)),
                             "max": rnd(max(lat) if lat else None)},
        "running": len(running),
        "running_s": {"p50": rnd(percentile(running, 0.5)), "p99": rnd(percentile(running, 0.99)),
                      "last": rnd(max(running) if running else None)},
        "workers_running_s": rnd(workers_running),
        "worker_phases": phases,
        "pending_because": next((c.get("message") for p in pods
                                 for c in p["status"].get("conditions", [])
                                 if c.get("status") == "False" and c.get("message")), None),
        "cpu_s": round(cpu_seconds(pids) - cpu0, 2),
        "errors": [r["error"] for r in rows if r["error"]],
        "clusters": [(r["user"], r["cluster"]) for r in rows if r.get("cluster")],
    }


def stop_burst(url, result, pods, timeout=180):
    """Stops the burst's clusters and waits until `pods()` lists none."""
    for user, cluster in result["clusters"]:
        rest(url, "DELETE", f"/api/v1/clusters/{cluster}", user)
    deadline = time.time() + timeout
    while time.time() < deadline and pods():
        time.sleep(1)


def print_burst(label, r):
    fmt = lambda v: "--" if v is None else f"{v:.2f} s"  # noqa: E731
    lat, run = r["create_latency_s"], r["running_s"]
    print(f"{label}burst: {r['users']} users create a cluster at the same moment, each then "
          f"scales to {r['workers_each']} no-op worker(s)")
    print(f"  create answers {r['statuses']}; latency p50 {fmt(lat['p50'])}, p99 "
          f"{fmt(lat['p99'])}, max {fmt(lat['max'])}")
    print(f"  RUNNING: {r['running']} of {r['users']}; after p50 {fmt(run['p50'])}, p99 "
          f"{fmt(run['p99'])}, last {fmt(run['last'])}")
    print(f"  all worker pods Running after {fmt(r['workers_running_s'])}"
          + ("" if r["workers_running_s"] is not None else
             f" (after 300 s: {r['worker_phases']}; {r['pending_because'] or ''})")
          + f"; gateway CPU {r['cpu_s']:.2f} s"
          + (f", API writes {r['api_writes']}" if "api_writes" in r else ""))
    print(f"  errors: {len(r['errors'])}")
    for e in r["errors"][:10]:
        print(f"    {e}")


def bench_burst(kube, args, workdir):
    """The burst (`run_burst`) against our gateway, with the controller's API writes."""
    ns, kc = kube.namespace("burst")
    gw = Gateway(args.gateway, workdir, kc, ns, 8195, {
        "cluster": {"scheduler_cores": BURST_SCHEDULER_CORES,
                    "scheduler_memory": BURST_SCHEDULER_MEMORY,
                    "worker_memory": BURST_WORKER_MEMORY, "start_timeout": 600},
        "kubernetes": {"termination_grace_period_seconds": 1, "worker": NO_OP_WORKER},
    })
    try:
        writes0 = gw.metric("dask_gateway_controller_api_writes_total")
        result = run_burst(gw.url, args.burst, args.burst_workers,
                           lambda: kube.pods(ns, "app.kubernetes.io/component=dask-worker"),
                           [gw.proc.pid])
        result["api_writes"] = int(gw.metric("dask_gateway_controller_api_writes_total") - writes0)
        print_burst("", result)
        stop_burst(gw.url, result, lambda: kube.pods(ns, "app.kubernetes.io/component"))
    finally:
        gw.stop()
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def wait_running(url, user, cluster, timeout=300):
    """Waits as the stock client does (`GET ?wait`, again 0.5 s after a PENDING answer) until
    `cluster` leaves PENDING; exits unless it is then RUNNING."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        st, info, _ = rest(url, "GET", f"/api/v1/clusters/{cluster}?wait", user)
        if st != 200 or not isinstance(info, dict):
            sys.exit(f"GET {cluster} answered {st}: {str(info)[:200]}")
        if info.get("status") == "RUNNING":
            return
        if info.get("status") != "PENDING":
            sys.exit(f"{cluster} ended {info.get('status')}")
        time.sleep(0.5)
    sys.exit(f"{cluster} was not RUNNING after {timeout} s")


def bench_fair(kube, args, workdir):
    """A cluster starting while others scale up (`--only fair`). `--fair-clusters` users' clusters
    scale to `--fair-workers` no-op workers each at the same moment, and right after that a
    newcomer creates a cluster. The controller's write budget is `--fair-qps` per second (burst
    the same), low enough that the scale-ups queue seconds of writes on this small node, as 30
    users scaling to 20 workers each queue 12 s of them at the default 50 per second. Measured:
    the newcomer's create -> its scheduler Pod object and -> RUNNING, and the time until the
    scale-ups' worker Pod objects all exist (events of a pod watch)."""
    clusters, workers = args.fair_clusters, args.fair_workers
    ns, kc = kube.namespace("fair")
    qps = args.fair_qps
    gw = Gateway(args.gateway, workdir, kc, ns, 8196, {"kubernetes": {
        "api_qps": qps, "api_burst": max(1, int(qps)), "termination_grace_period_seconds": 1,
        "worker": NO_OP_WORKER}})
    watch, made = None, []
    try:
        watch = PodWatch(args.kubeconfig, ns, workdir)
        for i in range(clusters):
            user = f"busy{i}"
            st, body, _ = rest(gw.url, "POST", "/api/v1/clusters/", user, {"cluster_options": {}})
            if st != 201:
                sys.exit(f"create answered {st}: {str(body)[:200]}")
            made.append((user, body["name"]))
        for user, name in made:
            wait_running(gw.url, user, name)
        time.sleep(2)  # the starts' last status writes and events
        barrier = threading.Barrier(clusters + 1)

        def scale(user, name):
            barrier.wait()
            st, body, _ = rest(gw.url, "POST", f"/api/v1/clusters/{name}/scale", user,
                               {"count": workers})
            if st != 200:
                print(f"scale answered {st}: {str(body)[:200]}", file=sys.stderr)

        threads = [threading.Thread(target=scale, args=m) for m in made]
        for th in threads:
            th.start()
        barrier.wait()
        t_scale = time.perf_counter()
        for th in threads:
            th.join()
        st, body, _ = rest(gw.url, "POST", "/api/v1/clusters/", "newcomer", {"cluster_options": {}})
        t_create = time.perf_counter()
        if st != 201:
            sys.exit(f"the newcomer's create answered {st}: {str(body)[:200]}")
        name = body["name"]
        made.append(("newcomer", name))
        scheduler = f"dask-scheduler-{name.rsplit('.', 1)[-1]}"  # the name is <namespace>.<id>
        pod_at = watch.wait(lambda pods: pods[scheduler]["added"] if scheduler in pods else None,
                            300, "the newcomer's scheduler pod")
        wait_running(gw.url, "newcomer", name)
        running_at = time.perf_counter()

        def all_workers(pods):
            added = [p["added"] for p in pods.values() if p["component"] == "dask-worker"]
            return max(added) if len(added) >= clusters * workers else None

        workers_at = watch.wait(all_workers, 300, f"{clusters * workers} worker pods")
        print(f"fairness: {clusters} clusters scale 0 -> {workers} no-op workers at the same "
              f"moment, then a newcomer creates a cluster (API writes {qps:g}/s, burst "
              f"{max(1, int(qps))})")
        print(f"  newcomer: create -> scheduler Pod object {pod_at - t_create:.2f} s, "
              f"-> RUNNING {running_at - t_create:.2f} s")
        print(f"  the scale-ups' {clusters * workers} worker Pod objects all exist after "
              f"{workers_at - t_scale:.2f} s")
    finally:
        if watch:
            watch.close()
        for user, name in made:
            rest(gw.url, "DELETE", f"/api/v1/clusters/{name}", user)
        deadline = time.time() + 180
        while time.time() < deadline and kube.pods(ns, "app.kubernetes.io/component"):
            time.sleep(1)
        gw.stop()
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def bench_churn(kube, binary, workdir, lifecycles, users):
    """Cluster lifecycles through the REST API (create, then stop once the controller has made
    its scheduler pod), `users` at a time, with the gateway's RSS sampled as finished clusters
    pile up in the caches (they are kept for the retention, 24 h by default)."""
    ns, kc = kube.namespace("churn")
    gw = Gateway(binary, workdir, kc, ns, 8193, {"kubernetes": {"termination_grace_period_seconds": 1}})
    samples = [(0, gw.rss_mib())]
    done = [0]
    errors = []
    lock = threading.Lock()

    def call(method, path, user, body=None):
        headers = auth_headers(user)
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(gw.url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        return json.loads(urllib.request.urlopen(req, timeout=60).read() or b"null")

    def user_loop(u):
        user = f"churn{u}"
        while True:
            with lock:
                if done[0] >= lifecycles:
                    return
                done[0] += 1
            try:
                name = call("POST", "/api/v1/clusters/", user, {"cluster_options": {}})["name"]
                oid = name.rsplit(".", 1)[-1]
                deadline = time.time() + 60
                while time.time() < deadline and not kube.pods(
                        ns, f"dask-gateway-rs.io/cluster={oid},app.kubernetes.io/component=dask-scheduler"):
                    time.sleep(0.2)
                call("DELETE", f"/api/v1/clusters/{name}", user)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    every = max(lifecycles // 10, 1)
    threads = [threading.Thread(target=user_loop, args=(u,)) for u in range(users)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    last = 0
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        if done[0] - last >= every:
            last = done[0]
            samples.append((last, gw.rss_mib()))
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    time.sleep(10)  # teardowns finish; the finished clusters stay cached
    samples.append((lifecycles, gw.rss_mib()))
    finished = len(json.loads(kube.kubectl("get", "daskclusters", "-n", ns, "-o", "json"))["items"])
    gw.stop()
    kube.kubectl("delete", "namespace", ns, "--wait=false")
    return samples, elapsed, errors, finished


def main():
    # The stock client's finalizers take distributed's LoopRunner lock; a GC pass running them
    # while the main thread starts a client deadlocks. Collect only between measurements.
    gc.disable()
    # ... and their `__del__` complains about a stopped loop on every closed cluster: not ours.
    sys.unraisablehook = lambda _: None
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--real-workers", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--creates", type=int, default=5)
    ap.add_argument("--churn", type=int, default=0,
                    help="cluster lifecycles of the churn measurement (0: skip)")
    ap.add_argument("--churn-users", type=int, default=3)
    ap.add_argument("--burst", type=int, default=50,
                    help="users creating a cluster at the same moment (burst part)")
    ap.add_argument("--burst-workers", type=int, default=1,
                    help="no-op workers each burst cluster scales to")
    ap.add_argument("--fair-clusters", type=int, default=4,
                    help="clusters scaling up at once in the fairness part")
    ap.add_argument("--fair-workers", type=int, default=20,
                    help="no-op workers each of them scales to")
    ap.add_argument("--fair-qps", type=float, default=10,
                    help="the controller's API writes per second (and burst) in that part")
    ap.add_argument("--only", default="pods,warm,memory,churn",
                    help="comma-separated parts: pods (create, 0 -> N pods, real workers), "
                         "warm (create from a warm pool), "
                         "memory (1,000 clusters), churn (with --churn > 0), "
                         "burst (U users at once), fair (a start while others scale up); "
                         "the last two are not in the default set")
    args = ap.parse_args()
    kube = Kube(args.kubeconfig, args.kubectl)
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                 input=yaml.safe_dump(manifests.crd()))
    with tempfile.TemporaryDirectory(prefix="dgrs-bench-kube-") as workdir:
        parts = set(args.only.split(","))
        if args.churn and "churn" in parts:
            samples, elapsed, errors, finished = bench_churn(kube, args.gateway, workdir,
                                                             args.churn, args.churn_users)
            print(f"churn: {args.churn} cluster lifecycles ({args.churn_users} users) in "
                  f"{elapsed:.0f} s, {len(errors)} errors, {finished} finished DaskClusters "
                  f"kept; gateway RSS (MiB) after n lifecycles: "
                  + ", ".join(f"{n}: {r:.1f}" for n, r in samples))
            for e in errors[:5]:
                print(f"  error: {e}")
        if "pods" in parts:
            bench_pods(kube, args, workdir)
        if "warm" in parts:
            bench_pool(kube, args, workdir)
        if "burst" in parts:
            bench_burst(kube, args, workdir)
        if "fair" in parts:
            bench_fair(kube, args, workdir)
        if "memory" in parts:
            idle, full, rate, lat = bench_memory(kube, args.gateway, workdir, args.clusters)
            print(f"gateway RSS: {idle:.1f} MiB with no clusters, {full:.1f} MiB with "
                  f"{args.clusters} DaskCluster objects cached; creates through the API "
                  f"{rate:.0f}/s ({CREATORS} callers); list of one user's clusters median "
                  f"{lat * 1000:.1f} ms")


def bench_pool(kube, args, workdir):
    """Create -> reachable from a warm pool of one scheduler."""
    ns, kc = kube.namespace("warm")
    gw = Gateway(args.gateway, workdir, kc, ns, 8194,
                 {"cluster": {"warm_schedulers": 1},
                  "kubernetes": {"termination_grace_period_seconds": 1}})
    try:
        rows = bench_warm(gw, args.creates)
    finally:  # the gateway stops its pool as it shuts down, also when a round failed
        gw.stop()
        kube.kubectl("delete", "namespace", ns, "--wait=false")
    totals = [r[0] for r in rows]
    print(f"create -> scheduler reachable from a warm pool (warm_schedulers: 1), {len(rows)} "
          f"clusters: median {statistics.median(totals):.3f} s, min {min(totals):.3f} s, "
          f"max {max(totals):.3f} s; of which new_cluster (the claim) median "
          f"{statistics.median(r[1] for r in rows):.3f} s")


def bench_pods(kube, args, workdir):
    """Create -> reachable, 0 -> N no-op worker pods, 0 -> M real Dask workers."""
    ns, kc = kube.namespace("main")
    kube_settings = {"worker": NO_OP_WORKER, "termination_grace_period_seconds": 1}
    if os.environ.get("BENCH_WORKER_BATCH"):
        kube_settings["worker_batch"] = int(os.environ["BENCH_WORKER_BATCH"])
    # Each gateway is stopped, and the namespace deleted, however the part ends.
    gateways = []
    try:
        no_op = Gateway(args.gateway, workdir, kc, ns, 8190, {"kubernetes": kube_settings})
        gateways.append(no_op)
        print(f"Kubernetes backend benchmark ({os.cpu_count()} cores; tests/kube-env, "
              f"real containers from {DASK_IMAGE})")
        times = bench_create(no_op, args.creates)
        print(f"create -> scheduler reachable (new_cluster + first RPC through the proxy), "
              f"{len(times)} clusters: median {statistics.median(times):.2f} s, "
              f"min {min(times):.2f} s, max {max(times):.2f} s")
        created, running, _, writes = bench_scale(kube, ns, no_op, args.workers, False)
        print(f"scale 0 -> {args.workers} worker pods (no-op worker command): all created "
              f"{created:.2f} s, all Running {running:.2f} s; controller API writes "
              f"{writes:.0f} ({writes / args.workers:.2f} per worker)")
        no_op.stop()
        gateways.remove(no_op)
        real = Gateway(args.gateway, workdir, kc, ns, 8192,
                       {"kubernetes": {"termination_grace_period_seconds": 1}})
        gateways.append(real)
        created, running, joined, writes = bench_scale(kube, ns, real, args.real_workers, True)
        print(f"scale 0 -> {args.real_workers} real Dask workers: pods created {created:.2f} s, "
              f"Running {running:.2f} s, joined the scheduler {joined:.2f} s; "
              f"API writes {writes:.0f}")
    finally:
        for gw in gateways:
            gw.stop()
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


if __name__ == "__main__":
    main()
