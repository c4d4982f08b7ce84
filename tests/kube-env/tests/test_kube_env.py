"""Tests of the test Kubernetes environment itself: the control plane and the process kubelet.

Run by tests/kube-env/ci against a cluster started by tests/kube-env/up. Needs root (it looks
at network namespaces and /proc). Environment: KUBECONFIG (admin), KUBE_ENV_KUBECTL.
"""

import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
KUBECTL = os.environ.get("KUBE_ENV_KUBECTL", "kubectl")
ADMIN = os.environ["KUBECONFIG"]
RUN_DIR = Path(os.environ.get("KUBE_ENV_DIR", "/tmp/dgrs-kube-env"))
NETNS_PREFIX = os.environ.get("KUBE_ENV_NETNS_PREFIX", "dgrs-pod-")


def kubectl(*args, kubeconfig=ADMIN, input=None, check=True):
    """Runs kubectl; returns the CompletedProcess (text)."""
    p = subprocess.run(
        [KUBECTL, "--kubeconfig", kubeconfig, *args],
        input=input, capture_output=True, text=True, timeout=120,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr}")
    return p


def apply(obj, ns):
    kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(obj))


def get(kind, name, ns):
    p = kubectl("-n", ns, "get", kind, name, "-o", "json", check=False)
    if p.returncode != 0:
        if "NotFound" in p.stderr:
            return None
        raise AssertionError(p.stderr)
    return json.loads(p.stdout)


def wait(what, fn, timeout=60.0, interval=0.2):
    """Polls fn until it returns something truthy; fails with what after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def pod(name, command, **spec):
    containers = spec.pop("containers", None) or [
        {"name": "main", "image": "ignored", "command": command, **spec.pop("container", {})}
    ]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": containers, "terminationGracePeriodSeconds": 5, **spec},
    }


def phase(name, ns):
    p = get("pod", name, ns)
    return p and p["status"].get("phase")


def ready_pod(name, ns):
    def check():
        p = get("pod", name, ns)
        if not p or p["status"].get("phase") != "Running":
            return None
        conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
        return p if conds.get("Ready") == "True" and p["status"].get("podIP") else None
    return wait(f"pod {name} ready", check)


def container_log(name, ns):
    logs = list((RUN_DIR / "kubelet" / "pods").glob(f"{ns}_{name}_*/*.log"))
    return "\n".join(f"--- {p}\n{p.read_text()}" for p in logs)


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def pid_of(p, container=0):
    cid = p["status"]["containerStatuses"][container]["containerID"]
    assert cid.startswith("process://"), cid
    return int(cid[len("process://"):])


def netns_list():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)]


@pytest.fixture
def ns():
    """A fresh namespace per test, deleted (with its pods) afterwards."""
    name = "t-" + uuid.uuid4().hex[:8]
    kubectl("create", "namespace", name)
    wait("default serviceaccount", lambda: get("serviceaccount", "default", name))
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


WEB = ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"]


def test_node_is_ready_and_leased():
    node = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert len(node) == 1
    conds = {c["type"]: c["status"] for c in node[0]["status"]["conditions"]}
    assert conds["Ready"] == "True"
    lease = json.loads(kubectl("-n", "kube-node-lease", "get", "lease", node[0]["metadata"]["name"], "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"] == node[0]["metadata"]["name"]


def test_http_server_reachable_from_host_and_other_pod(ns):
    # Two pods on the same port: each has its own network namespace and IP.
    apply(pod("web-a", WEB), ns)
    apply(pod("web-b", WEB), ns)
    a, b = ready_pod("web-a", ns), ready_pod("web-b", ns)
    ip_a, ip_b = a["status"]["podIP"], b["status"]["podIP"]
    assert ip_a != ip_b
    assert ip_a.startswith("10.244.0.")
    assert a["status"]["containerStatuses"][0]["ready"] is True
    assert a["status"]["containerStatuses"][0]["state"].get("running")
    for ip in (ip_a, ip_b):
        status, body = wait(f"http from host to {ip}", lambda: _try_get(f"http://{ip}:8000/"))
        assert status == 200 and "Directory listing" in body

    # A third pod fetches from web-a by IP, then exits 0.
    script = (
        "import urllib.request, sys\n"
        f"r = urllib.request.urlopen('http://{ip_a}:8000/', timeout=5)\n"
        "assert r.status == 200\n"
        "print('ok from', sys.argv[1])\n"
    )
    apply(pod("client", ["python3", "-c", script, "client"], restartPolicy="Never"), ns)
    wait("client pod Succeeded", lambda: phase("client", ns) in ("Succeeded", "Failed"))
    assert phase("client", ns) == "Succeeded", container_log("client", ns)
    c = get("pod", "client", ns)
    term = c["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert "ok from client" in container_log("client", ns)


def _try_get(url):
    try:
        return http_get(url)
    except OSError:
        return None


def test_env_secret_and_configmap_arrive(ns):
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
           "stringData": {"password": "s3cr3t", "token": "tok"}}, ns)
    apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf"},
           "data": {"mode": "fast", "config.yaml": "a: 1\n"}}, ns)
    script = r"""
