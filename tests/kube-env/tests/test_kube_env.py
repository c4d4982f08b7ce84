"""Tests of the test Kubernetes environment itself: the control plane and the real-container
node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS).

Run by tests/kube-env/ci against a cluster started by tests/kube-env/up. Needs root (it looks
at /proc and the runtime). Environment: KUBECONFIG (admin), KUBE_ENV_KUBECTL, KUBE_ENV_IMAGE (an
image imported into the node with Python, `sh` and, for one test, dask: the Dask image of
images/build), KUBE_ENV_CTR (the `ctr` binary), KUBE_ENV_CONTAINERD_SOCK.
"""

import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
KUBECTL = os.environ.get("KUBE_ENV_KUBECTL", "kubectl")
ADMIN = os.environ["KUBECONFIG"]
IMAGE = os.environ["KUBE_ENV_IMAGE"]
CTR = os.environ["KUBE_ENV_CTR"]
CONTAINERD_SOCK = os.environ["KUBE_ENV_CONTAINERD_SOCK"]
NODE_IP = os.environ.get("KUBE_ENV_BRIDGE_IP", "10.244.0.1")


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


def pod(name, args, **spec):
    """A pod of one container of IMAGE running `args` (through the image's entrypoint)."""
    containers = spec.pop("containers", None) or [
        {"name": "main", "image": IMAGE, "args": args, **spec.pop("container", {})}
    ]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": containers, "terminationGracePeriodSeconds": 5, **spec},
    }


def phase(name, ns):
    p = get("pod", name, ns)
    return p and p["status"].get("phase")


def finished(name, ns, timeout=90):
    wait(f"{name} finished", lambda: phase(name, ns) in ("Succeeded", "Failed"), timeout=timeout)
    return phase(name, ns)


def ready_pod(name, ns, timeout=90):
    def check():
        p = get("pod", name, ns)
        if not p or p["status"].get("phase") != "Running":
            return None
        conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
        return p if conds.get("Ready") == "True" and p["status"].get("podIP") else None
    return wait(f"pod {name} ready", check, timeout=timeout)


def logs(name, ns, container=None):
    """`kubectl logs`: API server -> kubelet -> the container's log file."""
    args = ["-n", ns, "logs", name] + (["-c", container] if container else [])
    return kubectl(*args, check=False).stdout


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def try_get(url):
    try:
        return http_get(url)
    except OSError:
        return None


