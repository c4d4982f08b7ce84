"""Side by side on Kubernetes, driven by `scripts/bench-compare --kube` (a benchmark that prints
numbers, not a test): OUR gateway and the REFERENCE dask-gateway-server from PyPI, on the same
tests/kube-env, with the same API write limits (50/s, burst 100), image, pod requests and no-op
workers, measured in alternating rounds of one run.

How each side runs (on this machine, as it would in a cluster):
- ours: gateway-server with the Kubernetes backend and its controller in one process, under the
  chart's namespaced ServiceAccount (as scripts/bench-kube runs it);
- the reference: `dask-gateway-server` (its API server with KubeBackend) and `dask-gateway-server
  kube-controller`, under a ServiceAccount of their own bound to cluster-admin (its controller
  watches pods in every namespace). Its API server forwards a scale request to the scheduler's
  Service DNS name, which only cluster DNS resolves, so it runs in a private mount namespace
  whose /etc/resolv.conf names CoreDNS, as a pod's does. Its controller writes Traefik routes, so
  Traefik's two route CRDs are installed (minimal schemas); no Traefik runs: nothing measured here
  goes through a proxy.

Measured per round, on each side, through each side's own REST API and real code path:
1. create -> scheduler Pod object: from POST /api/v1/clusters to the scheduler pod's ADDED event
   on a watch of the side's namespace;
2. create -> RUNNING in the API: GET /api/v1/clusters/{name}, polled every 20 ms;
3. scale 0 -> N (POST .../scale): all N worker Pod objects exist, and all N Running (events of the
   same watch);
4. the side's API writes for that scale-up (until 5 s after the last pod ran), counted by user
   from the API server's audit log (tests/kube-env keeps one);
5. the side's CPU time for that scale-up: every process of the side (ours: one; the reference:
   its API server and its controller), from /proc.
"""

import argparse
import base64
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

import manifests
from kube_bench import (BRIDGE_IP, BURST_SCHEDULER_CORES, BURST_SCHEDULER_MEMORY,
                        BURST_WORKER_MEMORY, DASK_IMAGE, KUBE_ENV, NO_OP_COMMAND, NO_OP_WORKER,
                        Gateway, Kube, PodWatch, cpu_seconds, print_burst, run_burst, sh,
                        stop_burst)

AUDIT_LOG = Path(os.environ.get("KUBE_ENV_DIR", "/tmp/dgrs-kube-env")) / "audit.log"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
USER = "bench"
IDLE_WINDOW = 20  # seconds of each side's idle CPU, measured once
# Pod sizes small enough for 100 workers on the test node (2 CPU), the same on both sides.
SCHEDULER_CORES, SCHEDULER_MEMORY = 0.1, "1G"
WORKER_CORES, WORKER_MEMORY = 0.01, "128M"
ROUND_SIZES = {"scheduler_cores": SCHEDULER_CORES, "scheduler_memory": SCHEDULER_MEMORY,
               "worker_cores": WORKER_CORES, "worker_memory": WORKER_MEMORY}
# The burst's: 50 real schedulers with a worker each on the same node, on both sides.
BURST_SIZES = {"scheduler_cores": BURST_SCHEDULER_CORES, "scheduler_memory": BURST_SCHEDULER_MEMORY,
               "worker_cores": WORKER_CORES, "worker_memory": BURST_WORKER_MEMORY}


def say(msg):
    print(msg, flush=True)