import os, json, socket
def read(p):
    with open(p) as f:
        return f.read()
out = {
  "PLAIN": os.environ.get("PLAIN"),
  "EXPANDED": os.environ.get("EXPANDED"),
  "POD_NAME": os.environ.get("POD_NAME"),
  "POD_NS": os.environ.get("POD_NS"),
  "POD_IP": os.environ.get("POD_IP"),
  "PASSWORD": os.environ.get("PASSWORD"),
  "MODE": os.environ.get("MODE"),
  "CFG_mode": os.environ.get("CFG_mode"),
  "token": os.environ.get("token"),
  "secret_file": read("/etc/dgrs-test/secret/password"),
  "secret_item": read("/etc/dgrs-test/items/pw"),
  "cm_file": read("/etc/dgrs-test/conf/config.yaml"),
  "sa_namespace": read("/var/run/secrets/kubernetes.io/serviceaccount/namespace"),
  "hostname": socket.gethostname(),
  "ips": sorted({a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}),
}
print(json.dumps(out))
"""
    spec = pod("envpod", ["python3", "-c", script], restartPolicy="Never", container={
        "env": [
            {"name": "PLAIN", "value": "hello"},
            {"name": "EXPANDED", "value": "$(PLAIN)-world"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "mode"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "conf"}, "prefix": "CFG_"}, {"secretRef": {"name": "creds"}}],
        "volumeMounts": [
            {"name": "secret", "mountPath": "/etc/dgrs-test/secret", "readOnly": True},
            {"name": "items", "mountPath": "/etc/dgrs-test/items"},
            {"name": "conf", "mountPath": "/etc/dgrs-test/conf"},
        ],
    }, volumes=[
        {"name": "secret", "secret": {"secretName": "creds"}},
        {"name": "items", "secret": {"secretName": "creds", "items": [{"key": "password", "path": "pw"}]}},
        {"name": "conf", "configMap": {"name": "conf"}},
    ])
    apply(spec, ns)
    wait("envpod finished", lambda: phase("envpod", ns) in ("Succeeded", "Failed"))
    log = container_log("envpod", ns)
    assert phase("envpod", ns) == "Succeeded", log
    out = json.loads(log.strip().splitlines()[-1])
    p = get("pod", "envpod", ns)
    assert out == {
        "PLAIN": "hello", "EXPANDED": "hello-world", "POD_NAME": "envpod", "POD_NS": ns,
        "POD_IP": p["status"]["podIP"], "PASSWORD": "s3cr3t", "MODE": "fast", "CFG_mode": "fast",
        "token": "tok", "secret_file": "s3cr3t", "secret_item": "s3cr3t", "cm_file": "a: 1\n",
        "sa_namespace": ns, "hostname": "envpod", "ips": [p["status"]["podIP"]],
    }
    # `kubectl logs` goes API server -> process kubelet.
    assert json.loads(kubectl("-n", ns, "logs", "envpod", "--tail=1").stdout) == out
    # The volumes were mounted in the pod's own mount namespace only.
    assert not Path("/etc/dgrs-test/secret/password").exists()


def test_missing_secret_keeps_pod_pending_until_created(ns):
    spec = pod("waits", ["python3", "-c", "import os; print(os.environ['X'])"], restartPolicy="Never",
               container={"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "later", "key": "x"}}}]})
    apply(spec, ns)

    def waiting_reason():
        p = get("pod", "waits", ns)
        st = (p["status"].get("containerStatuses") or [{}])[0].get("state", {})
        return st.get("waiting", {}).get("reason")
    assert wait("config error", lambda: waiting_reason() == "CreateContainerConfigError" or None)
    assert phase("waits", ns) == "Pending"
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "later"}, "stringData": {"x": "now"}}, ns)
    wait("pod finished", lambda: phase("waits", ns) == "Succeeded", timeout=30)
    assert "now" in container_log("waits", ns)


def test_exit_codes_and_restart_policy(ns):
    apply(pod("fails", ["python3", "-c", "raise SystemExit(3)"], restartPolicy="Never"), ns)
    apply(pod("flaky", ["sh", "-c", "test -f ./ran && exit 0; touch ./ran; exit 1"], restartPolicy="OnFailure"), ns)
    wait("fails Failed", lambda: phase("fails", ns) == "Failed")
    t = get("pod", "fails", ns)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert t["exitCode"] == 3 and t["reason"] == "Error"
    # OnFailure: restarted once (same working directory), then succeeds.
    wait("flaky Succeeded", lambda: phase("flaky", ns) == "Succeeded", timeout=30)
    assert get("pod", "flaky", ns)["status"]["containerStatuses"][0]["restartCount"] == 1


def test_delete_kills_process_and_removes_netns(ns):
    apply(pod("victim", WEB), ns)
    p = ready_pod("victim", ns)
    pid = pid_of(p)
    assert Path(f"/proc/{pid}").exists()
    assert "http.server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
    own = NETNS_PREFIX + p["metadata"]["uid"].replace("-", "")[:10]
    assert own in netns_list()
    kubectl("-n", ns, "delete", "pod", "victim", "--wait=true", "--timeout=60s")
    assert get("pod", "victim", ns) is None
    wait("process gone", lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    ip = p["status"]["podIP"]
    assert _try_get(f"http://{ip}:8000/") is None
    assert own not in netns_list()


def test_grace_period_then_sigkill(ns):
    # Ignores SIGTERM: must be SIGKILLed once the 2s grace period is over.
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(3600)"
    apply(pod("stubborn", ["python3", "-c", script], terminationGracePeriodSeconds=2), ns)
    p = wait("stubborn running", lambda: (x := get("pod", "stubborn", ns)) and x["status"].get("phase") == "Running" and x)
    pid = pid_of(p)
    t0 = time.monotonic()
    kubectl("-n", ns, "delete", "pod", "stubborn", "--wait=true", "--timeout=60s")
    took = time.monotonic() - t0
    assert not Path(f"/proc/{pid}").exists()
    assert 1.5 < took < 15, took


def test_readiness_probe_gates_ready(ns):
    # The server starts listening only after 3 seconds; Ready must follow the httpGet probe.
    script = "import time, http.server as h; time.sleep(3); h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=8000, bind='0.0.0.0')"
    apply(pod("probed", ["python3", "-c", script], container={
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }), ns)
    wait("probed running", lambda: phase("probed", ns) == "Running")
    p = get("pod", "probed", ns)
    assert p["status"]["containerStatuses"][0]["ready"] is False
    ready_pod("probed", ns)


def test_serviceaccount_without_rolebinding_is_refused(ns):
    kubectl("-n", ns, "create", "serviceaccount", "nobody")
    kc = subprocess.run([str(HERE / "sa-kubeconfig"), ns, "nobody"], capture_output=True, text=True, check=True
                        ).stdout.strip().splitlines()[-1]
    p = kubectl("get", "pods", kubeconfig=kc, check=False)
    assert p.returncode != 0 and "forbidden" in p.stderr.lower(), p.stderr
    assert f"system:serviceaccount:{ns}:nobody" in p.stderr
    # Granting a Role makes exactly that allowed, and nothing more.
    kubectl("-n", ns, "create", "role", "pod-reader", "--verb=get,list", "--resource=pods")
    kubectl("-n", ns, "create", "rolebinding", "nobody-reads", "--role=pod-reader", f"--serviceaccount={ns}:nobody")
    wait("rbac to apply", lambda: kubectl("get", "pods", kubeconfig=kc, check=False).returncode == 0, timeout=10)
    p = kubectl("get", "secrets", kubeconfig=kc, check=False)
    assert p.returncode != 0 and "forbidden" in p.stderr.lower()


def test_pod_reaches_api_with_its_serviceaccount_token(ns):
    # In-cluster config: token, CA and namespace mounted by the kubelet, API via KUBERNETES_SERVICE_HOST.
    script = r"""
