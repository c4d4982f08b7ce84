"""The Helm chart with real Helm (tests/helm/build) against tests/kube-env (real kubelet,
containerd and runc): lint and render, schema errors that name the value, least-privilege RBAC,
a server-side dry run of everything the chart can render, and a real install with the chart's
default images (made by images/build, imported into the node): the gateway pod runs the gateway
image under the chart's ServiceAccount, non-root with a read-only root filesystem, and so do the
Dask pods; used with the stock client, `helm test`, `helm upgrade` (config and CRD) and
`helm uninstall`.

Run by tests/helm/run (tests/run calls it inside tests/kube-env/ci).
"""

import base64
import gc
import json
import os
import shutil
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dask-gateway-rs"
ALL_VALUES = Path(__file__).resolve().parent / "values-all.yaml"
HELM = os.environ["HELM"]
KUBECTL = os.environ["KUBECTL"]

# Test-sized Dask pods (the test node has this machine's 2 CPUs).
SMALL = ["-f", str(Path(__file__).resolve().parent / "values-small.yaml")]
CTR = os.environ["KUBE_ENV_CTR"]
CONTAINERD_SOCK = os.environ["KUBE_ENV_CONTAINERD_SOCK"]

EXPECTED_RULES = {
    ("dask-gateway-rs.io", "daskclusters"): {"get", "list", "watch", "create", "patch", "delete"},
    ("dask-gateway-rs.io", "daskclusters/status"): {"get", "update", "patch"},
    ("dask-gateway-rs.io", "daskclusters/finalizers"): {"update"},
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "pods/log"): {"get"},
    ("", "services"): {"get", "list", "watch", "create", "delete"},
    ("", "secrets"): {"get", "list", "watch", "create", "delete"},
    ("", "events"): {"list", "create"},  # a cluster's events: read, and the gateway's own
    ("coordination.k8s.io", "leases"): {"get", "create", "update", "delete"},
}


def run(*args, check=True, input=None, timeout=600):
    r = subprocess.run(args, capture_output=True, text=True, input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def helm(*args, **kw):
    return run(HELM, *args, **kw)


def kubectl(*args, **kw):
    return run(KUBECTL, *args, **kw)


def render(*args):
    out = helm("template", "dgrs", str(CHART), "--namespace", "dgrs-test", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def wait_for(what, predicate, timeout=120, interval=1.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def namespace():
    ns = f"helm-{os.urandom(3).hex()}"
    kubectl("create", "namespace", ns)
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


# -- static ------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_VALUES)]], ids=["defaults", "all-on"])
def test_lint(values):
    out = helm("lint", "--strict", str(CHART), *values).stdout
    assert "0 chart(s) failed" in out, out


def test_manifests_are_rendered_from_the_chart():
    run(str(REPO / "scripts" / "render-manifests"), "--check")


@pytest.mark.parametrize("setting, message", [
    ("gateway.replicas=zero", "at '/gateway/replicas': got string, want integer"),
    ("service.type=Loadbalancer", "at '/service/type'"),
    ("clusters.worker.memory=lots", "at '/clusters/worker/memory'"),
    ("gateway.nodeSelectr.a=b", "additional properties 'nodeSelectr' not allowed"),
    ("clusters.namespace=Not_Valid", "at '/clusters/namespace'"),
])
def test_a_wrong_value_fails_with_a_message_that_names_it(setting, message):
    r = helm("template", "x", str(CHART), "--set", setting, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_VALUES)]], ids=["defaults", "all-on"])
def test_rbac_is_exactly_what_the_code_uses(values):
    docs = render(*values)
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "nothing cluster-wide"
    [role] = [d for d in docs if d["kind"] == "Role"]
    rules = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in rule["verbs"] and resource != "*" and group != "*"
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    assert rules == EXPECTED_RULES
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    [sa] = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "dgrs-test"}]


