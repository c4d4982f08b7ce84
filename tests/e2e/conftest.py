"""Shared fixtures for the end-to-end suite.

Every test talks to a real `gateway-server` process started from a generated YAML config in a
temporary directory, and drives it with the stock `dask_gateway` client (or raw HTTP/TLS where
the client cannot express a check).

- `GatewayServer` starts/stops/restarts one server and knows how to clean up after it: it stops
  every cluster it saw through the API, terminates the server, then kills any process left that
  refers to its data directory (the server's default is to leave clusters running).
- The server's stderr goes to `<tmp>/server.log`; for every test the part written during the
  test is copied to `tests/e2e/logs/<test>.<server>.log`, and its tail is attached to the report
  of a failing test.
- `E2E_BACKEND=kubernetes` runs the same tests on the Kubernetes backend: the cluster of
  `tests/kube-env` (started by `KubeEnv`: real kubelet, containerd and runc), one namespace per
  server with the least-privilege RBAC the Helm chart ships (from
  `manifests/dask-gateway-rs.yaml`), and the gateway running on the host under that
  ServiceAccount's kubeconfig. Pods run the Dask image `images/build` makes, imported into the
  cluster's containerd, as its non-root user. A container's processes are processes of this
  machine too, so the process probes below work on both backends (pods carry `E2E_NAMESPACE` in
  their environment). Tests marked `local_only` or `kube_only` run on one backend.
- `E2E_BACKEND=helm` installs each server as a release of the Helm chart (`HelmServer`): the
  gateway runs as a pod of tests/kube-env from the gateway image `images/build` makes,
  configured only through chart values, and is reached on its Service's node port at the
  node's address (routed by kube-proxy, as a user's load balancer would). Tests that kill or restart the gateway process
  (`process_control`) do not run there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import errno
import gc
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from base64 import b64encode
from pathlib import Path

import psutil
import pytest
import yaml

import dask_gateway
from dask_gateway import BasicAuth, Gateway
from ports import free_port

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import manifests  # noqa: E402  (the rendered chart, for the Kubernetes backend)
BACKEND = os.environ.get("E2E_BACKEND", "local")
assert BACKEND in ("local", "kubernetes", "helm"), \
    f"E2E_BACKEND must be local, kubernetes or helm, not {BACKEND!r}"
KUBE = BACKEND in ("kubernetes", "helm")
HELM = BACKEND == "helm"
# The test node has this machine's CPUs (2 here): with real containers, Dask pods ask for a
# small CPU share instead of the cores their settings name, so that the suite's clusters fit.
# Tests that check how settings become requests (test_kube.py) opt out and size themselves.
SMALL_CPU_REQUEST = {"resources": {"requests": {"cpu": "50m"}}}
# A directory of this machine mounted at the same path into every Dask pod (a hostPath volume),
# standing for the shared filesystem (NFS, a ReadWriteMany claim) that Kubernetes users give
# their workers; `shared_tmp` hands out fresh subdirectories of it.
SHARED_DIR = Path(os.environ.get("E2E_SHARED_DIR", "/tmp/dgrs-e2e-shared"))
SHARED_VOLUME = {
    "volumes": [{"name": "e2e-shared", "hostPath": {"path": str(SHARED_DIR), "type": "Directory"}}],
    "volumeMounts": [{"name": "e2e-shared", "mountPath": str(SHARED_DIR)}],
}
LOG_DIR = Path(os.environ.get("E2E_LOG_DIR", REPO / "tests" / "e2e" / "logs"))
PYTHON_ENV = sys.prefix  # the venv this suite runs in also runs schedulers and workers


def server_binary() -> Path:
    explicit = os.environ.get("GATEWAY_SERVER_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "gateway-server"


GIB = 1024**3
MIB = 1024**2

# Exposed cluster options used by every server unless a test overrides them: one field of each
# type, some with and some without `label`/`target`.
OPTIONS_CONFIG = [
    {
        "field": "worker_cores",
        "label": "Worker Cores",
        "type": "int",
        "default": 1,
        "min": 1,
        "max": 4,
        "target": "worker_cores",
    },
    {
        "field": "worker_memory",
        "label": "Worker Memory (GiB)",
        "type": "float",
        "default": 0.5,
        "min": 0.25,
        "max": 8,
        "target": "worker_memory",
    },
    {"field": "image", "type": "string", "default": "none"},
    {
        "field": "profile",
        "label": "Profile",
        "type": "select",
        "default": "small",
        "options": [{"key": "small", "value": 1}, {"key": "large", "value": 2}],
        "target": "worker_threads",
    },
    {"field": "debug", "type": "bool", "default": False},
    {
        "field": "environment",
        "label": "Environment",
        "type": "mapping",
        "default": {},
        "target": "environment",
    },
]

# What the client should see for OPTIONS_CONFIG: field -> (label, type, default, extra spec)
EXPECTED_OPTIONS = {
    "worker_cores": ("Worker Cores", "int", 1, {"min": 1, "max": 4}),
    "worker_memory": ("Worker Memory (GiB)", "float", 0.5, {"min": 0.25, "max": 8}),
    "image": ("image", "string", "none", {}),
    "profile": ("Profile", "select", "small", {"options": ["small", "large"]}),
    "debug": ("debug", "bool", False, {}),
    "environment": ("Environment", "mapping", {}, {}),
}
FIELD_CLASSES = {"int": "Integer", "float": "Float", "string": "String", "select": "Select",
                 "bool": "Bool", "mapping": "Mapping"}


def check_options(opts):
    """The client's `Options` equal EXPECTED_OPTIONS: order, labels, types, defaults, bounds."""
    assert list(opts) == list(EXPECTED_OPTIONS)
    for field, (label, typ, default, extra) in EXPECTED_OPTIONS.items():
        f = opts._fields[field]
        assert type(f).__name__ == FIELD_CLASSES[typ], (field, type(f))
        assert f.label == label, field
        assert f.value == default and type(f.value) is type(default), (field, f.value)
        for k, v in extra.items():
            got = getattr(f, k)
            assert (list(got) if k == "options" else got) == v, (field, k, got)
    # the Options object validates like the server's spec says
    with pytest.raises((TypeError, ValueError)):
        opts.worker_cores = 5
    opts.worker_cores = 2
    assert dict(opts)["worker_cores"] == 2