def pid_of(p, container=0):
    """Host PID of a running container's init process (tini in IMAGE), from containerd."""
    cid = p["status"]["containerStatuses"][container]["containerID"]
    assert cid.startswith("containerd://"), cid
    out = subprocess.run([CTR, "--address", CONTAINERD_SOCK, "-n", "k8s.io", "tasks", "ls"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        task, pid, _status = line.split()
        if task == cid[len("containerd://"):]:
            return int(pid)
    raise AssertionError(f"no task for {cid}")


def status_of(pid):
    """Uid and Gid lines of /proc/<pid>/status (real, effective, saved, fs)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.fixture
def ns():
    """A fresh namespace per test, deleted (with its pods) afterwards."""
    name = "t-" + uuid.uuid4().hex[:8]
    kubectl("create", "namespace", name)
    wait("default serviceaccount", lambda: get("serviceaccount", "default", name))
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


WEB = ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"]


def test_node_is_ready_and_leased_with_a_real_runtime():
    node = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert len(node) == 1
    conds = {c["type"]: c["status"] for c in node[0]["status"]["conditions"]}
    assert conds["Ready"] == "True"
    info = node[0]["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://2."), info
    assert info["kubeletVersion"].startswith("v1."), info
    # Honest capacity: this machine's CPUs and memory.
    assert int(node[0]["status"]["capacity"]["cpu"]) == os.cpu_count()
    lease = json.loads(kubectl("-n", "kube-node-lease", "get", "lease", node[0]["metadata"]["name"],
                               "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"] == node[0]["metadata"]["name"]


def test_pods_get_their_own_ip_and_reach_each_other_and_the_host(ns):
    apply(pod("web-a", WEB), ns)
    apply(pod("web-b", WEB), ns)
    a, b = ready_pod("web-a", ns), ready_pod("web-b", ns)
    ip_a, ip_b = a["status"]["podIP"], b["status"]["podIP"]
    assert ip_a != ip_b and ip_a.startswith("10.244.0.")
    for ip in (ip_a, ip_b):
        status, body = wait(f"http from host to {ip}", lambda: try_get(f"http://{ip}:8000/"))
        assert status == 200 and "Directory listing" in body
    script = (
        "import urllib.request\n"
        f"assert urllib.request.urlopen('http://{ip_a}:8000/', timeout=5).status == 200\n"
        "print('ok')\n"
    )
    apply(pod("client", ["python3", "-c", script], restartPolicy="Never"), ns)
    assert finished("client", ns) == "Succeeded", logs("client", ns)
    term = get("pod", "client", ns)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert logs("client", ns).strip() == "ok"


def test_the_image_user_runs_in_its_own_pid_namespace_with_tini_as_pid_1(ns):
    script = ("import os; print(os.getuid(), os.getgid(), os.getpid(), os.environ['HOME'], "
              "open('/proc/1/cmdline').read().split(chr(0))[0])")
    apply(pod("who", ["python3", "-c", script], restartPolicy="Never"), ns)
    assert finished("who", ns) == "Succeeded", logs("who", ns)
    uid, gid, pid, home, init = logs("who", ns).split()
    assert (uid, gid, home, init) == ("1000", "1000", "/home/dask", "/usr/bin/tini")
    assert int(pid) > 1  # a child of tini, in the container's PID namespace


def test_processes_run_as_the_pods_user_seen_from_the_host(ns):
    apply(pod("sleeper", ["sleep", "3600"], securityContext={"runAsUser": 4321, "runAsGroup": 4322}), ns)
    p = wait("sleeper running", lambda: (x := get("pod", "sleeper", ns))
             and x["status"].get("phase") == "Running" and x)
    init = pid_of(p)
    (sleep_pid,) = wait("sleep started", lambda: children(init))
    st = status_of(sleep_pid)
    assert st["Uid"] == ["4321"] * 4 and st["Gid"] == ["4322"] * 4
    assert st["CapEff"] == ["0000000000000000"], "a non-root container process has no capabilities"


def test_secret_files_follow_mode_and_fs_group(ns):
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
           "stringData": {"key.pem": "private"}}, ns)
    read = ["sh", "-c", "ls -lnL /creds/key.pem; cat /creds/key.pem"]
    volume = {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o440}}
    mount = {"volumeMounts": [{"name": "creds", "mountPath": "/creds", "readOnly": True}]}
    # Owned by root, mode 0440: the image's user (1000) cannot read it ...
    apply(pod("no-group", read, restartPolicy="Never", volumes=[volume], container=mount), ns)
    # ... unless the pod's fsGroup owns the files, which every container process then holds.
    apply(pod("fs-group", read, restartPolicy="Never", volumes=[volume], container=mount,
              securityContext={"fsGroup": 2000}), ns)
    assert finished("no-group", ns) == "Failed"
    assert "Permission denied" in logs("no-group", ns)
    assert finished("fs-group", ns) == "Succeeded", logs("fs-group", ns)
    out = logs("fs-group", ns)
    assert re.search(r"^-r--r----- +1 0 2000 ", out, re.M), out
    assert out.strip().endswith("private")


def test_read_only_root_filesystem_with_a_writable_empty_dir(ns):
    script = ["sh", "-c", "touch /home/dask/x 2>&1; touch /tmp/ok && echo tmp-ok"]
    apply(pod("ro", script, restartPolicy="Never", volumes=[{"name": "tmp", "emptyDir": {}}],
              container={"securityContext": {"readOnlyRootFilesystem": True},
                         "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}), ns)
    assert finished("ro", ns) == "Succeeded", logs("ro", ns)
    out = logs("ro", ns)
    assert "Read-only file system" in out and "tmp-ok" in out


def test_a_container_over_its_memory_limit_is_oom_killed(ns):
    hog = ["python3", "-c", "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('survived')"]
    apply(pod("hog", hog, restartPolicy="Never", container={
        "resources": {"limits": {"memory": "128Mi"}, "requests": {"memory": "128Mi"}}}), ns)
    assert finished("hog", ns) == "Failed"
    term = get("pod", "hog", ns)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled", term
    assert "survived" not in logs("hog", ns)


def test_env_configmap_and_downward_api_arrive(ns):
    apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf"},
           "data": {"mode": "fast", "config.yaml": "a: 1\n"}}, ns)
    script = r"""
import os, json, socket
print(json.dumps({
  "EXPANDED": os.environ.get("EXPANDED"), "POD_NAME": os.environ.get("POD_NAME"),
  "POD_IP": os.environ.get("POD_IP"), "MODE": os.environ.get("MODE"),
  "CFG_mode": os.environ.get("CFG_mode"), "cm_file": open("/conf/config.yaml").read(),
  "sa_namespace": open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read(),
  "hostname": socket.gethostname(),
}))
"""
    apply(pod("envpod", ["python3", "-c", script], restartPolicy="Never", container={
        "env": [
            {"name": "PLAIN", "value": "hello"},
            {"name": "EXPANDED", "value": "$(PLAIN)-world"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "mode"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "conf"}, "prefix": "CFG_"}],
        "volumeMounts": [{"name": "conf", "mountPath": "/conf"}],
    }, volumes=[{"name": "conf", "configMap": {"name": "conf"}}]), ns)
    assert finished("envpod", ns) == "Succeeded", logs("envpod", ns)
    out = json.loads(logs("envpod", ns).strip().splitlines()[-1])
    ip = get("pod", "envpod", ns)["status"]["podIP"]
    assert out == {"EXPANDED": "hello-world", "POD_NAME": "envpod", "POD_IP": ip, "MODE": "fast",
                   "CFG_mode": "fast", "cm_file": "a: 1\n", "sa_namespace": ns,
                   "hostname": "envpod"}


def test_exit_codes_and_restart_policy(ns):
    apply(pod("fails", ["python3", "-c", "raise SystemExit(3)"], restartPolicy="Never"), ns)
    apply(pod("flaky", ["sh", "-c", "test -f /state/ran && exit 0; touch /state/ran; exit 1"],
              restartPolicy="OnFailure", volumes=[{"name": "state", "emptyDir": {}}],
              container={"volumeMounts": [{"name": "state", "mountPath": "/state"}]}), ns)
    assert finished("fails", ns) == "Failed"
    t = get("pod", "fails", ns)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert t["exitCode"] == 3 and t["reason"] == "Error"
    assert finished("flaky", ns, timeout=60) == "Succeeded"
    assert get("pod", "flaky", ns)["status"]["containerStatuses"][0]["restartCount"] == 1


def test_delete_sends_sigterm_then_sigkill_after_the_grace_period(ns):
    # tini passes SIGTERM to the process group; this one ignores it and is killed at 2 s.
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('up', flush=True); time.sleep(3600)")
    apply(pod("stubborn", ["python3", "-c", script], terminationGracePeriodSeconds=2), ns)
    p = wait("stubborn up", lambda: "up" in logs("stubborn", ns) and get("pod", "stubborn", ns))
    pid = pid_of(p)
    ip = p["status"]["podIP"]
    t0 = time.monotonic()
    kubectl("-n", ns, "delete", "pod", "stubborn", "--wait=true", "--timeout=60s")
    took = time.monotonic() - t0
    assert not Path(f"/proc/{pid}").exists()
    assert took > 1.5, took
    # A process that exits on SIGTERM goes at once.
    apply(pod("polite", ["sleep", "3600"]), ns)
    p = ready_pod("polite", ns)
    pid = pid_of(p)
    kubectl("-n", ns, "delete", "pod", "polite", "--wait=true", "--timeout=60s")
    wait("polite gone", lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    # The deleted pods' addresses answer no more.
    assert try_get(f"http://{ip}:8000/") is None


def test_readiness_probe_gates_ready(ns):
    script = ("import time, http.server as h; time.sleep(3); "
              "h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=8000, bind='0.0.0.0')")
    apply(pod("probed", ["python3", "-c", script], container={
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }), ns)
    wait("probed running", lambda: phase("probed", ns) == "Running")
    assert get("pod", "probed", ns)["status"]["containerStatuses"][0]["ready"] is False
    ready_pod("probed", ns)


def test_kubectl_exec(ns):
    apply(pod("target", ["sleep", "3600"]), ns)
    ready_pod("target", ns)
    out = kubectl("-n", ns, "exec", "target", "--", "id", "-u").stdout
    assert out.strip() == "1000"


def test_serviceaccount_without_rolebinding_is_refused(ns):
    kubectl("-n", ns, "create", "serviceaccount", "nobody")
    kc = subprocess.run([str(HERE / "sa-kubeconfig"), ns, "nobody"], capture_output=True, text=True,
                        check=True).stdout.strip().splitlines()[-1]
    p = kubectl("get", "pods", kubeconfig=kc, check=False)
    assert p.returncode != 0 and "forbidden" in p.stderr.lower(), p.stderr
    kubectl("-n", ns, "create", "role", "pod-reader", "--verb=get,list", "--resource=pods")
    kubectl("-n", ns, "create", "rolebinding", "nobody-reads", "--role=pod-reader",
            f"--serviceaccount={ns}:nobody")
    wait("rbac to apply", lambda: kubectl("get", "pods", kubeconfig=kc, check=False).returncode == 0,
         timeout=10)
    p = kubectl("get", "secrets", kubeconfig=kc, check=False)
    assert p.returncode != 0 and "forbidden" in p.stderr.lower()


def test_pod_reaches_api_with_its_serviceaccount_token(ns):
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
ns = open(d + "namespace").read()
print(json.dumps({"version": get("/version"), "pods": get("/api/v1/namespaces/%s/pods" % ns),
                  "via_service": get("/version", "https://kubernetes.default.svc")}))
"""
    apply(pod("incluster", ["python3", "-c", script], restartPolicy="Never"), ns)
    assert finished("incluster", ns) == "Succeeded", logs("incluster", ns)
    assert json.loads(logs("incluster", ns).strip().splitlines()[-1]) == {
        "version": 200, "pods": 403, "via_service": 200}


def test_services_by_cluster_ip_node_port_and_dns_name(ns):
    apply(pod("backend", WEB) | {"metadata": {"name": "backend", "labels": {"app": "backend"}}}, ns)
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {
        "type": "NodePort", "selector": {"app": "backend"},
        "ports": [{"name": "http", "port": 80, "targetPort": 8000}]}}, ns)
    ready_pod("backend", ns)
    svc = get("service", "web", ns)
    ip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    # From the host: the ClusterIP and the node port, both by kube-proxy's rules.
    assert wait("ClusterIP", lambda: try_get(f"http://{ip}:80/"), timeout=30)[0] == 200
    assert wait("NodePort", lambda: try_get(f"http://{NODE_IP}:{node_port}/"), timeout=30)[0] == 200
    # From a pod, by short, namespaced and full name (CoreDNS); other names do not resolve.
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
    assert finished("svc-client", ns) == "Succeeded", logs("svc-client", ns)
    # A pod reaching its own Service (hairpin through the bridge).
    hairpin = ("import urllib.request; "
               "assert urllib.request.urlopen('http://web/', timeout=5).status == 200; print('hairpin ok')")
    out = kubectl("-n", ns, "exec", "backend", "--", "python3", "-c", hairpin).stdout
    assert "hairpin ok" in out