def api(side, method, path, body=None, timeout=60):
    headers = {"Authorization": "Basic " + base64.b64encode(f"{USER}:".encode()).decode()}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(side.url + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def cluster_status(side, name):
    """Cluster `name`'s status in `side`'s API, None once the API no longer knows it."""
    try:
        return api(side, "GET", f"/api/v1/clusters/{name}")["status"]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def audit_offset():
    return AUDIT_LOG.stat().st_size


def audit_writes(offset, user, cluster=None):
    """The writes `user` made since `offset` of the audit log, by resource[/subresource]. With
    `cluster`, writes to any other DaskCluster are left out: an earlier round's cluster, stopped
    before this round, is still labelled finished 30 s after it ended (ours), which is that
    cluster's stop, not this round's scale-up."""
    out = {}
    with open(AUDIT_LOG, "rb") as f:
        f.seek(offset)
        for line in f:
            e = json.loads(line)
            if e.get("user", {}).get("username") != user or e.get("verb") not in WRITE_VERBS:
                continue
            ref = e.get("objectRef", {})
            # The reference names a cluster `<namespace>.<object name>`; ours by its object name.
            if cluster and ref.get("resource") == "daskclusters" \
                    and ref.get("name", "") not in cluster:
                continue
            key = ref.get("resource", "?") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            out[key] = out.get(key, 0) + 1
    return out


def audit_pod_creates(offset, user, since):
    """When the API server received the last pod creation `user` sent since `offset` of the
    audit log, and when it answered the last one, in seconds after the wall-clock time `since`:
    how long the side took to send its pods, and how long the API server took to store them."""
    received, answered = [], []
    with open(AUDIT_LOG, "rb") as f:
        f.seek(offset)
        for line in f:
            e = json.loads(line)
            ref = e.get("objectRef", {})
            if (e.get("user", {}).get("username") != user or e.get("verb") != "create"
                    or ref.get("resource") != "pods" or ref.get("subresource")):
                continue
            received.append(audit_time(e["requestReceivedTimestamp"]))
            answered.append(audit_time(e["stageTimestamp"]))
    if not received:
        return None, None
    return max(received) - since, max(answered) - since


def audit_time(stamp):
    """An audit log timestamp (RFC 3339, microseconds, UTC) as seconds since the epoch."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class Ours:
    label = "ours"

    def __init__(self, kube, binary, workdir, sizes=ROUND_SIZES):
        self.ns, kc = kube.namespace("ours")
        self.user = f"system:serviceaccount:{self.ns}:{manifests.SERVICE_ACCOUNT}"
        settings = {"worker": NO_OP_WORKER, "termination_grace_period_seconds": 1}
        # No start timeout in the way of a burst's schedulers (the reference has none).
        cluster = dict(sizes, start_timeout=600)
        self.gateway = Gateway(binary, workdir, kc, self.ns, 8193,
                               {"kubernetes": settings, "cluster": cluster})
        self.url = self.gateway.url

    def pids(self):
        return [self.gateway.proc.pid]

    def stop(self):
        self.gateway.stop()


class Reference:
    label = "reference"

    def __init__(self, kube, venv, workdir, sizes=ROUND_SIZES):
        self.ns = f"bench-reference-{os.urandom(3).hex()}"
        kube.kubectl("create", "namespace", self.ns)
        sa = "reference-gateway"
        kube.kubectl("create", "serviceaccount", "-n", self.ns, sa)
        kube.kubectl("create", "clusterrolebinding", f"{self.ns}-{sa}", "--clusterrole",
                     "cluster-admin", f"--serviceaccount={self.ns}:{sa}")
        kc = sh(str(KUBE_ENV / "sa-kubeconfig"), self.ns, sa).strip().splitlines()[-1]
        self.user = f"system:serviceaccount:{self.ns}:{sa}"
        port = 8194
        self.url = f"http://127.0.0.1:{port}"
        work = Path(workdir)
        config = work / "reference_config.py"
        config.write_text(REFERENCE_CONFIG.format(
            port=port, controller_port=port + 1, api_url=f"http://{BRIDGE_IP}:{port}/api", ns=self.ns, image=DASK_IMAGE,
            **sizes, cpu_limit=os.cpu_count(), no_op=json.dumps(NO_OP_COMMAND)))
        resolv = work / "resolv.conf"
        resolv.write_text(f"nameserver {BRIDGE_IP}\nsearch svc.cluster.local cluster.local\n"
                          "options ndots:5\n")
        env = dict(os.environ, KUBECONFIG=kc)
        server = str(Path(venv) / "bin" / "dask-gateway-server")
        self.logs = [open(work / "reference-api.log", "w"), open(work / "reference-controller.log", "w")]
        # The API server in a private mount namespace whose resolv.conf is the cluster's.
        self.api = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv),
             server, "-f", str(config)],
            env=env, stdout=self.logs[0], stderr=self.logs[0], cwd=workdir)
        self.controller = subprocess.Popen(
            [server, "kube-controller", "-f", str(config)],
            env=env, stdout=self.logs[1], stderr=self.logs[1], cwd=workdir)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/api/health", timeout=2).read()
                break
            except Exception:
                if time.time() > deadline or self.api.poll() is not None:
                    sys.exit(f"the reference gateway did not start; see {work}/reference-api.log")
                time.sleep(0.2)

    def pids(self):
        return [self.api.pid, self.controller.pid]

    def stop(self):
        for p in (self.api, self.controller):
            p.terminate()
        for p in (self.api, self.controller):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


REFERENCE_CONFIG = """\
# The reference's configuration for scripts/kube_compare.py (equivalent to ours there). Its
# CPU limits default to the requests (0.1 core for the scheduler, which throttles Python's
# start-up to over 15 s); ours sets none by default, so the reference's are the node's cores.
c.DaskGateway.address = "0.0.0.0:{port}"
c.DaskGateway.backend_class = "dask_gateway_server.backends.kubernetes.KubeBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.KubeBackend.gateway_instance = "bench-reference"
c.KubeController.gateway_instance = "bench-reference"
c.KubeController.address = "127.0.0.1:{controller_port}"
c.KubeController.api_url = "{api_url}"
c.KubeController.k8s_api_rate_limit = 50
c.KubeController.k8s_api_rate_limit_burst = 100
c.KubeClusterConfig.namespace = "{ns}"
c.KubeClusterConfig.image = "{image}"
c.KubeClusterConfig.image_pull_policy = "IfNotPresent"
c.KubeClusterConfig.scheduler_cmd = ["dask", "scheduler"]
c.KubeClusterConfig.worker_cmd = ["dask", "worker"]
c.KubeClusterConfig.scheduler_cores = {scheduler_cores}
c.KubeClusterConfig.scheduler_cores_limit = {cpu_limit}
c.KubeClusterConfig.scheduler_memory = "{scheduler_memory}"
c.KubeClusterConfig.scheduler_memory_limit = "{scheduler_memory}"
c.KubeClusterConfig.worker_cores = {worker_cores}
c.KubeClusterConfig.worker_cores_limit = {cpu_limit}
c.KubeClusterConfig.worker_memory = "{worker_memory}"
c.KubeClusterConfig.worker_memory_limit = "{worker_memory}"
c.KubeClusterConfig.worker_threads = 1
c.KubeClusterConfig.worker_extra_container_config = {{"command": {no_op}}}
c.KubeClusterConfig.worker_extra_pod_config = {{"terminationGracePeriodSeconds": 1}}
c.KubeClusterConfig.scheduler_extra_pod_config = {{"terminationGracePeriodSeconds": 1}}
"""


def crd(group, kind, plural, status):
    version = {"name": "v1alpha1", "served": True, "storage": True,
               "schema": {"openAPIV3Schema": {"type": "object",
                                              "x-kubernetes-preserve-unknown-fields": True}}}
    if status:
        version["subresources"] = {"status": {}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced", "versions": [version],
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                               "listKind": kind + "List"}}}


def reference_crds():
    """The reference's DaskCluster CRD and Traefik's two route CRDs (schemas left open: nothing
    here validates them, and the objects are only written and watched)."""
    return [crd("gateway.dask.org", "DaskCluster", "daskclusters", True),
            crd("traefik.io", "IngressRoute", "ingressroutes", False),
            crd("traefik.io", "IngressRouteTCP", "ingressroutetcps", False)]


def one_round(side, watch, workers):
    """One cluster's life on one side; returns its measurements."""
    r = {}
    create_offset = audit_offset()
    t0 = time.perf_counter()
    name = api(side, "POST", "/api/v1/clusters/", {"cluster_options": {}})["name"]
    r["create_answered_s"] = time.perf_counter() - t0
    while True:
        status = api(side, "GET", f"/api/v1/clusters/{name}")["status"]
        if status == "RUNNING":
            r["create_to_running_s"] = time.perf_counter() - t0
            break
        if status in ("FAILED", "STOPPED"):
            sys.exit(f"{side.label}: cluster {name} ended {status} before RUNNING")
        if time.perf_counter() - t0 > 180:
            sys.exit(f"{side.label}: cluster {name} not RUNNING after 180 s")
        time.sleep(0.02)
    r["create_to_scheduler_pod_s"] = watch.wait(
        lambda pods: next((p["added"] - t0 for p in pods.values()
                           if p["component"] == "dask-scheduler"), None), 5,
        "the scheduler pod")
    time.sleep(2)  # let the writes that follow RUNNING settle before the scale-up's window
    # The start's writes (the DaskCluster, its children, its status), without lease renewals.
    writes = audit_writes(create_offset, side.user)
    writes.pop("leases", None)
    r["create_api_writes"] = sum(writes.values())
    r["create_api_writes_by_resource"] = writes

    offset, cpu0 = audit_offset(), cpu_seconds(side.pids())
    t1, t1_wall = time.perf_counter(), time.time()
    api(side, "POST", f"/api/v1/clusters/{name}/scale", {"count": workers})

    def workers_where(key):
        def done(pods):
            times = [p[key] for p in pods.values()
                     if p["component"] == "dask-worker" and p[key] is not None]
            return max(times) - t1 if len(times) >= workers else None
        return done
    r["scale_pods_created_s"] = watch.wait(workers_where("added"), 120, f"{workers} worker pods")
    r["scale_pods_running_s"] = watch.wait(workers_where("running"), 600,
                                           f"{workers} Running worker pods")
    # The pod objects' time from the audit log, in two parts: the side's (sending the
    # creations) and the API server's (storing them), which the watch's time adds up with the
    # watch's delivery. Read once the pods run, when the log has every creation's answer.
    r["scale_pods_sent_s"], r["scale_pods_stored_s"] = audit_pod_creates(offset, side.user, t1_wall)
    time.sleep(5)  # the status writes that follow the last pod's start
    r["scale_cpu_s"] = cpu_seconds(side.pids()) - cpu0
    r["scale_window_s"] = time.perf_counter() - t1
    writes = audit_writes(offset, side.user, cluster=name)
    r["scale_api_writes"] = sum(writes.values())
    r["scale_api_writes_by_resource"] = writes
    # Leader election renews its Lease every few seconds whatever the controller does (ours
    # elects a leader; the reference's controller does not), so the scale-up's own writes are
    # also counted without those.
    r["scale_api_writes_no_leases"] = sum(n for res, n in writes.items() if res != "leases")

    api(side, "DELETE", f"/api/v1/clusters/{name}")
    watch.wait(lambda pods: True if not pods else None, 180, f"{side.label}'s pods to go")
    # The cluster's last status write comes after its pods are gone: wait for it, so that it
    # is not counted in the next round's writes.
    deadline = time.perf_counter() + 60
    while cluster_status(side, name) not in ("STOPPED", "FAILED", None):
        if time.perf_counter() > deadline:
            sys.exit(f"{side.label}: cluster {name} not STOPPED 60 s after its pods went")
        time.sleep(0.1)
    time.sleep(1)  # and for the Event that records it
    return r


def run_bursts(kube, args, workdir):
    """The burst (`kube_bench.run_burst`) on each side in turn, alone on the node: each side
    starts, idles 5 s, takes the burst, stops its clusters and goes. Returns side -> result,
    with the side's API writes from the audit log (without lease renewals)."""
    results = {}
    makers = {"ours": lambda: Ours(kube, args.gateway, workdir, BURST_SIZES),
              "reference": lambda: Reference(kube, args.ref_venv, workdir, BURST_SIZES)}
    for label in args.sides:
        side = makers[label]()
        try:
            time.sleep(5)
            offset = audit_offset()
            workers = lambda: kube.pods(side.ns, "app.kubernetes.io/component=dask-worker")  # noqa: E731
            r = run_burst(side.url, args.burst, args.burst_workers, workers, side.pids())
            writes = audit_writes(offset, side.user)
            writes.pop("leases", None)
            r["api_writes"] = sum(writes.values())
            r["api_writes_by_resource"] = writes
            results[label] = r
            print_burst(f"{label}: ", r)
            sys.stdout.flush()
            stop_burst(side.url, r, lambda: kube.pods(side.ns, "app.kubernetes.io/component"))
        finally:
            side.stop()
            remove_side(kube, side)
    return results


def seconds(value):
    """`value` (seconds, or none) for a round's line."""
    return "-" if value is None else f"{value:.2f} s"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_rounds(kube, args, workdir):
    """Starts both sides and runs the rounds, alternating which side goes first."""
    results = {"ours": [], "reference": []}
    sides = []
    try:
        if "ours" in args.sides:
            sides.append(Ours(kube, args.gateway, workdir))
        if "reference" in args.sides:
            sides.append(Reference(kube, args.ref_venv, workdir))
        watches = {s.label: PodWatch(args.kubeconfig, s.ns, workdir) for s in sides}
        # What each side spends with no cluster at all (timers, lease renewals, watches), so
        # that the scale-up's CPU can also be read net of it.
        time.sleep(5)
        before = {s.label: cpu_seconds(s.pids()) for s in sides}
        time.sleep(IDLE_WINDOW)
        for s in sides:
            results[s.label + "_idle_cpu_per_s"] = (cpu_seconds(s.pids()) - before[s.label]) / IDLE_WINDOW
        say("  idle CPU: " + ", ".join(f"{s.label} {results[s.label + '_idle_cpu_per_s'] * 1000:.1f} ms/s"
                                       for s in sides))
        for i in range(args.rounds):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                r = one_round(side, watches[side.label], args.workers)
                results[side.label].append(r)
                say(f"  round {i + 1} {side.label:9}: scheduler pod "
                    f"{r['create_to_scheduler_pod_s']:.3f} s, RUNNING "
                    f"{r['create_to_running_s']:.2f} s, {r['create_api_writes']} writes "
                    f"{r['create_api_writes_by_resource']}; scale 0 -> {args.workers}: created "
                    f"{r['scale_pods_created_s']:.2f} s (sent {seconds(r['scale_pods_sent_s'])}, "
                    f"stored {seconds(r['scale_pods_stored_s'])}), Running "
                    f"{r['scale_pods_running_s']:.2f} s, {r['scale_api_writes']} writes "
                    f"{r['scale_api_writes_by_resource']}, CPU {r['scale_cpu_s']:.2f} s")
        for w in watches.values():
            w.close()
    finally:
        for s in sides:
            s.stop()
        for s in sides:
            remove_side(kube, s)
    return results


def remove_side(kube, side):
    """Deletes what a stopped side leaves in the cluster: its namespace (waiting until it is
    gone, so that the node has room for what comes next) and the reference's role binding."""
    kube.kubectl("delete", "namespace", side.ns, "--wait=true", "--timeout=300s", check=False)
    if isinstance(side, Reference):
        kube.kubectl("delete", "clusterrolebinding", f"{side.ns}-reference-gateway", check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--ref-venv", required=True)
    ap.add_argument("--ref-version", required=True)
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ours-build", default="host's glibc build",
                    help="which build of gateway-server --gateway is, for the heading and JSON")
    ap.add_argument("--burst", type=int, default=0,
                    help="also a burst: this many users create a cluster at the same moment "
                         "(0: none); --rounds 0 runs the burst alone")
    ap.add_argument("--burst-workers", type=int, default=1,
                    help="no-op workers each burst cluster scales to once RUNNING")
    ap.add_argument("--sides", default="ours,reference",
                    help="which sides to run (comma-separated): measuring one side while "
                         "working on it is quicker; the ratios need both")
    args = ap.parse_args()
    args.sides = args.sides.split(",")
    # A TERM (bench-compare's Ctrl-C, a timeout) unwinds like an error: both sides are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not AUDIT_LOG.exists():
        sys.exit(f"{AUDIT_LOG} is missing: this tests/kube-env runs without its audit log "
                 "(started by an older version); restart it with tests/kube-env/down")
    kube = Kube(args.kubeconfig, args.kubectl)
    # The node holds at most 110 pods: start only once earlier runs' pods are gone.
    deadline = time.time() + 300
    while True:
        left = [line for line in kube.kubectl("get", "pods", "-A", "--no-headers").splitlines()
                if not line.startswith("kube-system ")]
        if not left:
            break
        if time.time() > deadline:
            sys.exit(f"{len(left)} pods of earlier runs are still on the node; delete them first")
        time.sleep(2)
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                 input=yaml.safe_dump_all([manifests.crd(), *reference_crds()]))
    for c in ["daskclusters.gateway.dask.org", manifests.crd()["metadata"]["name"]]:
        kube.kubectl("wait", "--for=condition=Established", f"crd/{c}", "--timeout=60s")
    cores = os.cpu_count()
    say(f"Kubernetes side by side ({cores} cores; tests/kube-env, real containers from "
        f"{DASK_IMAGE}; {args.workers} no-op workers per scale-up; {args.rounds} rounds each, "
        f"alternating; API writes at most 50/s, burst 100, on both sides; ours: the "
        f"{args.ours_build})")
    workdir = tempfile.mkdtemp(prefix="dgrs-kube-compare-")
    results = {"ours": [], "reference": []}
    bursts = {}
    try:
        if args.rounds > 0:
            results = run_rounds(kube, args, workdir)
        if args.burst > 0:
            say(f"== burst: {args.burst} users create a cluster at the same moment, each side "
                f"alone on the node")
            bursts = run_bursts(kube, args, workdir)
    except BaseException:
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    for side in args.sides:
        idle = results.get(side + "_idle_cpu_per_s", 0.0)
        for r in results[side]:
            r["scale_cpu_net_s"] = max(0.0, r["scale_cpu_s"] - idle * r["scale_window_s"])
    rows = []
    for key, label, unit in [
        ("create_to_scheduler_pod_s", "create -> scheduler Pod object", "s"),
        ("create_to_running_s", "create -> cluster RUNNING in the API", "s"),
        ("create_api_writes", "API writes from create to RUNNING (2 s after), without leases", ""),
        ("scale_pods_created_s", f"scale 0 -> {args.workers}: all worker Pod objects exist", "s"),
        ("scale_pods_sent_s", f"scale 0 -> {args.workers}: the last pod creation sent (audit log)", "s"),
        ("scale_pods_stored_s", f"scale 0 -> {args.workers}: the last pod creation answered (audit log)", "s"),
        ("scale_pods_running_s", f"scale 0 -> {args.workers}: all Running (kubelet-bound)", "s"),
        ("scale_api_writes", f"API writes per {args.workers}-worker scale-up", ""),
        ("scale_api_writes_no_leases", "the same, without leader-lease renewals", ""),
        ("scale_cpu_s", f"gateway + controller CPU per {args.workers}-worker scale-up", "s"),
        ("scale_cpu_net_s", "the same, net of each side's idle CPU over the window", "s"),
    ] if args.rounds > 0 else []:
        ours = [r[key] for r in results["ours"]]
        ref = [r[key] for r in results["reference"]]
        o, f = median(ours), median(ref)
        rows.append({"measure": label, "key": key, "unit": unit, "ours": o, "reference": f,
                     "ours_all": ours, "reference_all": ref,
                     "ratio": (o / f) if o is not None and f else None})

    # The burst: one run per side, no median.
    for key, label, unit in [
        (("statuses", "201"), "answered 201 Created", ""),
        (("create_latency_s", "p50"), "create answered, p50", "s"),
        (("create_latency_s", "p99"), "create answered, p99", "s"),
        (("running",), "clusters RUNNING", ""),
        (("running_s", "p50"), "burst start -> cluster RUNNING, p50", "s"),
        (("running_s", "last"), "burst start -> the last cluster RUNNING", "s"),
        (("workers_running_s",), "burst start -> every worker pod Running", "s"),
        (("api_writes",), "API writes, without leases", ""),
        (("cpu_s",), "gateway + controller CPU over the burst", "s"),
    ] if bursts else []:
        def get(side):
            v = bursts.get(side, {})
            for k in key:
                v = v.get(k) if isinstance(v, dict) else None
            return v
        o, f = get("ours"), get("reference")
        rows.append({"measure": f"burst of {args.burst}: {label}", "key": "burst." + ".".join(key),
                     "unit": unit, "ours": o, "reference": f,
                     "ratio": (o / f) if o is not None and f else None})

    def fmt(v, unit):
        if v is None:
            return "-"
        return f"{v:.3f} {unit}".strip() if unit else f"{v:.0f}"
    say("")
    heading = f"measure (rounds: median of {args.rounds})" if args.rounds > 0 else "measure"
    say(f"| {heading} | ours | reference {args.ref_version} | ours / reference |")
    say("|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        say(f"| {row['measure']} | {fmt(row['ours'], row['unit'])} | "
            f"{fmt(row['reference'], row['unit'])} | {ratio} |")
    summary = {"kind": "kubernetes", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "cores": cores, "loadavg": os.getloadavg(), "workers": args.workers,
               "rounds": args.rounds, "reference_version": args.ref_version,
               "ours_build": args.ours_build, "rows": rows,
               "rounds_detail": results, "burst": bursts}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    say(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