DEFAULT_OPTIONS = {k: v[2] for k, v in EXPECTED_OPTIONS.items()}
CONFIG_ENV = {"E2E_FROM_CONFIG": "config-value"}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "environment":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def holds(predicate, seconds, interval=0.5, what="condition"):
    """Poll `predicate` for `seconds` and fail at the first poll where it is false: a state
    that must hold throughout (a cluster that must stay up, a count that must stay under a
    quota), checked as it is, not only once at the end."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        assert value, f"{what} stopped holding ({value!r})"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def wait_for(predicate, timeout, interval=0.5, what="condition"):
    """Poll `predicate` until it returns a truthy value (returned); fail after `timeout` s.

    Exceptions raised by the predicate count as "not yet" and are reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - reported below
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


class HttpResponse:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # http.client.HTTPMessage (case-insensitive, multi-valued)
        self.body = body

    def json(self):
        return json.loads(self.body)

    @property
    def content_type(self):
        return self.headers.get("Content-Type", "")

    def __repr__(self):
        return f"<HTTP {self.status} {self.content_type!r} {self.body[:300]!r}>"


def basic_auth_header(user, password=""):
    return "Basic " + b64encode(f"{user}:{password}".encode("latin1")).decode()


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class KubeEnv:
    """The Kubernetes control plane of tests/kube-env, brought up once per session (its `up` is
    idempotent), with the DaskCluster CRD applied. `namespace()` makes a namespace with the
    gateway's RBAC and returns the kubeconfig of its ServiceAccount."""

    HERE = REPO / "tests" / "kube-env"
    BRIDGE_IP = os.environ.get("KUBE_ENV_BRIDGE_IP", "10.244.0.1")
    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        env = dict(os.environ)
        # name -> image reference of what images/build made (imported by `up`).
        self.images = {}
        SHARED_DIR.mkdir(parents=True, exist_ok=True)
        SHARED_DIR.chmod(0o1777)
        wanted = ["dask", "gateway"] if HELM else ["dask"]
        out = subprocess.run([str(REPO / "images" / "build"), *wanted], check=True, text=True,
                             stdout=subprocess.PIPE, stderr=sys.stderr, timeout=1800)
        archives = []
        for line in out.stdout.strip().splitlines():
            archive, _digest, ref = line.split()
            archives.append(archive)
            self.images[ref.rsplit("/", 1)[-1].split(":")[0]] = ref
        env["KUBE_ENV_IMAGES"] = " ".join(archives)
        out = subprocess.run([str(self.HERE / "up")], env=env, check=True, text=True,
                             stdout=subprocess.PIPE, stderr=sys.stderr, timeout=900)
        self.admin_kubeconfig = out.stdout.strip().splitlines()[-1]
        bin_dir = subprocess.run(
            ["bash", "-c", f"source {self.HERE}/lib/common.sh; echo $BIN_DIR"],
            check=True, text=True, stdout=subprocess.PIPE).stdout.strip()
        self.kubectl_bin = f"{bin_dir}/kubectl"
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     input=yaml.safe_dump(manifests.crd()))
        self.kubectl("wait", "--for", "condition=Established", "--timeout=60s",
                     "crd/daskclusters.dask-gateway-rs.io")
        self.namespaces = []

    def kubectl(self, *args, input=None, check=True, timeout=120):
        r = subprocess.run([self.kubectl_bin, "--kubeconfig", self.admin_kubeconfig, *args],
                           input=input, text=True, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {r.stderr}")
        return r

    def get_json(self, *args):
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def namespace(self, name):
        ns = re.sub(r"[^a-z0-9-]", "-", f"e2e-{name}".lower())[:50].strip("-")
        ns = f"{ns}-{os.urandom(3).hex()}"
        self.kubectl("create", "namespace", ns)
        self.kubectl("apply", "-n", ns, "-f", "-",
                     input=yaml.safe_dump_all(manifests.gateway_rbac(ns)))
        out = subprocess.run([str(self.HERE / "sa-kubeconfig"), ns, manifests.SERVICE_ACCOUNT],
                             check=True,
                             text=True, stdout=subprocess.PIPE, stderr=sys.stderr, timeout=60)
        self.namespaces.append(ns)
        return ns, out.stdout.strip().splitlines()[-1]

    def delete_namespace(self, ns):
        self.kubectl("delete", "namespace", ns, "--wait=false", check=False)

    def forget_unanswered(self, namespace, service):
        """Deletes the node's conntrack entries of connections to the Service's node ports that
        never got an answer (see tests/kube-env/forget-unanswered): made while it had no ready
        endpoint, they would send a later connection from the same source port past kube-proxy."""
        subprocess.run([str(self.HERE / "forget-unanswered"), namespace, service], check=True,
                       text=True, stdout=sys.stderr, stderr=sys.stderr, timeout=60)

    def bare_namespace(self, name):
        ns = re.sub(r"[^a-z0-9-]", "-", f"e2e-{name}".lower())[:50].strip("-")
        ns = f"{ns}-{os.urandom(3).hex()}"
        self.kubectl("create", "namespace", ns)
        self.namespaces.append(ns)
        return ns


# Registry of running servers, for per-test log slices.
_RUNNING: list[GatewayServer] = []


class GatewayServer:
    """One `gateway-server` process with its own config, port(s) and data directory."""

    def __init__(self, name, base_dir: Path, password=None, admin_users=(), **overrides):
        # Kubernetes: Dask pods request the CPU their settings name, not SMALL_CPU_REQUEST.
        exact_requests = overrides.pop("kube_exact_requests", False)
        self.name = name
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "server.log"
        self.config_path = self.base_dir / "config.yaml"
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None
        self._gateways: list[Gateway] = []
        self._users: set[str] = set()
        config = {
            "address": f"127.0.0.1:{self.port}",
            "data_dir": str(self.data_dir),
            "auth": {
                "type": "simple",
                "password": password,
                "admin_users": list(admin_users),
            },
            "dask": {"python_env": PYTHON_ENV},
            "cluster": {
                "idle_timeout": 0,
                "heartbeat_period": 2,
                "adaptive_period": 1,
                "start_timeout": 90,
                "scheduler_cores": 1,
                "scheduler_memory": "1G",
                "worker_cores": 1,
                "worker_memory": "512M",
                "environment": dict(CONFIG_ENV),
                "options": OPTIONS_CONFIG,
            },
        }
        self.namespace = None
        self.kubeconfig = None
        self.owns_namespace = "kube_namespace" not in overrides
        if KUBE:
            kube = KubeEnv.get()
            namespace = overrides.pop("kube_namespace", None)
            if namespace is None:
                namespace, kubeconfig = kube.namespace(name)
            else:
                kubeconfig = overrides.pop("kube_kubeconfig")
            self.namespace, self.kubeconfig = namespace, kubeconfig
            marker = [{"name": "E2E_NAMESPACE", "value": namespace}]
            template = {"env": marker, **SHARED_VOLUME}
            if not exact_requests:
                template.update(SMALL_CPU_REQUEST)
            config["address"] = f"0.0.0.0:{self.port}"
            config["backend"] = "kubernetes"
            config["kubernetes"] = {
                "namespace": namespace,
                "instance": "e2e",
                "image": kube.images["dask"],
                "termination_grace_period_seconds": 5,
                "scheduler": copy.deepcopy(template),
                "worker": copy.deepcopy(template),
            }
        self.config = deep_merge(config, overrides)
        self.prefix = (self.config.get("prefix") or "").rstrip("/")
        if KUBE and "api_url" not in overrides:
            self.config["api_url"] = f"http://{KubeEnv.BRIDGE_IP}:{self.port}{self.prefix}/api"
        self.users_for_cleanup = set(admin_users)

    # -- addresses -------------------------------------------------------------------------
    @property
    def host(self):
        return "127.0.0.1"

    @property
    def url(self):
        """The gateway address a user gives to `Gateway(...)` (includes any prefix)."""
        return f"http://{self.host}:{self.port}{self.prefix}"

    @property
    def scheduler_port(self):
        addr = self.config.get("scheduler_address")
        return int(addr.rsplit(":", 1)[1]) if addr else self.port

    # -- process control -------------------------------------------------------------------
    def start(self, timeout=60):
        binary = server_binary()
        if not binary.exists():
            pytest.fail(f"gateway-server binary not found at {binary} (set GATEWAY_SERVER_BIN)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = dict(os.environ)
        env.setdefault("RUST_LOG", os.environ.get("E2E_RUST_LOG", "info"))
        env.setdefault("RUST_BACKTRACE", "1")
        env["NO_COLOR"] = "1"
        env.update(getattr(self, "extra_env", {}))
        if self.kubeconfig:
            env["KUBECONFIG"] = self.kubeconfig
        log = open(self.log_path, "ab")
        log.write(f"\n===== e2e: starting {binary} --config {self.config_path} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [str(binary), "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.base_dir,
            start_new_session=True,
        )
        log.close()
        if self not in _RUNNING:
            _RUNNING.append(self)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"gateway-server exited with {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                r = self.health()
                if r.status == 200 and r.json() == {"status": "pass"}:
                    return self
                last = r
            except Exception as e:  # noqa: BLE001
                last = e
            time.sleep(0.2)
        pytest.fail(f"gateway-server not healthy after {timeout}s (last: {last!r}); log:\n{self.log_tail()}")

    def health(self):
        # The health endpoint lives under the prefix like every other API path; fall back to the
        # bare path if the prefixed one is not served.
        r = self.http("GET", "/api/health", timeout=5)
        if r.status == 404 and self.prefix:
            r = self.http("GET", "/api/health", timeout=5, raw_path=True)
        return r

    def is_alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        """SIGKILL the server process only (its clusters are not told)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    # -- clients ---------------------------------------------------------------------------
    def gateway(self, user, password=None, **kwargs) -> Gateway:
        if password is None:
            password = self.password or ""
        self._users.add(user)
        gw = Gateway(self.url, auth=BasicAuth(user, password), **kwargs)
        self._gateways.append(gw)
        return gw

    def http(self, method, path, *, user=None, password=None, headers=None, body=None,
             timeout=30, raw_path=False):
        """One raw HTTP/1.1 request (no redirects, no retries). `path` is below the prefix."""
        hdrs = dict(headers or {})
        if user is not None:
            self._users.add(user)
            hdrs["Authorization"] = basic_auth_header(
                user, self.password or "" if password is None else password
            )
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path if raw_path else self.prefix + path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return HttpResponse(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    # -- inspection ------------------------------------------------------------------------
    def log_size(self):
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, start=0):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return ANSI.sub("", f.read().decode("utf-8", "replace"))
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=80, start=0):
        return "\n".join(self.log_text(start).splitlines()[-lines:])

    def processes(self):
        """Live processes (other than the server) of this server's clusters: referring to its
        data dir (local), or pods of its namespace (Kubernetes)."""
        needle = str(self.data_dir)
        me = os.getpid()
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            if p.pid == me or (self.proc is not None and p.pid == self.proc.pid):
                continue
            try:
                info = p.info
                if self.namespace:
                    hit = p.environ().get("E2E_NAMESPACE") == self.namespace
                else:
                    hit = any(needle in a for a in (info.get("cmdline") or []))
                    hit = hit or (info.get("cwd") or "").startswith(needle)
                if not hit and not self.namespace:
                    env = p.environ()
                    hit = any(needle in v for v in env.values())
                # A container's PID 1 (tini in the Dask image) is not a Dask process.
                if hit and p.status() != psutil.STATUS_ZOMBIE and p.name() != "tini":
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def cluster_processes(self, cluster_name, role=None):
        """Scheduler/worker processes of one cluster (found via DASK_GATEWAY_CLUSTER_NAME or
        the cluster name on the command line / in the working directory)."""
        out = []
        for p in self.processes():
            try:
                cmd = " ".join(p.cmdline())
                env = p.environ()
                cwd = p.cwd()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            object_id = cluster_name.rsplit(".", 1)[-1]
            if not (
                env.get("DASK_GATEWAY_CLUSTER_NAME") == cluster_name
                or cluster_name in cmd
                or cluster_name in cwd
                or (self.namespace and f"dask-worker-{object_id}-" in cmd)
            ):
                continue
            is_sched = re.search(r"\bscheduler\b|dask-scheduler", cmd) is not None
            is_worker = re.search(r"\bworker\b|dask-worker", cmd) is not None
            if role == "scheduler" and not (is_sched and not is_worker):
                continue
            if role == "worker" and not is_worker:
                continue
            out.append(p)
        return out

    def kube_objects(self, kind, cluster_name=None):
        """Objects of `kind` in this server's namespace (of one cluster if given)."""
        args = [kind, "-n", self.namespace]
        if cluster_name:
            args += ["-l", f"dask-gateway-rs.io/cluster={cluster_name.rsplit('.', 1)[-1]}"]
        return KubeEnv.get().get_json(*args)["items"]

    # -- cleanup ---------------------------------------------------------------------------
    def stop_all_clusters(self, timeout=45):
        """Stop, through the API, every active cluster of every user this fixture has seen."""
        if not self.is_alive():
            return
        users = set(self._users) | set(self.users_for_cleanup)
        names = {}
        for user in users:
            try:
                r = self.http("GET", "/api/v1/clusters/", user=user, timeout=10)
                if r.status == 200:
                    for name in r.json():
                        names[name] = user
            except Exception:  # noqa: BLE001
                pass
        for name, user in names.items():
            with contextlib.suppress(Exception):
                self.http("DELETE", f"/api/v1/clusters/{name}", user=user, timeout=10)

        def all_stopped():
            for name, user in names.items():
                r = self.http("GET", f"/api/v1/clusters/{name}", user=user, timeout=10)
                if r.status == 200 and r.json()["status"] in ("PENDING", "RUNNING", "STOPPING"):
                    return False
            return True

        with contextlib.suppress(Exception):
            wait_for(all_stopped, timeout, what="clusters to stop")

    def close_clients(self):
        for gw in self._gateways:
            with contextlib.suppress(Exception):
                gw.close()
        self._gateways.clear()

    def kill_leftovers(self):
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        return procs

    def shutdown(self):
        try:
            self.stop_all_clusters()
            self.close_clients()
            self.terminate()
        finally:
            leftovers = self.kill_leftovers()
            if self in _RUNNING:
                _RUNNING.remove(self)
            if self.namespace and self.owns_namespace:
                KubeEnv.get().delete_namespace(self.namespace)
            if leftovers:
                with open(self.log_path, "a") as f:
                    f.write(f"\n===== e2e: killed leftover processes: "
                            f"{[p.pid for p in leftovers]} =====\n")


class HelmServer(GatewayServer):
    """A server that is a release of the Helm chart (see the module docs). Same interface as
    GatewayServer, minus process control."""

    CHART = REPO / "charts" / "dask-gateway-rs"

    def __init__(self, name, base_dir, password=None, admin_users=(), **overrides):
        self.release = re.sub(r"[^a-z0-9-]", "-", name.lower())[:20].strip("-") or "gw"
        self._namespace = KubeEnv.get().bare_namespace(name)
        super().__init__(name, base_dir, password=password, admin_users=admin_users,
                         kube_namespace=self._namespace, kube_kubeconfig=None, **overrides)
        self.owns_namespace = True
        self.node_port = None
        self.helm = subprocess.run([str(REPO / "tests" / "helm" / "build")], check=True, text=True,
                                   stdout=subprocess.PIPE).stdout.strip().splitlines()[-1]

    def values(self):
        """Chart values expressing this server's configuration."""
        c = self.config
        kube = c["kubernetes"]
        images = KubeEnv.get().images
        values = {
            "crds": {"install": False},  # applied once by KubeEnv
            # The chart's default two replicas, with test-sized requests (a 2-CPU node).
            "gateway": {"dashboardAuth": bool(c.get("dashboard_auth")),
                        "stopClustersOnShutdown": bool(c.get("stop_clusters_on_shutdown")),
                        "prefix": c.get("prefix") or "", "logFormat": "text",
                        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"},
                                      "limits": {"memory": "512Mi"}}},
            "auth": {"simple": {"password": self.password or ""},
                     "adminUsers": list(c["auth"].get("admin_users") or []),
                     "adminGroups": list(c["auth"].get("admin_groups") or []),
                     "groups": dict(c["auth"].get("groups") or {})},
            "groups": list(c.get("groups") or []),
            "clusters": {"image": kube["image"],
                         "terminationGracePeriodSeconds": 5,
                         "scheduler": {"template": kube["scheduler"]},
                         "worker": {"template": kube["worker"]}},
            # Reached from this machine on the node's address, through kube-proxy.
            "service": {"type": "NodePort"},
            # The gateway's own configuration keys, merged last by the chart.
            "extraConfig": {"cluster": c["cluster"]},
        }
        if "gateway" in images:
            repository, tag = images["gateway"].rsplit(":", 1)
            values["image"] = {"repository": repository, "tag": tag}
        return values

    @property
    def host(self):
        return KubeEnv.BRIDGE_IP

    @property
    def port(self):
        return getattr(self, "node_port", None) or 0

    @port.setter
    def port(self, value):
        pass  # chosen by Kubernetes (the Service's node port)

    def start(self, timeout=180):
        values = self.base_dir / "values.yaml"
        values.write_text(yaml.safe_dump(self.values()))
        r = subprocess.run([self.helm, "upgrade", "--install", self.release, str(self.CHART),
                            "-n", self.namespace, "-f", str(values), "--wait",
                            "--timeout", f"{timeout}s"], text=True, capture_output=True,
                           env={**os.environ, "KUBECONFIG": KubeEnv.get().admin_kubeconfig})
        if r.returncode != 0:
            pytest.fail(f"helm install of {self.name} failed: {r.stderr}")
        svc = KubeEnv.get().get_json("svc", "-n", self.namespace, self.service)
        self.node_port = svc["spec"]["ports"][0]["nodePort"]
        if self not in _RUNNING:
            _RUNNING.append(self)
        wait_for(lambda: self.health().status == 200, 60, what=f"{self.name} to answer")
        KubeEnv.get().forget_unanswered(self.namespace, self.service)
        return self

    @property
    def service(self):
        """The release's gateway Service."""
        return f"{self.release}-dask-gateway-rs"

    def is_alive(self):
        return bool(getattr(self, "node_port", None))

    def kill9(self):
        pytest.skip("process control of a gateway pod is not part of the Helm mode")

    GATEWAY_PODS = "app.kubernetes.io/component=gateway"

    def gateway_pods(self):
        """The uids of this release's gateway pods that are not being deleted."""
        items = KubeEnv.get().get_json(
            "pods", "-n", self.namespace,
            "-l", f"app.kubernetes.io/instance={self.release},{self.GATEWAY_PODS}")["items"]
        return [p["metadata"]["uid"] for p in items
                if not p["metadata"].get("deletionTimestamp")]

    def ready_endpoint_pods(self):
        """The uids of the pods among the gateway Service's ready endpoints."""
        slices = KubeEnv.get().get_json("endpointslices", "-n", self.namespace,
                                        "-l", f"kubernetes.io/service-name={self.service}")
        return {e["targetRef"]["uid"] for sl in slices["items"] for e in sl.get("endpoints") or []
                if e.get("conditions", {}).get("ready") and e.get("targetRef")}

    def kill_gateway_pods(self, timeout=180):
        """Deletes the gateway pods with no grace period (their processes get SIGKILL) and
        waits for the Deployment's replacement to answer through the Service."""
        old = set(self.gateway_pods())
        KubeEnv.get().kubectl(
            "delete", "pod", "-n", self.namespace, "--grace-period=0", "--force", "--wait=false",
            "-l", f"app.kubernetes.io/instance={self.release},{self.GATEWAY_PODS}")

        def replaced():
            # The Service's ready endpoints are new pods only: until then a request may still
            # reach a killed pod whose process the kubelet has not stopped yet.
            now = set(self.gateway_pods())
            serving = self.ready_endpoint_pods()
            return bool(serving) and serving <= now and not (serving & old)

        wait_for(replaced, timeout, what=f"{self.name}'s gateway pod to be replaced")
        wait_for(lambda: self.health().status == 200, timeout,
                 what=f"{self.name}'s new gateway pod to answer")
        KubeEnv.get().forget_unanswered(self.namespace, self.service)
        return old

    def terminate(self, timeout=30):
        if not self.is_alive():
            return
        subprocess.run([self.helm, "uninstall", self.release, "-n", self.namespace, "--wait"],
                       capture_output=True, env={**os.environ,
                                                 "KUBECONFIG": KubeEnv.get().admin_kubeconfig})
        self.node_port = None

    def log_text(self, start=0):
        r = KubeEnv.get().kubectl("logs", "-n", self.namespace, "--tail", "400", "-l",
                                  f"app.kubernetes.io/instance={self.release},"
                                  "app.kubernetes.io/component=gateway", check=False)
        return ANSI.sub("", r.stdout)

    def log_size(self):
        return 0


def _server_starter(tmp_path_factory):
    """A generator fixture body: yields `make(name, **settings)`, which starts a GatewayServer;
    every server it started is shut down (newest first) when the fixture's scope ends."""
    started = []

    def make(name, **kwargs):
        cls = HelmServer if HELM else GatewayServer
        srv = cls(name, tmp_path_factory.mktemp(name), **kwargs)
        started.append(srv)
        srv.start()
        return srv

    yield make
    for srv in reversed(started):
        srv.shutdown()


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """Start servers with custom settings; shut down at the end of the session."""
    yield from _server_starter(tmp_path_factory)


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory):
    """A per-module factory: servers it starts are shut down when the module ends."""
    yield from _server_starter(tmp_path_factory)