def test_owner_reference_garbage_collection(ns):
    apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}}, ns)
    uid = get("configmap", "owner", ns)["metadata"]["uid"]
    apply(pod("owned", ["sleep", "3600"]) | {"metadata": {"name": "owned", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}, ns)
    pid = pid_of(ready_pod("owned", ns))
    kubectl("-n", ns, "delete", "configmap", "owner")
    wait("owned pod collected", lambda: get("pod", "owned", ns) is None, timeout=60)
    wait("process gone", lambda: not Path(f"/proc/{pid}").exists(), timeout=10)


def test_host_network_pod_with_exec_probe(ns):
    port = "18765"
    probe = ["python3", "-c",
             f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)"]
    apply(pod("hostnet", ["python3", "-m", "http.server", port, "--bind", "127.0.0.1"],
              hostNetwork=True, container={
                  "readinessProbe": {"exec": {"command": probe}, "periodSeconds": 1}}), ns)
    p = ready_pod("hostnet", ns)
    assert p["status"]["podIP"] == p["status"]["hostIP"]
    assert wait("host port", lambda: try_get(f"http://127.0.0.1:{port}/"))[0] == 200
    kubectl("-n", ns, "delete", "pod", "hostnet", "--wait=true", "--timeout=60s")
    assert try_get(f"http://127.0.0.1:{port}/") is None


def test_dask_cluster_in_pods(ns):
    # A scheduler behind a Service, a worker that finds it by DNS name, a client on the host.
    distributed = pytest.importorskip("distributed")
    apply(pod("sched", ["dask", "scheduler", "--port", "8786", "--no-dashboard"], container={
        "readinessProbe": {"tcpSocket": {"port": 8786}, "periodSeconds": 1}}) |
        {"metadata": {"name": "sched", "labels": {"app": "sched"}}}, ns)
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sched"}, "spec": {
        "selector": {"app": "sched"}, "ports": [{"name": "tcp", "port": 8786, "targetPort": 8786}]}},
        ns)
    apply(pod("worker", ["dask", "worker", "tcp://sched:8786", "--nworkers", "1", "--nthreads", "1",
                         "--no-dashboard", "--name", "$(POD_NAME)"], container={
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
        ns)
    ready_pod("sched", ns)
    ip = get("service", "sched", ns)["spec"]["clusterIP"]
    with distributed.Client(f"tcp://{ip}:8786", timeout=30) as client:
        client.wait_for_workers(1, timeout=90)
        (worker,) = client.scheduler_info()["workers"].values()
        assert worker["name"] == "worker"
        assert worker["host"] == ready_pod("worker", ns)["status"]["podIP"]
        assert client.submit(lambda x: x + 1, 41).result(timeout=30) == 42


def test_deployment_scales_through_controllers(ns):
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "webs"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": {"app": "webs"}},
        "template": {"metadata": {"labels": {"app": "webs"}}, "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "web", "image": IMAGE, "args": WEB}]}}}}
    apply(dep, ns)
    wait("2 ready replicas", lambda: get("deployment", "webs", ns)["status"].get("readyReplicas") == 2)
    pods = json.loads(kubectl("-n", ns, "get", "pods", "-l", "app=webs", "-o", "json").stdout)["items"]
    pids = {pid_of(p) for p in pods}
    assert len({p["status"]["podIP"] for p in pods}) == 2
    kubectl("-n", ns, "scale", "deployment", "webs", "--replicas=0")
    wait("pods gone", lambda: not json.loads(kubectl("-n", ns, "get", "pods", "-l", "app=webs",
                                                     "-o", "json").stdout)["items"])
    wait("processes gone", lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids),
         timeout=10)


def test_init_container_and_empty_dir(ns):
    mount = [{"name": "data", "mountPath": "/data"}]
    spec = pod("withinit", None, restartPolicy="Never", containers=[{
        "name": "main", "image": IMAGE, "args": ["sh", "-c", "cat /data/msg"], "volumeMounts": mount,
    }], initContainers=[{
        "name": "prep", "image": IMAGE, "args": ["sh", "-c", "echo from-init > /data/msg"],
        "volumeMounts": mount,
    }], volumes=[{"name": "data", "emptyDir": {}}])
    apply(spec, ns)
    assert finished("withinit", ns) == "Succeeded", logs("withinit", ns, "main")
    p = get("pod", "withinit", ns)
    assert p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert logs("withinit", ns, "main") == "from-init\n"


def test_crd_schema_validation_and_resource_version_conflict(ns):
    group = "kubeenv.dgrs.test"
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"widgets.{group}"}, "spec": {
               "group": group, "scope": "Namespaced",
               "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
               "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                   "openAPIV3Schema": {"type": "object", "properties": {"spec": {
                       "type": "object", "required": ["size"],
                       "properties": {"size": {"type": "integer", "minimum": 1}}}}}}}]}}
    kubectl("apply", "-f", "-", input=json.dumps(crd))
    kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")
    try:
        w = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"},
             "spec": {"size": 2}}
        wait("widget created", lambda: kubectl("-n", ns, "create", "-f", "-", input=json.dumps(w),
                                               check=False).returncode == 0, timeout=10)
        bad = kubectl("-n", ns, "create", "-f", "-", check=False, input=json.dumps(
            w | {"metadata": {"name": "bad"}, "spec": {"size": 0}}))
        assert bad.returncode != 0 and "spec.size" in bad.stderr, bad.stderr
        cur = get(f"widgets.{group}", "w", ns)
        kubectl("-n", ns, "patch", f"widgets.{group}", "w", "--type=merge", "-p", '{"spec":{"size":3}}')
        cur["spec"]["size"] = 4
        stale = kubectl("-n", ns, "replace", "-f", "-", input=json.dumps(cur), check=False)
        assert stale.returncode != 0 and "the object has been modified" in stale.stderr, stale.stderr
    finally:
        kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)
