"""The Kubernetes backend as Kubernetes sees it: the objects a cluster is made of, how they are
cleaned up, what the controller does when pods disappear or fail, the CRD's schema, pod
templates and profiles, and two gateway replicas sharing one namespace.

Runs with E2E_BACKEND=kubernetes (tests/run does), against tests/kube-env.
"""

import os
import re
import signal
import socket
import threading

import pytest
from dask_gateway import GatewayClusterError

from conftest import KubeEnv, connect, new_cluster, wait_for, wait_status, wait_workers

pytestmark = pytest.mark.kube_only

USER = "kube user@example.org"  # not a valid label value: must be made safe, never used raw


@pytest.fixture(scope="module")
def server(module_servers):
    # Requests as the settings name them (no SMALL_CPU_REQUEST), sized to fit a 2-CPU node.
    return module_servers(
        "kube",
        kube_exact_requests=True,
        cluster={
            "heartbeat_period": 2,
            "scheduler_cores": 0.25,
            "options": [
                {"field": "worker_cores", "type": "float", "default": 0.25, "min": 0.1,
                 "max": 1, "target": "worker_cores"},
                {"field": "threads", "type": "int", "default": 1, "min": 1, "max": 4,
                 "target": "worker_threads"},
                {"field": "profile", "type": "select", "default": "standard",
                 "options": ["standard", {"key": "tagged", "value": "tagged"}],
                 "target": "profile"},
            ],
        },
        kubernetes={
            "worker": {"labels": {"pool": "workers"},
                       "annotations": {"example.org/owner-team": "data"}},
            "profiles": {
                "tagged": {
                    "worker": {
                        "labels": {"tier": "tagged"},
                        "nodeSelector": {"kubernetes.io/hostname": "dgrs-node"},
                        "env": [{"name": "PROFILE_MARK", "value": "tagged"}],
                    },
                },
            },
        },
    )


def compute(cluster, n):
    with cluster.get_client(set_as_default=False) as client:
        wait_workers(client, n, timeout=120)
        assert client.submit(lambda x: x * 3, 7, pure=False).result(timeout=60) == 21


def object_id(name):
    return name.rsplit(".", 1)[-1]