SHARED_PASSWORD = "s3cret pass:word"


@pytest.fixture(scope="session")
def shared_server(server_factory):
    """One server for the protocol, multi-user and bad-input modules. Each module uses its own
    user names, so their clusters never meet. Shared password, one admin, max 2 workers."""
    return server_factory(
        "shared",
        password=SHARED_PASSWORD,
        admin_users=["root-admin"],
        cluster={"max_workers": 2},
    )


# -- cluster helpers -----------------------------------------------------------------------

_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="e2e-new-cluster")


@pytest.fixture
def shared_tmp(tmp_path):
    """A fresh directory that the test and every scheduler and worker see at the same path: the
    test's own on the local backend, a subdirectory of SHARED_DIR on Kubernetes."""
    if not KUBE:
        return tmp_path
    path = SHARED_DIR / f"{tmp_path.name}-{os.urandom(4).hex()}"
    path.mkdir(mode=0o777)
    path.chmod(0o777)  # Dask pods run as another user
    return path


def new_cluster(gateway: Gateway, timeout=120, **options):
    """`gateway.new_cluster(**options)`, but failing the test after `timeout` seconds instead of
    letting the client poll forever for a cluster that never starts."""
    fut = _pool.submit(gateway.new_cluster, **options)
    try:
        return fut.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        states = {}
        with contextlib.suppress(Exception):
            states = {c.name: c.status.name for c in gateway.list_clusters()}
        raise AssertionError(
            f"new_cluster({options}) did not return within {timeout}s; clusters: {states}"
        ) from None