def test_the_rendered_configuration_is_valid_for_the_gateway(tmp_path):
    binary = os.environ["GATEWAY_SERVER_BIN"]
    jwks = ["--set", "auth.type=jwt", "--set", "auth.jwt.jwksUrl=https://idp.example/jwks",
            "--set", "auth.jwt.audience=dask"]
    hs256 = ["--set", "auth.type=jwt", "--set", "auth.jwt.existingSecret=jwt-secret"]
    hub = ["--set", "auth.type=jupyterhub", "--set", "auth.jupyterhub.apiUrl=http://hub:8081/hub/api",
           "--set", "auth.jupyterhub.existingSecret=hub-token", "--set",
           "auth.jupyterhub.oauthRedirectUri=https://dask.example.org/api/oauth_callback",
           "--set", "auth.cookieSecret.existingSecret=sessions"]
    for values in ([], ["-f", str(ALL_VALUES)], jwks, hs256, hub):
        docs = render(*values)
        [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
        if values is hs256:
            [gateway] = [d for d in docs if d["kind"] == "Deployment"
                         and d["metadata"]["name"].endswith("dask-gateway-rs")]
            env = gateway["spec"]["template"]["spec"]["containers"][0]["env"]
            assert {"name": "GATEWAY_JWT_SECRET", "valueFrom": {"secretKeyRef": {
                "name": "jwt-secret", "key": "secret"}}} in env
        if values is hub:
            [gateway] = [d for d in docs if d["kind"] == "Deployment"
                         and d["metadata"]["name"].endswith("dask-gateway-rs")]
            env = gateway["spec"]["template"]["spec"]["containers"][0]["env"]
            assert {"name": "GATEWAY_JUPYTERHUB_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": "hub-token", "key": "api-token"}}} in env
            assert {"name": "GATEWAY_COOKIE_SECRET", "valueFrom": {"secretKeyRef": {
                "name": "sessions", "key": "cookie-secret"}}} in env
            assert "hub-token" not in cm["data"]["gateway.yaml"]
        if ALL_VALUES.name in " ".join(values):
            rendered = yaml.safe_load(cm["data"]["gateway.yaml"])
            assert rendered["cluster"]["warm_schedulers"] == 2
        path = tmp_path / "gateway.yaml"
        path.write_text(cm["data"]["gateway.yaml"])
        r = run(binary, "--config", str(path), "--check-config")
        assert "configuration OK" in r.stdout, values


def test_pods_are_hardened():
    kinds = set()
    for d in render("-f", str(ALL_VALUES)):
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        kinds.add(component)
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            # The gateway's own processes answer health probes; placeholders only wait.
            if component in ("gateway", "controller"):
                assert c["livenessProbe"]["httpGet"]["path"].endswith("/api/health")
    assert {"gateway", "placeholder-scheduler", "placeholder-worker", "image-puller"} <= kinds


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_VALUES)]], ids=["defaults", "all-on"])
def test_everything_the_chart_renders_passes_a_server_side_dry_run(namespace, values):
    # The all-on values name a ServiceMonitor: give the API server its CRD (a stub schema).
    stub = REPO / "tests" / "helm" / "servicemonitor-crd.yaml"
    kubectl("apply", "--server-side", "-f", str(stub))
    kubectl("wait", "--for", "condition=Established", "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com")
    out = helm("template", "dgrs", str(CHART), "--namespace", namespace,
               "--set", f"clusters.namespace={namespace}", *values).stdout
    r = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=out)
    assert "(server dry run)" in r.stdout, r.stdout


# -- a real install -------------------------------------------------------------------------------


def gateway_url(ns, release):
    svc = json.loads(kubectl("get", "svc", "-n", ns, f"{release}-dask-gateway-rs",
                             "-o", "json").stdout)
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


def gateway_pods(ns, release):
    pods = json.loads(kubectl("get", "pods", "-n", ns, "-l",
                              f"app.kubernetes.io/instance={release},app.kubernetes.io/component=gateway",
                              "-o", "json").stdout)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def ready(pod):
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