def pods(server, name, component=None):
    items = server.kube_objects("pods", name)
    if component:
        items = [p for p in items
                 if p["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return items


def daskcluster(server, name):
    return KubeEnv.get().get_json("daskcluster", "-n", server.namespace, object_id(name))


def children(server, name):
    return {kind: [o["metadata"]["name"] for o in server.kube_objects(kind, name)]
            for kind in ("pods", "secrets", "services")}


def test_a_cluster_is_a_daskcluster_with_owned_children_all_removed_on_shutdown(server):
    gw = server.gateway(USER)
    c = new_cluster(gw)
    name = c.name
    assert re.fullmatch(rf"{server.namespace}\.[0-9a-f]{{32}}", name)
    c.scale(2)
    compute(c, 2)

    dc = daskcluster(server, name)
    assert dc["spec"]["user"] == USER
    assert dc["metadata"]["annotations"]["dask-gateway-rs.io/user"] == USER
    label = dc["metadata"]["labels"]["dask-gateway-rs.io/user"]
    assert label != USER and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", label)
    assert dc["spec"]["replicas"] == 2
    st = dc["status"]
    assert st["phase"] == "Running"
    assert st["addresses"]["scheduler"].startswith("tls://10.244.0.")
    # Workers are ready once their readiness probe passes (it may trail their joining).
    wait_for(lambda: {c["type"]: c["status"] for c in daskcluster(server, name)["status"][
        "conditions"]} == {"SchedulerReady": "True", "WorkersReady": "True"},
        30, what="both conditions True")

    objs = children(server, name)
    oid = object_id(name)
    assert objs["secrets"] == [f"dask-credentials-{oid}"]
    assert objs["services"] == [f"dask-{oid}"]
    assert f"dask-scheduler-{oid}" in objs["pods"]
    workers = pods(server, name, "dask-worker")
    assert len(workers) == 2
    uid = dc["metadata"]["uid"]
    for kind in ("pods", "secrets", "services"):
        for o in server.kube_objects(kind, name):
            owners = o["metadata"]["ownerReferences"]
            assert [(r["kind"], r["uid"], r.get("controller")) for r in owners] == [
                ("DaskCluster", uid, True)], (kind, o["metadata"]["name"])
            assert o["metadata"]["labels"]["dask-gateway-rs.io/instance"] == "e2e"
    w = workers[0]
    assert w["metadata"]["labels"]["pool"] == "workers"
    assert w["metadata"]["annotations"]["example.org/owner-team"] == "data"
    container = w["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"] == "250m"
    env = {e["name"] for e in container["env"]}
    assert "DASK_GATEWAY_API_TOKEN" not in env, "workers never get the cluster's API token"
    # The printer columns show user, status and workers.
    table = KubeEnv.get().kubectl("get", "daskclusters", "-n", server.namespace).stdout
    assert "USER" in table and "STATUS" in table and "WORKERS" in table and "Running" in table

    c.shutdown()
    wait_for(lambda: children(server, name) == {"pods": [], "secrets": [], "services": []},
             60, what="every pod, Secret and Service of the cluster to be gone")
    dc = daskcluster(server, name)
    assert dc["status"]["phase"] == "Stopped"
    assert dc["status"]["completionTime"]
    assert gw.get_cluster(name).status.name == "STOPPED"


def test_a_deleted_worker_pod_is_replaced(server):
    gw = server.gateway(USER)
    c = new_cluster(gw)
    try:
        c.scale(1)
        compute(c, 1)
        [old] = pods(server, c.name, "dask-worker")
        KubeEnv.get().kubectl("delete", "pod", "-n", server.namespace,
                              old["metadata"]["name"], "--wait=false")
        wait_for(lambda: [p["metadata"]["name"] for p in pods(server, c.name, "dask-worker")
                          if p["metadata"]["name"] != old["metadata"]["name"]],
                 60, what="a replacement worker pod")
        compute(c, 1)
    finally:
        c.shutdown()


def test_a_killed_worker_process_is_replaced(server):
    gw = server.gateway(USER)
    c = new_cluster(gw)
    try:
        c.scale(1)
        compute(c, 1)
        [proc] = [p for p in server.cluster_processes(c.name, "worker")
                  if "dask-worker" in " ".join(p.cmdline()) or "worker" in p.cmdline()]
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: any(p["status"].get("phase") == "Running"
                             for p in pods(server, c.name, "dask-worker")
                             if not p["metadata"].get("deletionTimestamp")) and
                 all(p["status"].get("phase") != "Failed" for p in pods(server, c.name, "dask-worker")),
                 90, what="the failed worker pod to be replaced")
        compute(c, 1)
        assert gw.get_cluster(c.name).status.name == "RUNNING"
    finally:
        c.shutdown()


def root_is_read_only(pid):
    """Whether the root filesystem of the process's mount namespace is mounted read-only."""
    for line in open(f"/proc/{pid}/mountinfo"):
        fields = line.split()
        if fields[4] == "/":
            root = fields[5].split(",")
    return "ro" in root


def test_dask_pods_run_as_the_image_user_with_a_read_only_root(server):
    # The default pod security context: uid/gid 1000 (the Dask image's user), an fsGroup that
    # makes the 0440 credentials readable, a read-only root filesystem and a writable /tmp.
    gw = server.gateway(USER)
    c = new_cluster(gw)
    try:
        c.scale(1)
        compute(c, 1)  # the scheduler read its TLS key and serves TLS; the worker too
        for component in ("dask-scheduler", "dask-worker"):
            [pod] = pods(server, c.name, component)
            sc = pod["spec"]["securityContext"]
            assert (sc["runAsNonRoot"], sc["runAsUser"], sc["fsGroup"]) == (True, 1000, 1000)
            csc = pod["spec"]["containers"][0]["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True and csc["capabilities"] == {"drop": ["ALL"]}
        procs = server.cluster_processes(c.name)
        assert {"scheduler", "worker"} <= {
            "scheduler" if "scheduler" in p.cmdline() else "worker" for p in procs}
        for p in procs:
            assert p.uids().real == p.uids().effective == 1000, p.cmdline()
            assert p.gids().real == 1000, p.cmdline()
            assert root_is_read_only(p.pid), p.cmdline()
            # The image's entrypoint moved HOME to the writable /tmp.
            assert p.environ()["HOME"] == "/tmp/home", p.cmdline()
    finally:
        c.shutdown()


def test_a_worker_over_its_memory_limit_is_oom_killed_replaced_and_reported(server):
    from distributed import KilledWorker

    gw = server.gateway(USER)
    c = new_cluster(gw)
    try:
        c.scale(1)
        compute(c, 1)
        [first] = pods(server, c.name, "dask-worker")
        limit_bytes = int(first["spec"]["containers"][0]["resources"]["limits"]["memory"])

        def hog():
            block = bytearray(2 * 1024**3)
            block[::4096] = b"x" * len(block[::4096])
            return len(block)

        # The kernel kills each worker that runs it; Dask gives up on the task after its
        # allowed failures, and every killed worker pod is replaced meanwhile.
        with c.get_client(set_as_default=False) as client:
            with pytest.raises(KilledWorker):
                client.submit(hog, pure=False).result(timeout=240)
        # The controller learns of the kill from the pod's status, a moment after Dask does.
        failure = wait_for(lambda: daskcluster(server, c.name)["status"].get("lastWorkerFailure"),
                           60, what="the DaskCluster to report the worker's end")
        status = daskcluster(server, c.name)["status"]
        assert failure["reason"] == "OOMKilled" and failure["exitCode"] == 137, failure
        assert failure["pod"].startswith(f"dask-worker-{object_id(c.name)}-"), failure
        assert (f"was killed for exceeding its memory limit of {limit_bytes / 2**20:.2f} MiB"
                in failure["message"]), failure
        # Workers that died at work are not start failures: the cluster runs on.
        assert status["workerFailures"] == 0, status
        assert first["metadata"]["name"] not in [
            p["metadata"]["name"] for p in pods(server, c.name, "dask-worker")]
        compute(c, 1)
        assert gw.get_cluster(c.name).status.name == "RUNNING"
    finally:
        c.shutdown()


def test_a_killed_scheduler_fails_the_cluster_with_its_reason_and_cleans_up(server):
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.scale(1)
    compute(c, 1)
    c.close()
    [sched] = server.cluster_processes(name, "scheduler")
    os.kill(sched.pid, signal.SIGKILL)
    assert wait_status(gw, name, ("FAILED", "STOPPED"), timeout=90) == "FAILED"
    reason = daskcluster(server, name)["status"]["reason"]
    assert "the scheduler exited (exit code 137" in reason, reason
    assert gw.get_cluster(name).stop_time is not None
    wait_for(lambda: children(server, name) == {"pods": [], "secrets": [], "services": []},
             60, what="the failed cluster's objects to be removed")


@pytest.mark.parametrize("change, message", [
    ({"replicas": -1}, "spec.replicas"),
    ({"replicas": "two"}, "spec.replicas"),
    ({"user": None}, "spec.user"),
    ({"runtime": {"image": "x"}}, "spec.runtime"),
    ({"settings": {"worker_threads": "many"}}, "spec.settings"),
])
def test_invalid_daskclusters_are_refused_by_the_schema(server, change, message):
    spec = {
        "user": "alice", "options": {},
        "settings": {"resources": {"scheduler_cores": 1, "scheduler_memory": 1, "worker_cores": 1,
                                   "worker_memory": 1},
                     "worker_threads": 1, "limits": {}, "idle_timeout": 0},
        "runtime": {"image": "x", "apiUrl": "http://x/api", "heartbeatPeriod": 1,
                    "adaptivePeriod": 1, "startTimeout": 1, "workerFailureLimit": 1,
                    "terminationGracePeriodSeconds": 1},
        "replicas": 0,
    }
    for k, v in change.items():
        if v is None:
            spec.pop(k)
        elif isinstance(v, dict) and k != "runtime":
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    doc = {"apiVersion": "dask-gateway-rs.io/v1alpha1", "kind": "DaskCluster",
           "metadata": {"name": "invalid-" + os.urandom(4).hex(), "namespace": server.namespace},
           "spec": spec}
    import json
    r = KubeEnv.get().kubectl("create", "-f", "-", input=json.dumps(doc), check=False)
    assert r.returncode != 0, "an invalid DaskCluster was accepted"
    assert "Invalid" in r.stderr or "invalid" in r.stderr, r.stderr
    assert message in r.stderr, r.stderr


def test_profiles_and_options_shape_the_pods(server):
    gw = server.gateway(USER)
    c = new_cluster(gw, worker_cores=0.5, threads=2, profile="tagged")
    try:
        c.scale(1)
        compute(c, 1)
        [w] = pods(server, c.name, "dask-worker")
        assert w["metadata"]["labels"]["tier"] == "tagged"
        assert w["metadata"]["labels"]["pool"] == "workers"
        assert w["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "dgrs-node"}
        container = w["spec"]["containers"][0]
        assert container["resources"]["requests"]["cpu"] == "500m"
        assert {"name": "PROFILE_MARK", "value": "tagged"} in container["env"]
        args = container["args"]
        assert args[args.index("--nthreads") + 1] == "2"
    finally:
        c.shutdown()


def test_an_unschedulable_scheduler_fails_with_the_reason(module_servers):
    srv = module_servers(
        "unschedulable",
        cluster={"start_timeout": 6},
        kubernetes={"scheduler": {"nodeSelector": {"no-such-node": "true"}}},
    )
    gw = srv.gateway(USER)
    with pytest.raises(GatewayClusterError, match="failed to start"):
        new_cluster(gw, timeout=90)
    [c] = gw.list_clusters(status="failed")
    reason = daskcluster(srv, c.name)["status"]["reason"]
    assert "did not become ready within 6 s" in reason and "Unschedulable" in reason, reason
    left = {}

    def all_removed():
        left.update(children(srv, c.name))
        return left == {"pods": [], "secrets": [], "services": []}

    try:
        wait_for(all_removed, 60, what="the failed cluster's objects to be removed")
    except AssertionError as e:
        raise AssertionError(f"{e}; still there: {left}") from None


def test_two_gateway_replicas_share_a_namespace(module_servers):
    a = module_servers("replica-a", cluster={"heartbeat_period": 2})
    b = module_servers("replica-b", cluster={"heartbeat_period": 2},
                       kube_namespace=a.namespace, kube_kubeconfig=a.kubeconfig)

    def leading(srv):
        text = srv.http("GET", "/metrics").body.decode()
        return "dask_gateway_controller_leading 1" in text

    wait_for(lambda: leading(a) != leading(b), 30, what="exactly one controller to lead")
    leader, follower = (a, b) if leading(a) else (b, a)
    g_leader, g_follower = leader.gateway(USER), follower.gateway(USER)
    # Created through one replica (whose address the scheduler's heartbeats use, as a shared
    # Service would be in a real deployment), used through the other: same DaskCluster objects.
    c = new_cluster(g_follower, shutdown_on_close=False)
    name = c.name
    c.close()
    wait_for(lambda: [x.name for x in g_leader.list_clusters()] == [name], 30,
             what="the other replica to list the cluster")
    cl = connect(g_leader, name)
    cl.scale(1)
    compute(cl, 1)
    cl.close()
    # The leader dies: the other replica takes over the controller and keeps serving.
    leader.kill9()
    wait_for(lambda: leading(follower), 40, what="the surviving replica to take over the controller")
    c2 = connect(g_follower, name)
    c2.scale(2)
    compute(c2, 2)
    c2.close()
    g_follower.stop_cluster(name)
    wait_status(g_follower, name, "STOPPED", timeout=60)
    wait_for(lambda: children(follower, name) == {"pods": [], "secrets": [], "services": []},
             60, what="the stopped cluster's objects to be removed")
    leader.start()  # so the fixture can shut it down cleanly


def test_the_next_request_after_a_create_finds_the_cluster_on_the_other_replica(module_servers):
    """Behind something that spreads requests over the replicas (an Ingress does, per request),
    a create answered by one replica may be followed at once by a request to the other, whose
    watch has not brought the new DaskCluster yet. It must find the cluster: no 404 for its
    owner, a 403 for anyone else, and a stop that is carried out, not dropped. Here the watch
    mostly wins that race; the unit test `a_cluster_another_replica_just_created_is_read_kept_
    and_can_be_stopped` (backend_tests.rs) pins the case where it has not."""
    import json

    a = module_servers("fresh-a")
    b = module_servers("fresh-b", kube_namespace=a.namespace, kube_kubeconfig=a.kubeconfig)
    owner = "fresh owner"
    names = []
    for _ in range(10):
        created = a.http("POST", "/api/v1/clusters/", user=owner, body={"cluster_options": {}})
        assert created.status == 201, created.body
        name = json.loads(created.body)["name"]
        names.append(name)
        got = b.http("GET", f"/api/v1/clusters/{name}", user=owner)
        assert got.status == 200, got.body
        assert json.loads(got.body)["name"] == name
        stranger = b.http("GET", f"/api/v1/clusters/{name}", user="fresh stranger")
        assert stranger.status == 403, stranger.body
        stopped = b.http("DELETE", f"/api/v1/clusters/{name}", user=owner)
        assert stopped.status == 204, stopped.body
    gw = a.gateway(owner)
    for name in names:
        wait_status(gw, name, "STOPPED", timeout=90)
    for name in names:
        wait_for(lambda: children(a, name) == {"pods": [], "secrets": [], "services": []},
                 60, what="the stopped cluster's objects to be removed")


def test_a_starting_cluster_takes_turns_with_a_scale_up_at_the_write_budget(module_servers):
    """The controller's writes share one budget (`api_qps`); while writes wait, the clusters take
    turns at it. A cluster created just after another asked for 24 workers gets its scheduler pod
    while most of those workers' pods are still to come; served first come, first served, it got
    it after all of them. The budget is 4 writes per second here, so the scale-up queues 6 s of
    writes (pods' creation times are whole seconds). The worker pods only sleep."""
    import json

    srv = module_servers(
        "turns",
        cluster={"heartbeat_period": 2, "worker_memory": "128M"},
        kubernetes={
            "api_qps": 4,
            "api_burst": 1,
            "worker": {
                "resources": {"requests": {"cpu": "10m"}},
                "extraContainerConfig": {"command": ["sh", "-c", "exec sleep infinity", "--"],
                                         "readinessProbe": None},
            },
        },
    )
    busy, newcomer = "turns busy", "turns newcomer"
    a = new_cluster(srv.gateway(busy), shutdown_on_close=False).name
    scaled = srv.http("POST", f"/api/v1/clusters/{a}/scale", user=busy, body={"count": 24})
    assert scaled.status == 200, scaled.body
    created = srv.http("POST", "/api/v1/clusters/", user=newcomer, body={"cluster_options": {}})
    assert created.status == 201, created.body
    b = json.loads(created.body)["name"]
    wait_for(lambda: len(pods(srv, a, "dask-worker")) >= 24 and pods(srv, b, "dask-scheduler"),
             120, what="the 24 worker pods and the newcomer's scheduler pod")
    [scheduler] = pods(srv, b, "dask-scheduler")
    at = scheduler["metadata"]["creationTimestamp"]
    later = [p["metadata"]["name"] for p in pods(srv, a, "dask-worker")
             if p["metadata"]["creationTimestamp"] > at]
    assert len(later) >= 8, (f"only {len(later)} of the 24 worker pods were created after the "
                             f"newcomer's scheduler pod ({at})")
    for user, name in ((busy, a), (newcomer, b)):
        stopped = srv.http("DELETE", f"/api/v1/clusters/{name}", user=user)
        assert stopped.status == 204, stopped.body
    for user, name in ((busy, a), (newcomer, b)):
        wait_status(srv.gateway(user), name, "STOPPED", timeout=90)


class Forwarder:
    """A TCP forwarder from a free port on 127.0.0.1 to `target` (host, port): nothing listens
    there until `start()`, and `close()` stops taking connections."""

    def __init__(self, target):
        from conftest import free_port

        self.target = target
        self.port = free_port()
        self.listener = None

    def start(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                far = socket.create_connection(self.target, timeout=10)
                far.settimeout(None)
            except OSError:
                near.close()  # the client sees the connection fail, and the forwarder goes on
                continue
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        if self.listener is not None:
            self.listener.close()


def test_the_controller_can_run_on_its_own(module_servers):
    """`gateway-server controller` reconciles for a gateway that runs none itself; started
    while the API server cannot be reached, it waits that out instead of giving up."""
    import subprocess
    from urllib.parse import urlsplit

    import yaml

    from conftest import free_port, server_binary

    srv = module_servers("split", kubernetes={"controller": False})
    gw = srv.gateway(USER)
    c = gw.submit()
    # Nobody reconciles yet: the cluster waits in PENDING, polled throughout.
    from conftest import holds
    holds(lambda: gw.get_cluster(c).status.name == "PENDING", 3,
          what="PENDING while no controller runs")
    config = dict(srv.config)
    config["address"] = f"127.0.0.1:{free_port()}"
    config["kubernetes"] = {**config["kubernetes"], "controller": True}
    path = srv.base_dir / "controller.yaml"
    path.write_text(yaml.safe_dump(config))
    # The controller reaches the API server through a forwarder that is not there yet.
    kubeconfig = yaml.safe_load(open(srv.kubeconfig))
    api = urlsplit(kubeconfig["clusters"][0]["cluster"]["server"])
    forwarder = Forwarder((api.hostname, api.port))
    for entry in kubeconfig["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{forwarder.port}"
    unreachable = srv.base_dir / "controller.kubeconfig"
    unreachable.write_text(yaml.safe_dump(kubeconfig))
    log_path = srv.base_dir / "controller.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen([str(server_binary()), "controller", "--config", str(path)],
                            env={**os.environ, "KUBECONFIG": str(unreachable)},
                            stdout=log, stderr=log)
    try:
        wait_for(lambda: b"cannot start yet" in log_path.read_bytes(), 30,
                 what="the controller to report the unreachable API server")
        assert proc.poll() is None, "the controller gave up on an unreachable API server"
        forwarder.start()
        cluster = connect(gw, c)
        cluster.scale(1)
        compute(cluster, 1)
        metrics = wait_for(lambda: (r := srv.http("GET", "/metrics")).status == 200 and r, 10)
        assert "dask_gateway_controller_leading" not in metrics.body.decode()
        import urllib.request
        text = urllib.request.urlopen(f"http://{config['address']}/metrics", timeout=10).read()
        assert b"dask_gateway_controller_leading 1" in text
        cluster.shutdown()
        wait_for(lambda: children(srv, c) == {"pods": [], "secrets": [], "services": []},
                 60, what="the cluster's objects to be removed")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        forwarder.close()


def test_a_restarted_gateway_takes_over_where_the_last_one_stopped(module_servers):
    """Clusters in every state when the gateway dies: a new gateway's controller carries on
    (its caches are complete before it acts, so nothing is created twice)."""
    srv = module_servers("takeover", cluster={"heartbeat_period": 2})
    gw = srv.gateway(USER)
    running = new_cluster(gw, shutdown_on_close=False)
    running.scale(2)
    compute(running, 2)
    to_stop = new_cluster(gw, shutdown_on_close=False)
    to_stop.scale(1)
    compute(to_stop, 1)
    names = (running.name, to_stop.name)
    running.close()
    to_stop.close()
    srv.kill9()
    # While no controller runs: a stop is asked for, and a worker pod disappears.
    KubeEnv.get().kubectl("patch", "daskcluster", "-n", srv.namespace, object_id(names[1]),
                          "--type=merge", "-p", '{"spec": {"active": false}}')
    [victim, _] = pods(srv, names[0], "dask-worker")
    KubeEnv.get().kubectl("delete", "pod", "-n", srv.namespace, victim["metadata"]["name"],
                          "--wait=false")
    srv.start()
    gw2 = srv.gateway(USER)
    wait_status(gw2, names[1], "STOPPED", timeout=90)
    wait_for(lambda: children(srv, names[1]) == {"pods": [], "secrets": [], "services": []},
             60, what="the stopped cluster's objects to be removed")
    c = connect(gw2, names[0])
    compute(c, 2)  # the lost worker was replaced
    assert len(pods(srv, names[0], "dask-worker")) == 2, "no duplicate workers"
    c.shutdown()


def test_replicas_share_per_user_quotas(module_servers):
    """Two replicas deciding for one user at once (a Lease per user, grants recorded on the
    DaskClusters): 20 concurrent scale-ups through both never give the user more workers
    than the quota."""
    import concurrent.futures
    import time

    quota = {"heartbeat_period": 2, "max_workers_per_user": 3}
    a = module_servers("quota-a", cluster=quota)
    b = module_servers("quota-b", cluster=quota, kube_namespace=a.namespace,
                       kube_kubeconfig=a.kubeconfig)
    user = "quota-user"
    names = [new_cluster(a.gateway(user), shutdown_on_close=False).name,
             new_cluster(b.gateway(user), shutdown_on_close=False).name]
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(srv.http, "POST", f"/api/v1/clusters/{names[i % 2]}/scale",
                                   user=user, body={"count": 3})
                       for i, srv in enumerate([a, b] * 10)]
            answers = [f.result() for f in futures]
        assert all(r.status == 200 for r in answers), [r for r in answers if r.status != 200]
        assert any("quota of 3 workers per user" in (r.json().get("msg") or "") for r in answers)
        # What the controller is told to run, sampled while the schedulers heartbeat.
        peak, deadline = 0, time.monotonic() + 15
        while time.monotonic() < deadline:
            peak = max(peak, sum(daskcluster(a, n)["spec"]["replicas"] for n in names))
            time.sleep(0.5)
        assert 0 < peak <= 3, peak
        # The Leases are gone once the decisions are made.
        leases = KubeEnv.get().get_json("leases", "-n", a.namespace)["items"]
        assert not [x for x in leases if x["metadata"]["name"].startswith("dgrs-quota-")], leases
    finally:
        for n in names:
            a.gateway(user).stop_cluster(n)


def test_finished_clusters_leave_the_caches_and_are_read_on_demand(server):
    """Thirty seconds after it finished, a DaskCluster is labelled finished: it leaves the
    gateway's watch cache (a busy day's clusters would otherwise stay in memory for the whole
    retention) and the API still lists it and answers for it, from the API server."""
    gw = server.gateway(USER)
    cluster = new_cluster(gw, shutdown_on_close=False)
    name = cluster.name
    oid = name.rsplit(".", 1)[-1]
    cluster.shutdown()
    wait_status(gw, name, "STOPPED", timeout=90)

    def labelled():
        obj = KubeEnv.get().get_json("daskcluster", "-n", server.namespace, oid)
        return obj["metadata"].get("labels", {}).get("dask-gateway-rs.io/finished") == "true"

    wait_for(labelled, 90, what="the finished label")

    def cached():
        text = server.http("GET", "/metrics").body.decode()
        return int(re.search(r'kube_cached_objects\{kind="daskcluster"\} (\d+)', text).group(1))

    # The cache holds exactly the DaskClusters that are not labelled finished.
    def unlabelled():
        items = KubeEnv.get().get_json("daskclusters", "-n", server.namespace)["items"]
        return sum("dask-gateway-rs.io/finished" not in i["metadata"].get("labels", {})
                   for i in items)

    # (ours is labelled, so it is not there)
    wait_for(lambda: cached() == unlabelled(), 30, what="the cache to hold the unlabelled only")
    # Still there for its user: by name, in listings of finished clusters, with its details.
    assert gw.get_cluster(name).status.name == "STOPPED"
    assert name in [c.name for c in gw.list_clusters(status="stopped")]
    r = server.http("GET", f"/api/v1/clusters/{name}/details", user=USER)
    assert r.status == 200 and r.json()["status"] == "STOPPED", r
    # ... and nobody else's.
    assert server.http("GET", f"/api/v1/clusters/{name}", user="someone else").status == 403
    assert name not in [c.name for c in server.gateway("someone else").list_clusters(
        status="stopped")]
    # Scaling it says it is not running, as for any stopped cluster.
    r = server.http("POST", f"/api/v1/clusters/{name}/scale", user=USER, body={"count": 1})
    assert r.status == 409, r
    gw.close()



def test_a_deleted_service_is_made_again_and_a_deleted_secret_fails_the_cluster(server):
    gw = server.gateway(USER)
    c = new_cluster(gw)
    try:
        c.scale(1)
        compute(c, 1)
        oid = object_id(c.name)
        kube = KubeEnv.get()
        # The Service holds nothing of its own: it is made again, and new clients connect.
        kube.kubectl("delete", "service", "-n", server.namespace, f"dask-{oid}")
        wait_for(lambda: children(server, c.name)["services"] == [f"dask-{oid}"], 30,
                 what="the Service made again")
        compute(gw.connect(c.name), 1)
        # The Secret holds the certificate the running scheduler trusts: new credentials
        # would leave a RUNNING cluster no client can reach. It fails, saying why.
        kube.kubectl("delete", "secret", "-n", server.namespace, f"dask-credentials-{oid}")
        wait_status(gw, c.name, "FAILED", 60)
        dc = daskcluster(server, c.name)
        assert dc["status"]["reason"] == (
            "the cluster's credentials Secret was deleted while its scheduler used it")
        wait_for(lambda: children(server, c.name) == {"pods": [], "secrets": [],
                                                       "services": []},
                 60, what="the failed cluster's pods, Secret and Service to be gone")
        with pytest.raises(GatewayClusterError):
            gw.connect(c.name)
    finally:
        c.shutdown()



def test_a_deleted_scheduler_pod_or_daskcluster_ends_the_cluster_and_says_so(server):
    gw = server.gateway(USER)
    kube = KubeEnv.get()
    c = new_cluster(gw)
    c.scale(1)
    compute(c, 1)
    kube.kubectl("delete", "pod", "-n", server.namespace,
                 f"dask-scheduler-{object_id(c.name)}", "--wait=false")
    wait_status(gw, c.name, "FAILED", 60)
    reason = daskcluster(server, c.name)["status"]["reason"]
    # Deleted by someone: its container got SIGTERM and ended "Completed", which alone would
    # read as if the scheduler had chosen to stop.
    assert reason.startswith("the scheduler pod was deleted; it exited (exit code "), reason
    wait_for(lambda: children(server, c.name) == {"pods": [], "secrets": [], "services": []},
             60, what="the failed cluster's children to be gone")

    # An admin deletes a running DaskCluster: its children go with it (owner references), and
    # the owner is told it is gone.
    c2 = new_cluster(gw)
    c2.scale(1)
    compute(c2, 1)
    kube.kubectl("delete", "daskcluster", "-n", server.namespace, object_id(c2.name))
    wait_for(lambda: children(server, c2.name) == {"pods": [], "secrets": [], "services": []},
             60, what="the deleted DaskCluster's children to be gone")
    assert c2.name not in [x.name for x in gw.list_clusters()]
    with pytest.raises(ValueError, match="not found"):
        gw.connect(c2.name)
    c2.shutdown()  # stopping what is gone is fine