def wait_computes(client, timeout=90, what="the client to compute"):
    """Wait until `client` runs a task again (it may be reconnecting after a gateway restart)."""

    def computes():
        try:
            return client.submit(lambda x: x + 2, 1, pure=False).result(timeout=10) == 3
        except Exception:  # noqa: BLE001 - still reconnecting
            return False

    wait_for(computes, timeout, interval=1, what=what)


def connect(gateway: Gateway, name, timeout=90, **kwargs):
    fut = _pool.submit(gateway.connect, name, **kwargs)
    try:
        return fut.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"connect({name}) did not return within {timeout}s") from None


def n_workers(client):
    return len(client.scheduler_info(n_workers=-1)["workers"])


def wait_workers(client, n, timeout=90, exact=True):
    """Wait until the scheduler reports `n` workers (exactly, or at least)."""

    def check():
        k = n_workers(client)
        return (k == n) if exact else (k >= n)

    wait_for(check, timeout, what=f"{'exactly' if exact else 'at least'} {n} workers "
             f"(have {n_workers(client)})")


def cluster_status(gateway: Gateway, name):
    return gateway.get_cluster(name).status.name


def wait_status(gateway: Gateway, name, status, timeout=60):
    statuses = {status} if isinstance(status, str) else set(status)
    seen = []

    def check():
        s = cluster_status(gateway, name)
        if not seen or seen[-1] != s:
            seen.append(s)
        return s in statuses

    wait_for(check, timeout, what=f"cluster {name} to reach {statuses} (seen {seen})")
    return seen[-1]