def routed(url):
    """Whether the Service at `url` reaches a gateway: kube-proxy programs a Service's rules
    a moment after its pods turn ready, and until then refuses connections to it."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def use_a_cluster(url, user, password, workers=1, during=None):
    """The stock client end to end: create, scale, compute, dashboard, shutdown; `during` is
    called while the cluster computes."""
    import urllib.request

    from dask_gateway import BasicAuth, Gateway
    wait_for("the Service to route to a gateway", lambda: routed(url), timeout=60, interval=0.2)
    gw = Gateway(url, auth=BasicAuth(user, password))
    cluster = gw.new_cluster()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cluster.scale(workers)
        client = cluster.get_client(set_as_default=False)
        client.wait_for_workers(workers, timeout=180)
        assert client.submit(sum, [1, 2, 3], pure=False).result(timeout=120) == 6
        if during:
            during()
        page = urllib.request.urlopen(cluster.dashboard_link, timeout=30)
        assert page.status == 200
        client.close()
        return [str(w.message) for w in caught]
    finally:
        cluster.shutdown()
        gw.close()
        gc.collect()


def uninstall(release, namespace, *args):
    """`helm uninstall --wait`, then waits for the release's pods to be gone too: Helm returns
    once the Deployments are deleted, and their pods (a 5 s preStop pause, then the shutdown)
    are removed by garbage collection afterwards. A later test that counts what is left in the
    namespace must not find them."""
    helm("uninstall", release, "-n", namespace, "--wait", *args)
    wait_for(f"the pods of {release} to be gone", lambda: not json.loads(kubectl(
        "get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={release}",
        "-o", "json").stdout)["items"], timeout=90)


def wait_clusters_finished(namespace, instance=None, timeout=120):
    """What docs/install-kubernetes.md asks before an uninstall: every DaskCluster (of
    `instance`, or of the namespace) has finished. Its controller tears a stopping cluster
    down; uninstalled first, it would leave the record Stopping."""
    selector = [] if instance is None else ["-l", f"dask-gateway-rs.io/instance={instance}"]

    def finished():
        items = json.loads(kubectl("get", "daskclusters.dask-gateway-rs.io", "-n", namespace,
                                   *selector, "-o", "json").stdout)["items"]
        return all((o.get("status") or {}).get("phase") in ("Stopped", "Failed")
                   for o in items)

    wait_for(f"the clusters of {instance or namespace} to finish", finished, timeout=timeout)


def fresh_crd():
    """The chart installs the CRD itself, as on a new Kubernetes cluster: one applied by the
    end-to-end harness (kubectl) or kept by an earlier release is removed first (with whatever
    test clusters were left)."""
    kubectl("delete", "crd", "daskclusters.dask-gateway-rs.io", "--ignore-not-found",
            "--wait=true", timeout=180)


def test_a_gateway_without_the_crd_says_how_to_install_it(namespace, tmp_path):
    fresh_crd()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"backend": "kubernetes", "address": "127.0.0.1:0",
                                      "api_url": "http://10.244.0.1:8000/api",
                                      "kubernetes": {"namespace": namespace}}))
    r = run(os.environ["GATEWAY_SERVER_BIN"], "--config", str(config), check=False, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "the DaskCluster CRD (daskclusters.dask-gateway-rs.io) is not installed" in lines[-1]
    assert "crds.install" in lines[-1] and "kubectl apply" in lines[-1], lines[-1]
    # ... and wrote nothing (no session-key Secret, no Lease).
    left = json.loads(kubectl("get", "secrets,leases", "-n", namespace, "-o", "json").stdout)
    assert left["items"] == [], [o["metadata"]["name"] for o in left["items"]]


# The reference dask-gateway's CRD as its chart installs it (same group, kind and version; a
# schema that keeps unknown fields), and one of its cluster objects: a Kubernetes cluster being
# migrated from the reference has both while our chart goes in beside it.
REFERENCE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "daskclusters.gateway.dask.org"},
    "spec": {
        "group": "gateway.dask.org", "scope": "Namespaced",
        "names": {"kind": "DaskCluster", "listKind": "DaskClusterList", "plural": "daskclusters",
                  "singular": "daskcluster"},
        "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                      "subresources": {"status": {}},
                      "schema": {"openAPIV3Schema": {
                          "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}


def reference_state(namespace):
    crd = json.loads(kubectl("get", "crd", "daskclusters.gateway.dask.org", "-o", "json").stdout)
    obj = json.loads(kubectl("get", "daskclusters.gateway.dask.org", "-n", namespace,
                             "their-cluster", "-o", "json").stdout)
    return (crd["metadata"]["uid"], crd["metadata"]["resourceVersion"], crd["spec"],
            obj["metadata"]["uid"], obj["metadata"]["resourceVersion"], obj["spec"])


@pytest.fixture(scope="module")
def reference(namespace):
    kubectl("apply", "-f", "-", input=json.dumps(REFERENCE_CRD))
    kubectl("wait", "--for=condition=Established", "crd/daskclusters.gateway.dask.org",
            "--timeout=60s")
    theirs = {"apiVersion": "gateway.dask.org/v1alpha1", "kind": "DaskCluster",
              "metadata": {"name": "their-cluster", "namespace": namespace},
              "spec": {"scheduler": {"template": {}}, "worker": {"replicas": 2}}}
    kubectl("apply", "-f", "-", input=json.dumps(theirs))
    yield reference_state(namespace)
    kubectl("delete", "crd", "daskclusters.gateway.dask.org", "--ignore-not-found",
            "--wait=true", timeout=180)


@pytest.fixture(scope="module")
def release(namespace, reference):
    name = "dgrs"
    fresh_crd()
    helm("install", name, str(CHART), "-n", namespace, *SMALL,
         "--set", "auth.simple.password=helm-pw", "--wait", "--timeout", "180s")
    yield name
    # (uninstalled by test_uninstall_leaves_only_the_crd; this is the safety net)
    helm("uninstall", name, "-n", namespace, "--wait", check=False)


def test_the_chart_installs_beside_the_reference_and_leaves_its_objects_alone(
        namespace, release, reference):
    # Our CRD is a group of its own; the reference's CRD and cluster object are as they were.
    ours = json.loads(kubectl("get", "crd", "daskclusters.dask-gateway-rs.io", "-o",
                              "json").stdout)
    assert ours["spec"]["group"] == "dask-gateway-rs.io"
    assert reference_state(namespace) == reference
    # Our gateway lists only its own clusters.
    url = gateway_url(namespace, release)
    wait_for("the gateway to answer", lambda: routed(url))
    req = urllib.request.Request(url + "/api/v1/clusters/?status=pending,running,stopping,"
                                 "stopped,failed",
                                 headers={"Authorization": "Basic " + base64.b64encode(
                                     b"ada:helm-pw").decode()})
    listed = json.loads(urllib.request.urlopen(req, timeout=30).read())
    assert not any("their-cluster" in name for name in listed), listed


def container_processes(pod):
    """Host PIDs of every process of the pod's containers (from containerd's task list and
    /proc), without the pod sandbox's pause process."""
    ids = {c["containerID"].split("://", 1)[1] for c in pod["status"]["containerStatuses"]
           if c.get("containerID") and c.get("state", {}).get("running")}
    tasks = run(CTR, "--address", CONTAINERD_SOCK, "-n", "k8s.io", "tasks", "ls").stdout
    roots = [int(line.split()[1]) for line in tasks.splitlines()[1:] if line.split()[0] in ids]
    pids = []
    while roots:
        pid = roots.pop()
        pids.append(pid)
        roots += [int(x) for x in run("pgrep", "-P", str(pid), check=False).stdout.split()]
    return pids