import os, ssl, json, urllib.request, urllib.error
d = "/var/run/secrets/kubernetes.io/serviceaccount/"
tok = open(d + "token").read()
ctx = ssl.create_default_context(cafile=d + "ca.crt")
base = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
def get(path, base=base):
    req = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + tok})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
print(json.dumps({"version": get("/version"), "pods": get("/api/v1/namespaces/%s/pods" % open(d + "namespace").read()),
                  "via_service": get("/version", "https://kubernetes.default.svc")}))
"""
    apply(pod("incluster", ["python3", "-c", script], restartPolicy="Never"), ns)
    wait("incluster finished", lambda: phase("incluster", ns) in ("Succeeded", "Failed"))
    log = container_log("incluster", ns)
    assert phase("incluster", ns) == "Succeeded", log
    # Authenticated (version readable) but the default ServiceAccount may not list pods.
    assert json.loads(log.strip().splitlines()[-1]) == {"version": 200, "pods": 403, "via_service": 200}


def test_service_by_cluster_ip_and_dns_name(ns):
    apply(pod("backend", WEB) | {"metadata": {"name": "backend", "labels": {"app": "backend"}}}, ns)
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {
        "selector": {"app": "backend"}, "ports": [{"name": "http", "port": 80, "targetPort": 8000}]}}, ns)
    ready_pod("backend", ns)
    ip = get("service", "web", ns)["spec"]["clusterIP"]
    # From the host, by ClusterIP (once the endpoints are ready).
    status, _ = wait("service via ClusterIP", lambda: _try_get(f"http://{ip}:80/"), timeout=30)
    assert status == 200
    # From a pod, by short name, namespaced name and full name.
    script = (
        "import urllib.request, socket\n"
        f"for host in ['web', 'web.{ns}', 'web.{ns}.svc.cluster.local']:\n"
        "    assert urllib.request.urlopen(f'http://{host}/', timeout=5).status == 200, host\n"
        "try:\n"
        "    socket.gethostbyname('nope.example.com')\n"
        "    raise SystemExit('resolved an outside name')\n"
        "except socket.gaierror:\n"
        "    pass\n"
        "print('services ok')\n"
    )
    apply(pod("svc-client", ["python3", "-c", script], restartPolicy="Never"), ns)
    wait("svc-client finished", lambda: phase("svc-client", ns) in ("Succeeded", "Failed"))
    log = container_log("svc-client", ns)
    assert phase("svc-client", ns) == "Succeeded", log
    assert "services ok" in log


def test_owner_reference_garbage_collection(ns):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}}
    apply(cm, ns)
    uid = get("configmap", "owner", ns)["metadata"]["uid"]
    apply(pod("owned", WEB, ) | {"metadata": {"name": "owned", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}, ns)
    p = ready_pod("owned", ns)
    pid = pid_of(p)
    kubectl("-n", ns, "delete", "configmap", "owner")
    wait("owned pod collected", lambda: get("pod", "owned", ns) is None, timeout=60)
    wait("process gone", lambda: not Path(f"/proc/{pid}").exists(), timeout=10)


def test_host_network_pod_with_exec_probe(ns):
    port = "18765"
    probe = ["python3", "-c", f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)"]
    apply(pod("hostnet", ["python3", "-m", "http.server", port, "--bind", "127.0.0.1"], hostNetwork=True, container={
        "readinessProbe": {"exec": {"command": probe}, "periodSeconds": 1},
    }), ns)
    p = ready_pod("hostnet", ns)
    assert p["status"]["podIP"] == p["status"]["hostIP"]
    status, _ = wait("host port", lambda: _try_get(f"http://127.0.0.1:{port}/"))
    assert status == 200
    kubectl("-n", ns, "delete", "pod", "hostnet", "--wait=true", "--timeout=60s")
    assert _try_get(f"http://127.0.0.1:{port}/") is None


def _pod_path_has(cmd):
    path = os.environ.get("KUBE_ENV_POD_PATH", "")
    return any(os.access(os.path.join(d, cmd), os.X_OK) for d in path.split(":") if d)


@pytest.mark.skipif(not _pod_path_has("dask"), reason="dask not on the pod PATH (KUBE_ENV_POD_PATH)")
def test_dask_cluster_in_pods(ns):
    # A scheduler behind a Service, a worker that finds it by DNS name, a client on the host.
    distributed = pytest.importorskip("distributed")
    apply(pod("sched", ["dask", "scheduler", "--port", "8786", "--no-dashboard"], container={
        "readinessProbe": {"tcpSocket": {"port": 8786}, "periodSeconds": 1}}) |
        {"metadata": {"name": "sched", "labels": {"app": "sched"}}}, ns)
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sched"}, "spec": {
        "selector": {"app": "sched"}, "ports": [{"name": "tcp", "port": 8786, "targetPort": 8786}]}}, ns)
    apply(pod("worker", ["dask", "worker", "tcp://sched:8786", "--nworkers", "1", "--nthreads", "1",
                         "--no-dashboard", "--name", "$(POD_NAME)"], container={
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}), ns)
    ready_pod("sched", ns)
    ip = get("service", "sched", ns)["spec"]["clusterIP"]
    with distributed.Client(f"tcp://{ip}:8786", timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        info = client.scheduler_info()
        (worker,) = info["workers"].values()
        assert worker["name"] == "worker"
        assert worker["host"] == ready_pod("worker", ns)["status"]["podIP"]
        assert client.submit(lambda x: x + 1, 41).result(timeout=30) == 42


def test_deployment_scales_through_controllers(ns):
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "webs"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": {"app": "webs"}},
        "template": {"metadata": {"labels": {"app": "webs"}}, "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "web", "image": "ignored", "command": WEB}]}}}}
    apply(dep, ns)

    def ready_count():
        d = get("deployment", "webs", ns)
        return d["status"].get("readyReplicas", 0)
    wait("2 ready replicas", lambda: ready_count() == 2)
    pods = json.loads(kubectl("-n", ns, "get", "pods", "-l", "app=webs", "-o", "json").stdout)["items"]
    pids = {pid_of(p) for p in pods}
    assert len({p["status"]["podIP"] for p in pods}) == 2
    kubectl("-n", ns, "scale", "deployment", "webs", "--replicas=0")
    wait("pods gone", lambda: not json.loads(kubectl("-n", ns, "get", "pods", "-l", "app=webs", "-o", "json").stdout)["items"])
    wait("processes gone", lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), timeout=10)


def test_init_container_and_empty_dir(ns):
    spec = pod("withinit", None, restartPolicy="Never", containers=[{
        "name": "main", "image": "ignored", "command": ["sh", "-c", "cat /dgrs-test-data/msg"],
        "volumeMounts": [{"name": "data", "mountPath": "/dgrs-test-data"}],
    }], initContainers=[{
        "name": "prep", "image": "ignored", "command": ["sh", "-c", "echo from-init > /dgrs-test-data/msg"],
        "volumeMounts": [{"name": "data", "mountPath": "/dgrs-test-data"}],
    }], volumes=[{"name": "data", "emptyDir": {}}])
    apply(spec, ns)
    wait("withinit finished", lambda: phase("withinit", ns) in ("Succeeded", "Failed"))
    assert phase("withinit", ns) == "Succeeded", container_log("withinit", ns)
    p = get("pod", "withinit", ns)
    assert p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert kubectl("-n", ns, "logs", "withinit", "-c", "main").stdout == "from-init\n"


def test_crd_schema_validation_and_resource_version_conflict(ns):
    group = "kubeenv.dgrs.test"
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"widgets.{group}"}, "spec": {
               "group": group, "scope": "Namespaced",
               "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
               "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                   "type": "object", "properties": {"spec": {
                       "type": "object", "required": ["size"],
                       "properties": {"size": {"type": "integer", "minimum": 1}}}}}}}]}}
    kubectl("apply", "-f", "-", input=json.dumps(crd))
    kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")
    try:
        w = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 2}}
        wait("widget created", lambda: kubectl("-n", ns, "create", "-f", "-", input=json.dumps(w), check=False).returncode == 0, timeout=10)
        bad = kubectl("-n", ns, "create", "-f", "-", check=False, input=json.dumps(
            w | {"metadata": {"name": "bad"}, "spec": {"size": 0}}))
        assert bad.returncode != 0 and "spec.size" in bad.stderr, bad.stderr
        # Optimistic concurrency: an update carrying an old resourceVersion is a Conflict.
        cur = get(f"widgets.{group}", "w", ns)
        kubectl("-n", ns, "patch", f"widgets.{group}", "w", "--type=merge", "-p", '{"spec":{"size":3}}')
        cur["spec"]["size"] = 4
        stale = kubectl("-n", ns, "replace", "-f", "-", input=json.dumps(cur), check=False)
        assert stale.returncode != 0 and "the object has been modified" in stale.stderr, stale.stderr
    finally:
        kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)