def scheduler_log(server, name):
    """What cluster `name`'s scheduler has logged so far."""
    if KUBE:
        pods = [p["metadata"]["name"] for p in server.kube_objects("pods", name)
                if p["metadata"]["labels"]["app.kubernetes.io/component"] == "dask-scheduler"]
        if not pods:
            return ""
        return KubeEnv.get().kubectl("logs", "-n", server.namespace, pods[0], check=False).stdout
    path = server.data_dir / "clusters" / name / "logs" / "scheduler.log"
    return path.read_text(errors="replace") if path.exists() else ""


# -- per-test server log slices -----------------------------------------------------------


def _safe(nodeid):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-150:]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Automatic garbage collection is off for the session (see pytest_configure); collect here,
    # where the main thread holds no lock.
    gc.collect()
    item._e2e_log_marks = {id(s): s.log_size() for s in _RUNNING}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "setup" and rep.passed:
        return
    marks = getattr(item, "_e2e_log_marks", {})
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for srv in list(_RUNNING):
        start = marks.get(id(srv), 0)
        text = srv.log_text(start)
        if rep.when == "call":
            (LOG_DIR / f"{_safe(item.nodeid)}.{srv.name}.log").write_text(text)
        if rep.failed:
            tail = "\n".join(text.splitlines()[-60:])
            rep.sections.append(
                (f"gateway-server '{srv.name}' log during test (tail; full: {srv.log_path})", tail)
            )