def identity_and_root(pid):
    """(real/effective/saved/fs uids, gids, the root filesystem's mount options) of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    root = next(line.split()[5] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                if line.split()[4] == "/")
    return status["Uid"].split(), status["Gid"].split(), root.split(",")


def test_install_serves_the_stock_client_from_a_pod(namespace, release):
    # Two replicas by default, each the gateway image: one non-root process on a read-only root.
    pods = wait_for("two ready gateway pods", lambda: len(
        ready_pods := [p for p in gateway_pods(namespace, release) if ready(p)]) == 2 and ready_pods)
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == f"{release}-dask-gateway-rs"
        [gateway] = container_processes(pod)
        uids, gids, root = identity_and_root(gateway)
        assert uids == ["65532"] * 4 and gids == ["65532"] * 4, (uids, gids)
        assert "ro" in root
        assert Path(f"/proc/{gateway}/cmdline").read_bytes().split(b"\0")[0] == b"gateway-server"
    # They share the session key the first one made, owned by the controller's Lease.
    key = json.loads(kubectl("get", "secret", "-n", namespace, f"{release}-dask-gateway-rs-session-key",
                             "-o", "json").stdout)
    assert [o["kind"] for o in key["metadata"]["ownerReferences"]] == ["Lease"]
    seen = {}

    def dask_pods_are_non_root():
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l",
                                  "app.kubernetes.io/component in (dask-scheduler,dask-worker)",
                                  "-o", "json").stdout)["items"]
        for p in pods:
            if p["status"].get("phase") == "Running":
                for pid in container_processes(p):
                    seen[pid] = identity_and_root(pid)
        return seen

    # With the chart's defaults the scheduler reads its 0440 key as uid 1000 (fsGroup) and
    # serves TLS; the stock client computes through it.
    assert use_a_cluster(gateway_url(namespace, release), "helm-user", "helm-pw", workers=2,
                         during=dask_pods_are_non_root) == []
    assert len(seen) >= 3, seen  # the scheduler and two workers, each under tini
    for uids, gids, root in seen.values():
        assert uids == ["1000"] * 4 and gids == ["1000"] * 4 and "ro" in root
    # Its pods ran under the chart's labels, owner references and RBAC; nothing is left.
    wait_for("the cluster's pods to go", lambda: not json.loads(kubectl(
        "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=dask-worker",
        "-o", "json").stdout)["items"], timeout=90)


def cpu_millis(q):
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def free_cpu_millis():
    """CPU the node can still give to new pods: allocatable minus the requests of its pods."""
    [node] = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    free = cpu_millis(node["status"]["allocatable"]["cpu"])
    pods = json.loads(kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    for p in pods:
        if p["status"].get("phase") in ("Succeeded", "Failed") or not p["spec"].get("nodeName"):
            continue
        for c in p["spec"]["containers"]:
            free -= cpu_millis(c.get("resources", {}).get("requests", {}).get("cpu", "0"))
    return free


def test_placeholders_fill_a_node_and_a_real_scheduler_preempts_them(namespace, release):
    """Placeholder pods sized like a scheduler hold the node's last CPU; a user's cluster still
    starts at once, its scheduler and worker preempting placeholders (which wait Pending, as a
    node autoscaler would see them)."""
    placeholder = 250  # clusters.scheduler.cores of values-small.yaml, in millicores
    count = free_cpu_millis() // placeholder
    assert count >= 2, "the test node has room for at least two placeholders"
    component = "app.kubernetes.io/component=placeholder-scheduler"
    helm("upgrade", release, str(CHART), "-n", namespace, *SMALL, "--reuse-values",
         "--set", f"capacity.placeholders.schedulers={count}",
         "--set", f"capacity.placeholders.image={os.environ['KUBE_ENV_PAUSE_IMAGE']}",
         "--wait", "--timeout", "180s")
    try:
        def placeholders():
            return json.loads(kubectl("get", "pods", "-n", namespace, "-l", component,
                                      "-o", "json").stdout)["items"]
        wait_for(f"{count} running placeholders", lambda: len(
            [p for p in placeholders() if p["status"].get("phase") == "Running"]) == count)
        assert free_cpu_millis() < placeholder, "the node is full"
        for p in placeholders():
            assert p["spec"]["priority"] < 0 and p["spec"]["securityContext"]["runAsNonRoot"]
        # The stock client end to end on the full node: a scheduler and a worker of 250m each.
        assert use_a_cluster(gateway_url(namespace, release), "placeholder-user", "helm-pw",
                             workers=1) == []
        events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
        preempted = [e for e in json.loads(events)["items"] if e.get("reason") == "Preempted"]
        assert len(preempted) >= 2, "the scheduler and the worker each preempted a placeholder"
        # The Deployment put them back; they wait for room (an autoscaler would add a node).
        assert len(placeholders()) == count
    finally:
        helm("upgrade", release, str(CHART), "-n", namespace, *SMALL, "--reuse-values",
             "--set", "capacity.placeholders.schedulers=0", "--wait", "--timeout", "180s")
    wait_for("the placeholders to go", lambda: not json.loads(kubectl(
        "get", "pods", "-n", namespace, "-l", component, "-o", "json").stdout)["items"])


def test_helm_test_creates_computes_and_deletes(namespace, release):
    r = helm("test", release, "-n", namespace, "--logs", "--timeout", "300s")
    assert "Phase:          Succeeded" in r.stdout, r.stdout
    assert "computed 6" in r.stdout and "deleted; ok" in r.stdout, r.stdout


def test_upgrade_rolls_the_new_configuration(namespace, release):
    import threading
    import urllib.request

    before = {p["metadata"]["name"] for p in gateway_pods(namespace, release)}
    url = gateway_url(namespace, release) + "/api/health"
    answered, refused, stop = [0], [], threading.Event()

    def poll():
        # A user's new connections all through the rollout: each must meet a serving pod.
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    assert r.status == 200
                answered[0] += 1
            except Exception as e:  # noqa: BLE001
                refused.append(f"{time.strftime('%X')}: {e!r}")
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        helm("upgrade", release, str(CHART), "-n", namespace, *SMALL,
             "--set", "auth.simple.password=helm-pw", "--set", "clusters.limits.maxWorkers=1",
             "--wait", "--timeout", "180s")
        wait_for("the gateway pods to be replaced", lambda: [
            p for p in gateway_pods(namespace, release)
            if ready(p) and p["metadata"]["name"] not in before] and not [
            p for p in gateway_pods(namespace, release) if p["metadata"]["name"] in before])
    finally:
        stop.set()
        poller.join()
    assert refused == [] and answered[0] > 20, (answered, refused)
    assert use_a_cluster(gateway_url(namespace, release), "helm-user", "helm-pw") == []
    from dask_gateway import BasicAuth, Gateway
    gw = Gateway(gateway_url(namespace, release), auth=BasicAuth("helm-user", "helm-pw"))
    cluster = gw.new_cluster()
    try:
        with pytest.warns(Warning, match="Scaling to 1 instead"):
            cluster.scale(3)
    finally:
        cluster.shutdown()
        gw.close()


def test_upgrade_updates_the_crd(namespace, release, tmp_path):
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    crd_file = chart / "files" / "daskcluster-crd.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    crd["spec"]["versions"][0]["additionalPrinterColumns"].append(
        {"name": "Upgraded", "type": "string", "jsonPath": ".spec.user", "priority": 1})
    crd_file.write_text(yaml.safe_dump(crd))
    args = [*SMALL, "--set", "auth.simple.password=helm-pw", "--set", "clusters.limits.maxWorkers=1",
            "--wait", "--timeout", "180s"]
    helm("upgrade", release, str(chart), "-n", namespace, *args)
    live = json.loads(kubectl("get", "crd", "daskclusters.dask-gateway-rs.io", "-o", "json").stdout)
    names = [c["name"] for c in live["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert "Upgraded" in names
    helm("upgrade", release, str(CHART), "-n", namespace, *args)
    live = json.loads(kubectl("get", "crd", "daskclusters.dask-gateway-rs.io", "-o", "json").stdout)
    assert "Upgraded" not in [c["name"] for c in live["spec"]["versions"][0]["additionalPrinterColumns"]]


def test_replicas_with_a_separate_controller(namespace):
    name = "split"
    # A second installation in the same Kubernetes cluster: the first one owns the CRD.
    helm("install", name, str(CHART), "-n", namespace, *SMALL, "--set", "crds.install=false",
         "--set", "gateway.replicas=2", "--set", "controller.embedded=false",
         "--set", "clusters.instance=split", "--wait", "--timeout", "180s")
    try:
        wait_for("two ready gateway pods",
                 lambda: len([p for p in gateway_pods(namespace, name) if ready(p)]) == 2)
        controllers = json.loads(kubectl(
            "get", "pods", "-n", namespace, "-l",
            f"app.kubernetes.io/instance={name},app.kubernetes.io/component=controller",
            "-o", "json").stdout)["items"]
        assert len(controllers) == 1
        use_a_cluster(gateway_url(namespace, name), "split-user", "", workers=1)
    finally:
        try:
            wait_clusters_finished(namespace, "split")
        finally:
            uninstall(name, namespace)


def test_uninstall_removes_the_warm_pool_but_not_claimed_clusters(namespace):
    """`helm uninstall` removes the gateway's rights before its pods stop, so the gateway
    cannot stop its warm schedulers then; they hang on the installation's Lease instead and
    go with it (garbage collection). A member a user claimed is the user's: it stays."""
    name = "pooled"
    helm("install", name, str(CHART), "-n", namespace, *SMALL, "--set", "crds.install=false",
         "--set", "clusters.instance=pooled", "--set", "clusters.warmSchedulers=1",
         "--wait", "--timeout", "180s")
    pool_label = "dask-gateway-rs.io/pool"

    def clusters():
        return json.loads(kubectl("get", "daskclusters.dask-gateway-rs.io", "-n", namespace,
                                  "-l", "dask-gateway-rs.io/instance=pooled",
                                  "-o", "json").stdout)["items"]

    def members():
        return [o for o in clusters() if pool_label in o["metadata"].get("labels", {})]

    try:
        wait_for("a warm scheduler", lambda: members(), timeout=120)
        # Claimed by the first create (the defaults fit the pool), used and stopped.
        use_a_cluster(gateway_url(namespace, name), "pool-user", "", workers=1)
        claimed = [o["metadata"]["name"] for o in clusters()
                   if o["spec"].get("user") == "pool-user"]
        assert claimed, clusters()
        wait_for("the pool to refill", lambda: members(), timeout=120)
    finally:
        uninstall(name, namespace)
    wait_for("the warm schedulers to go with the installation", lambda: not members(),
             timeout=90)
    wait_for("their pods to go too", lambda: not json.loads(kubectl(
        "get", "pods", "-n", namespace, "-l", "dask-gateway-rs.io/instance=pooled",
        "-o", "json").stdout)["items"], timeout=90)
    left = [o["metadata"]["name"] for o in clusters()]
    assert set(claimed) <= set(left), (claimed, left)