def pytest_collection_modifyitems(config, items):
    skip_local = pytest.mark.skip(reason="local backend only")
    skip_kube = pytest.mark.skip(reason="Kubernetes backend only (E2E_BACKEND=kubernetes)")
    skip_helm = pytest.mark.skip(reason="controls the gateway process (not in the Helm mode)")
    skip_helm_only = pytest.mark.skip(reason="Helm mode only (E2E_BACKEND=helm)")
    skip_stress = pytest.mark.skip(reason="a stress run: scripts/restart-stress (E2E_STRESS=1)")
    for item in items:
        if item.get_closest_marker("stress") and os.environ.get("E2E_STRESS") != "1":
            item.add_marker(skip_stress)
        if KUBE and item.get_closest_marker("local_only"):
            item.add_marker(skip_local)
        if HELM and (item.get_closest_marker("process_control")
                     or item.get_closest_marker("kube_only")
                     or item.get_closest_marker("not_helm")):
            item.add_marker(skip_helm)
        if not KUBE and item.get_closest_marker("kube_only"):
            item.add_marker(skip_kube)
        if not HELM and item.get_closest_marker("helm_only"):
            item.add_marker(skip_helm_only)


def pytest_configure(config):
    config.addinivalue_line("markers", "local_only: runs on the local backend only")
    config.addinivalue_line("markers", "kube_only: runs on the Kubernetes backend only")
    config.addinivalue_line("markers", "helm_only: runs through a Helm-installed gateway only")
    config.addinivalue_line("markers", "process_control: kills or restarts the gateway process")
    config.addinivalue_line("markers", "chart: also run through the Helm chart (tests/run-kube "
                            "runs `-m 'smoke or chart or helm_only'` in the Helm mode)")
    config.addinivalue_line("markers", "stress: long stress runs, only with E2E_STRESS=1 "
                            "(scripts/restart-stress)")
    config.addinivalue_line("markers", "not_helm: needs settings the Helm mode does not pass")
    config.addinivalue_line("markers", "smoke: the compatibility smoke set (create, scale, "
                            "compute, dashboard, shutdown)")
    # The stock client's finalizers (Gateway/GatewayCluster.__del__ -> close -> LoopRunner.stop)
    # take distributed's global LoopRunner lock. If a GC pass runs them while the main thread is
    # inside LoopRunner.start (e.g. creating a Client), the process deadlocks, beyond the reach
    # of pytest-timeout. So: no automatic GC; collect between tests instead.
    gc.disable()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Make sure no user dask-gateway config leaks into the tests.
    import dask

    dask.config.set({"gateway.address": None, "gateway.proxy-address": None,
                     "gateway.public-address": None, "gateway.cluster.options": {}})
    assert dask_gateway.__version__


# -- raw TLS -------------------------------------------------------------------------------


class TlsProbe:
    def __init__(self):
        self.handshake_ok = False
        self.peer_der = None
        self.received = b""
        self.eof = False
        self.error = None
        self.timed_out = False

    def __repr__(self):
        return (f"<TlsProbe ok={self.handshake_ok} eof={self.eof} error={self.error!r} "
                f"timeout={self.timed_out} received={self.received[:60]!r}>")


def insecure_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_probe(port, sni, ctx=None, first_chunk=None, delay=0.0, timeout=15, host="127.0.0.1"):
    """Run a TLS client handshake over a raw socket (MemoryBIO), so that exactly what the server
    sends back is visible. `first_chunk`: send the ClientHello in pieces of that many bytes, with
    `delay` seconds between pieces."""
    ctx = ctx or insecure_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=False, server_hostname=sni)
    res = TlsProbe()
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = out.read()
        if first_chunk:
            for i in range(0, len(hello), first_chunk):
                sock.sendall(hello[i:i + first_chunk])
                time.sleep(delay)
        else:
            sock.sendall(hello)
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                res.eof = True
                return res
            except socket.timeout:
                res.timed_out = True
                return res
            if not data:
                res.eof = True
                return res
            res.received += data
            inc.write(data)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pending = out.read()
                if pending:
                    sock.sendall(pending)
                continue
            except ssl.SSLError as e:
                res.error = e
                return res
            pending = out.read()
            if pending:
                sock.sendall(pending)
            res.handshake_ok = True
            res.peer_der = obj.getpeercert(binary_form=True)
            return res
    finally:
        sock.close()


def raw_exchange(port, payload: bytes, timeout=15, host="127.0.0.1"):
    """Send bytes on a plain TCP connection and half-close it; return everything received until
    EOF/timeout and whether the server closed the connection."""
    sock = socket.create_connection((host, port), timeout=timeout)
    received = b""
    closed = False
    try:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return received, True
        except OSError as e:
            # ENOTCONN: the server already answered and closed (e.g. 431 for huge headers);
            # what it sent may still be readable.
            if e.errno != errno.ENOTCONN:
                raise
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            except socket.timeout:
                break
            if not data:
                closed = True
                break
            received += data
    finally:
        sock.close()
    return received, closed