def test_uninstall_leaves_only_the_crd_and_finished_cluster_records(namespace, release):
    # The documented order: the clusters have finished (the tests stopped theirs), then the
    # uninstall.
    wait_clusters_finished(namespace)
    uninstall(release, namespace, "--timeout", "120s")
    def ours():
        left = json.loads(kubectl("get", "all,configmaps,secrets,serviceaccounts,roles,"
                                  "rolebindings,leases,poddisruptionbudgets,"
                                  "daskclusters.dask-gateway-rs.io",
                                  "-n", namespace, "-o", "json").stdout)["items"]
        return [o for o in left if o["metadata"]["name"] not in ("kube-root-ca.crt", "default")]

    # The session key the gateway made goes with the Lease that owns it (garbage collection).
    wait_for("the session key to be collected", lambda: not [
        o for o in ours() if o["metadata"]["name"].endswith("-session-key")], timeout=60)
    ours = ours()
    # What docs/install-kubernetes.md says stays: the records of finished clusters (no pods,
    # Services or Secrets; `kubectl delete daskclusters --all` removes them) ...
    records = [o for o in ours if o["kind"] == "DaskCluster"]
    assert all(o["status"]["phase"] in ("Stopped", "Failed") for o in records), records
    rest = [f"{o['kind']}/{o['metadata']['name']}" for o in ours if o["kind"] != "DaskCluster"]
    assert rest == [], rest
    # The CRD stays (resource-policy: keep), so clusters survive a reinstall.
    kubectl("get", "crd", "daskclusters.dask-gateway-rs.io")
