"""Side-by-side benchmark of our gateway and the reference dask-gateway-server.

Run by scripts/bench-compare (which builds, prepares both venvs and owns the work directory);
see docs/benchmarks.md, "Side by side with the reference". Both gateways run at the same time on
this machine, each with the local process backend, simple (Basic) auth and the same Dask
versions, and every measurement alternates between them so that both share the same background
noise. Nothing here asserts anything about speed.

Processes counted as "the server":
  ours       the gateway-server process (API, proxy and backend in one process);
  reference  the dask-gateway-server Python process (API + backend) and the dask-gateway-proxy
             process it starts (HTTP and scheduler TLS proxy). Its Dask schedulers and workers
             are excluded, as ours are.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import warnings

from bench_rest import basic_header, percentile, rest

QUICK = bool(os.environ.get("BENCH_QUICK"))
TICK = os.sysconf("SC_CLK_TCK")
USER_API = "bench-api"  # the user of the request-rate runs: has no clusters (body `{}`)
USER_DASK = "bench"


def env_float(name, default):
    value = os.environ.get(name)
    return float(value) if value else default


def say(msg):
    print(msg, flush=True)


def note(msg):
    print(f"bench-compare: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- /proc ---------------------------------------------------------------------------------
def proc_stat(pid):
    """(ppid, comm, utime+stime in seconds) of one process."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    head, tail = raw.rsplit(")", 1)
    comm = head.split("(", 1)[1]
    fields = tail.split()
    return int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / TICK


def cpu_seconds(pids):
    return sum(proc_stat(p)[2] for p in pids)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def pids_with_cwd_under(root):
    root = os.path.realpath(root)
    out = []
    for pid in all_pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            out.append(pid)
    return out


def wait_no_pids_under(root, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not pids_with_cwd_under(root):
            return True
        time.sleep(0.1)
    return False


def machine_info():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cores": os.cpu_count(), "cpu": model, "mem_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release()}


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- the two servers -----------------------------------------------------------------------
class Server:
    """One gateway under test, started in its own directory under the work directory (so that
    it and everything it starts can be found by working directory at the end)."""

    def __init__(self, name, label, work):
        self.name = name
        self.label = label
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc = None
        self.clusters_root = None
        self.gateway = None  # the stock client, made lazily

    def popen(self, cmd, env=None):
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=self.log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server not healthy after {timeout} s")

    def server_pids(self):
        return {"gateway": self.proc.pid}

    def proxy_pid(self):
        return self.proc.pid

    def rss(self):
        per = {role: rss_kib(pid) for role, pid in self.server_pids().items()}
        return sum(per.values()), per

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        # Both stop their clusters on SIGTERM before exiting.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""


class Ours(Server):
    def __init__(self, work, binary, venv, name="ours", warm_schedulers=0, worker_threads=None):
        super().__init__(name, name, work)
        self.clusters_root = os.path.join(self.dir, "data", "clusters")
        config = os.path.join(self.dir, "gateway.yaml")
        with open(config, "w") as f:
            f.write(
                f"address: 127.0.0.1:{self.port}\n"
                f"data_dir: {self.dir}/data\n"
                "stop_clusters_on_shutdown: true\n"
                "log_level: info\n"
                f"dask:\n  python_env: {venv}\n"
                "cluster:\n  worker_memory: 512M\n  scheduler_memory: 512M\n"
                f"  warm_schedulers: {warm_schedulers}\n"
            )
        self.config_text = open(config).read()
        env = None
        if worker_threads:
            # tokio's own setting: the runtime's worker threads (default: one per core).
            env = dict(os.environ, TOKIO_WORKER_THREADS=str(worker_threads))
        self.popen([binary, "--config", config], env)


class Reference(Server):
    def __init__(self, work, ref_venv, version, log_level):
        super().__init__("reference", f"reference {version}", work)
        self.clusters_root = os.path.join(self.dir, "clusters")
        api_port = free_port()
        key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        dask = os.path.join(ref_venv, "bin", "dask")
        config = os.path.join(self.dir, "dask_gateway_config.py")
        with open(config, "w") as f:
            f.write(
                "# Generated by scripts/bench_compare.py: the reference set up like ours.\n"
                "c = get_config()  # noqa: F821\n"
                f"c.DaskGateway.address = '127.0.0.1:{api_port}'  # private API server\n"
                f"c.Proxy.address = '127.0.0.1:{self.port}'  # public: HTTP and scheduler TLS\n"
                f"c.DaskGateway.log_level = {log_level!r}\n"
                "c.DaskGateway.backend_class = "
                "'dask_gateway_server.backends.local.UnsafeLocalBackend'\n"
                "c.DaskGateway.authenticator_class = "
                "'dask_gateway_server.auth.SimpleAuthenticator'\n"
                f"c.LocalBackend.clusters_directory = {self.clusters_root!r}\n"
                "# State in SQLite on disk like ours (the reference needs a key for that).\n"
                f"c.DBBackendBase.db_url = 'sqlite:///{self.dir}/gateway.sqlite'\n"
                f"c.DBBackendBase.db_encrypt_keys = [{key!r}]\n"
                "c.DBBackendBase.stop_clusters_on_shutdown = True\n"
                f"c.ClusterConfig.scheduler_cmd = [{dask!r}, 'scheduler']\n"
                f"c.ClusterConfig.worker_cmd = [{dask!r}, 'worker']\n"
                "c.ClusterConfig.scheduler_memory = '512 M'\n"
                "c.ClusterConfig.worker_memory = '512 M'\n"
            )
        self.config_text = open(config).read().replace(key, "<random key>")
        env = dict(os.environ)
        env["PATH"] = os.path.join(ref_venv, "bin") + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = ref_venv
        env.pop("PYTHONPATH", None)
        self.popen([os.path.join(ref_venv, "bin", "dask-gateway-server"), "-f", config], env)
        self._proxy = None

    def proxy_pid(self):
        if self._proxy is None or not os.path.exists(f"/proc/{self._proxy}"):
            self._proxy = None
            for pid in all_pids():
                try:
                    ppid, comm, _ = proc_stat(pid)
                except OSError:
                    continue
                if ppid == self.proc.pid and comm.startswith("dask-gateway-pr"):
                    self._proxy = pid
                    break
            if self._proxy is None:
                raise RuntimeError("the reference proxy process was not found")
        return self._proxy

    def server_pids(self):
        return {"gateway": self.proc.pid, "proxy": self.proxy_pid()}


# -- 1. API request rate -------------------------------------------------------------------
WRK_LUA = r"""
wrk.method = "GET"
wrk.headers["%(header)s"] = "%(value)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\": %%d, \"duration_us\": %%d, \"bytes\": %%d, " ..
    "\"errors\": {\"connect\": %%d, \"read\": %%d, \"write\": %%d, \"status\": %%d, \"timeout\": %%d}, " ..
    "\"latency_us\": {\"mean\": %%.1f, \"p50\": %%d, \"p90\": %%d, \"p99\": %%d, \"max\": %%d}}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
"""


def session_cookie(server, user):
    """The cookie the server sets in answer to one Basic-authenticated request (what the stock
    client sends from its second request on), and the body length."""
    req = urllib.request.Request(f"{server.address}/api/v1/clusters/",
                                 headers={"Authorization": basic_header(user)})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
        cookie = r.headers.get("Set-Cookie", "").split(";", 1)[0]
    return cookie, len(body)


def wrk(url, lua, connections, seconds, threads):
    """Runs wrk; returns the summary its Lua `done` hook printed."""
    cmd = ["wrk", "--latency", "--timeout", "10s", "-t", str(min(threads, connections)),
           "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "-s", lua, url]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()} {proc.stdout.strip()}")
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON "):])
    raise RuntimeError(f"no summary from wrk: {proc.stdout}")


def children_cpu_seconds():
    """User+system CPU of every child this process has waited for (so far)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def api_rate(server, connections, header, value, args, workdir):
    lua = os.path.join(workdir, f"wrk-{server.name}-{header.lower()}.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA % {"header": header, "value": value})
    url = f"{server.address}/api/v1/clusters/"
    if args.warmup > 0:
        wrk(url, lua, connections, args.warmup, args.wrk_threads)
    pids = list(server.server_pids().values())
    c0 = cpu_seconds(pids)
    child0 = children_cpu_seconds()
    t0 = time.perf_counter()
    summary = wrk(url, lua, connections, args.duration, args.wrk_threads)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - c0
    loadgen_cpu = children_cpu_seconds() - child0
    n = summary["requests"]
    secs = summary["duration_us"] / 1e6
    errors = sum(summary["errors"].values())
    lat = summary["latency_us"]
    res = {
        "connections": connections,
        "auth": header.lower(),
        "requests": n,
        "seconds": round(secs, 3),
        "requests_per_s": round(n / secs, 1),
        "latency_ms": {k: round(v / 1000.0, 3) for k, v in lat.items()},
        "errors": summary["errors"],
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_request": round(cpu * 1e6 / n, 2) if n else None,
        "loadgen_cpu_cores": round(loadgen_cpu / wall, 2),
        "loadgen_threads": min(args.wrk_threads, connections),
    }
    say(f"  {server.name:9} {connections:3} callers ({header}): {res['requests_per_s']:10.0f} req/s, "
        f"p50 {res['latency_ms']['p50']:.3f} ms, p99 {res['latency_ms']['p99']:.3f} ms, "
        f"server CPU {res['server_cpu_us_per_request']} us/req, wrk used "
        f"{res['loadgen_cpu_cores']:.2f} of its {res['loadgen_threads']} thread(s)"
        + (f", {errors} ERRORS {summary['errors']}" if errors else ""))
    if errors:
        note(f"{server.name}: {errors} failed requests in the window: {summary['errors']}")
    return res


def measure_api(servers, args, results, workdir):
    say(f"== API GET /api/v1/clusters/ (wrk, keep-alive, {args.warmup:g} s warm-up + "
        f"{args.duration:g} s; Basic header on every request)")
    for server in servers:
        _, size = session_cookie(server, USER_API)
        results[server.name]["api_body_bytes"] = size
    for i, c in enumerate(args.connections):
        order = servers if i % 2 == 0 else servers[::-1]
        for server in order:
            r = api_rate(server, c, "Authorization", basic_header(USER_API), args, workdir)
            results[server.name].setdefault("api_basic", {})[str(c)] = r
    for i, server in enumerate(servers[::-1]):
        cookie, _ = session_cookie(server, USER_API)
        if not cookie:
            note(f"{server.name} set no session cookie; cookie run skipped")
            continue
        r = api_rate(server, 16, "Cookie", cookie, args, workdir)
        results[server.name]["api_cookie_16"] = r
    # Ours again on one worker thread: wrk then has the other core to itself, as it has beside
    # the reference (one Python thread). With a thread per core, the server's two threads and
    # wrk's take turns on 2 cores, and a request that waits out another thread's time slice
    # (a few ms) sets the p99.
    say("== API again, ours on one worker thread (TOKIO_WORKER_THREADS=1)")
    one = Ours(workdir, args.server, args.venv, name="ours-1-thread", worker_threads=1)
    try:
        one.wait_ready()
        session_cookie(one, USER_API)
        r = api_rate(one, 16, "Authorization", basic_header(USER_API), args, workdir)
        results["ours"]["api_basic_one_thread_16"] = r
    finally:
        one.stop()


# -- 2.-5. with the stock client and real Dask ---------------------------------------------
class DaskSide:
    """The stock client for one server, and the clusters it made (all stopped at the end)."""

    def __init__(self, server):
        from dask_gateway import BasicAuth, Gateway

        self.server = server
        self.gateway = Gateway(server.address, auth=BasicAuth(USER_DASK))
        self.names = set()
        # The stock client's objects stay referenced until the process ends: one collected on
        # the client's event-loop thread can deadlock in its finalizer.
        self.keep = [self.gateway]

    def new_cluster(self):
        cluster = self.gateway.new_cluster(shutdown_on_close=True)
        self.names.add(cluster.name)
        self.keep.append(cluster)
        return cluster

    def client(self, cluster):
        client = cluster.get_client(set_as_default=False)
        self.keep.append(client)
        return client

    def stop(self, cluster=None, client=None, names=None, timeout=90):
        """Stops clusters and waits until none of their processes is left (so that the next
        measurement does not share the cores with dying schedulers and workers)."""
        if client is not None:
            try:
                client.close(timeout=10)
            except Exception:  # noqa: BLE001
                pass
        todo = set(names or ())
        if cluster is not None:
            todo.add(cluster.name)
        for name in todo:
            try:
                self.gateway.stop_cluster(name)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                active = {c.name for c in self.gateway.list_clusters()}
            except Exception:  # noqa: BLE001
                active = set()
            if not (active & todo):
                break
            time.sleep(0.1)
        for name in todo:
            wait_no_pids_under(os.path.join(self.server.clusters_root, name),
                               max(1.0, deadline - time.time()))
            self.names.discard(name)

    def stop_all(self):
        if self.names:
            self.stop(names=set(self.names), timeout=60)


def median(values):
    return statistics.median(values) if values else None


def timed_create(side, label, i):
    """new_cluster, get_client and one scheduler_info on `side`; returns the cluster, the
    client and the timings (printed as round `i`)."""
    t0 = time.perf_counter()
    cluster = side.new_cluster()
    t1 = time.perf_counter()
    client = side.client(cluster)
    client.scheduler_info()
    t2 = time.perf_counter()
    row = {"total_s": round(t2 - t0, 3), "new_cluster_s": round(t1 - t0, 3),
           "get_client_s": round(t2 - t1, 3)}
    say(f"  {label:9} round {i + 1}: {row['total_s']:.3f} s "
        f"(new_cluster {row['new_cluster_s']:.3f} + get_client {row['get_client_s']:.3f})")
    return cluster, client, row


def measure_create(sides, rounds, results):
    say(f"== create -> client connected (new_cluster, get_client, scheduler_info), {rounds} rounds")
    rows = {s.server.name: [] for s in sides}
    for i in range(rounds):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            cluster, client, row = timed_create(side, side.server.name, i)
            rows[side.server.name].append(row)
            side.stop(cluster, client)
    for name, r in rows.items():
        results[name]["create_connected"] = {
            "rounds": r, "median_s": median([x["total_s"] for x in r])}


def warm_pool_ready(server):
    """Whether our server's warm pool has a running member and none starting."""
    with urllib.request.urlopen(f"{server.address}/metrics", timeout=5) as r:
        text = r.read().decode()
    # Only the pool's family: dask_gateway_workers{state="running"} counts workers.
    pool = r'^dask_gateway_warm_schedulers\{pool="[^"]*",state="%s"\} (\d+)$'
    running = sum(int(n) for n in re.findall(pool % "running", text, re.M))
    pending = sum(int(n) for n in re.findall(pool % "pending", text, re.M))
    return running >= 1 and pending == 0


def measure_create_warm(work, binary, venv, rounds, results):
    """Create -> connected on our gateway with `warm_schedulers: 1` (the reference has no
    warm capacity; the table sets this against its cold create)."""
    say(f"== create -> client connected from a warm pool (ours, warm_schedulers: 1), {rounds} rounds")
    server = Ours(work, binary, venv, name="ours-warm", warm_schedulers=1)
    side = None
    rows = []
    try:
        server.wait_ready()
        side = DaskSide(server)
        for i in range(rounds):
            deadline = time.time() + 60
            while not warm_pool_ready(server):
                if time.time() > deadline:
                    raise RuntimeError("the warm pool did not fill within 60 s")
                time.sleep(0.1)
            time.sleep(1.0)  # let the refilled scheduler settle, as a pool does between users
            cluster, client, row = timed_create(side, "ours-warm", i)
            rows.append(row)
            side.stop(cluster, client)
    finally:
        if side is not None:
            side.stop_all()
        server.stop()
    results["ours"]["create_connected_warm"] = {
        "rounds": rows, "median_s": median([x["total_s"] for x in rows])}


def measure_burst(servers, users, results):
    """`users` users create a cluster each at the same moment (REST, one request each): every
    answer's status and latency, then the time until every cluster is RUNNING."""
    say(f"== burst: {users} users create a cluster at the same moment (REST)")
    for server in servers:
        barrier = threading.Barrier(users)
        answers = [None] * users

        def create(i):
            barrier.wait()
            answers[i] = rest(server.address, "POST", "/api/v1/clusters/", f"burst{i}",
                              {"cluster_options": {}})

        t0 = time.perf_counter()
        threads = [threading.Thread(target=create, args=(i,)) for i in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = {}
        for status, _, _ in answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        names = [(f"burst{i}", a[1]["name"]) for i, a in enumerate(answers)
                 if a[0] == 201 and isinstance(a[1], dict) and "name" in a[1]]
        lat = [a[2] for a in answers if a[0] is not None]
        pending = set(names)
        deadline = time.perf_counter() + 300
        while pending and time.perf_counter() < deadline:
            for user, name in list(pending):
                st, body, _ = rest(server.address, "GET", f"/api/v1/clusters/{name}", user)
                if st == 200 and isinstance(body, dict) and body.get("status") in ("RUNNING", "FAILED", "STOPPED"):
                    pending.discard((user, name))
            time.sleep(0.5)
        all_running = time.perf_counter() - t0 if not pending else None
        for user, name in names:
            rest(server.address, "DELETE", f"/api/v1/clusters/{name}", user)
        wait_no_pids_under(server.clusters_root, 120)
        res = {"users": users, "statuses": statuses,
               "create_latency_s": {"p50": round(percentile(lat, 0.5), 3),
                                    "p99": round(percentile(lat, 0.99), 3),
                                    "max": round(max(lat), 3)},
               "all_running_s": round(all_running, 2) if all_running else None,
               "not_running": len(pending)}
        results[server.name]["burst"] = res
        say(f"  {server.name:9} answers {statuses}, create p50 {res['create_latency_s']['p50']:.3f} s, "
            f"p99 {res['create_latency_s']['p99']:.3f} s; all RUNNING after "
            + (f"{all_running:.1f} s" if all_running else f"-- ({len(pending)} never did)"))


def measure_scale(sides, rounds, workers, results):
    say(f"== scale 0 -> {workers} workers connected, {rounds} rounds")
    rows = {s.server.name: [] for s in sides}
    for i in range(rounds):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            cluster = side.new_cluster()
            client = side.client(cluster)
            t0 = time.perf_counter()
            cluster.scale(workers)
            t1 = time.perf_counter()
            while len(client.scheduler_info(n_workers=-1)["workers"]) < workers:
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError(f"{side.server.name}: scale to {workers} took over 300 s")
                time.sleep(0.05)
            t2 = time.perf_counter()
            row = {"total_s": round(t2 - t0, 3), "scale_call_s": round(t1 - t0, 4)}
            rows[side.server.name].append(row)
            say(f"  {side.server.name:9} round {i + 1}: {row['total_s']:.3f} s "
                f"(scale() returned after {row['scale_call_s'] * 1000:.1f} ms)")
            side.stop(cluster, client)
    for name, r in rows.items():
        results[name]["scale"] = {"workers": workers, "rounds": r,
                                  "median_s": median([x["total_s"] for x in r])}


async def echo_run(addr, conn_args, payload, round_trips, cpu_pids):
    """Round trips of `payload` to the scheduler's `echo` handler over one Dask TLS comm (after
    one uncounted warm-up). Returns MiB/s (bytes counted in both directions) and the CPU
    seconds each of cpu_pids ({role: pid}) used during the counted round trips."""
    from distributed.comm import connect
    from distributed.protocol import to_serialize

    comm = await connect(addr, **conn_args)
    try:
        msg = {"op": "echo", "data": to_serialize(payload), "reply": True}
        await comm.write(msg)
        await comm.read()
        c0 = {k: proc_stat(pid)[2] for k, pid in cpu_pids.items()}
        t0 = time.perf_counter()
        for _ in range(round_trips):
            await comm.write(msg)
            back = await comm.read()
        wall = time.perf_counter() - t0
        cpu = {k: proc_stat(pid)[2] - c0[k] for k, pid in cpu_pids.items()}
        if len(back) != len(payload):
            raise RuntimeError(f"echo returned {len(back)} bytes, sent {len(payload)}")
    finally:
        await comm.close()
    return 2 * len(payload) * round_trips / wall / 2**20, cpu


def measure_proxy(sides, payload_mib, round_trips, results):
    relayed_gib = 2 * payload_mib * round_trips / 1024
    say(f"== proxy: {round_trips} echo round trips of {payload_mib} MiB to a scheduler through the "
        f"gateway's scheduler proxy ({relayed_gib:g} GiB relayed, both directions counted), on a "
        "fresh cluster without workers; then the same directly to the scheduler")
    payload = os.urandom(payload_mib * 2**20)
    for side in sides:
        cluster = side.new_cluster()
        client = side.client(cluster)
        try:
            conn_args = cluster.security.get_connection_args("client")
            direct = client.scheduler_info()["address"]
            pids = dict(side.server.server_pids())
            pids["relay"] = side.server.proxy_pid()
            via, cpu = asyncio.run(echo_run(cluster.scheduler_address, conn_args, payload,
                                            round_trips, pids))
            direct_mib_s, _ = asyncio.run(echo_run(direct, conn_args, payload, round_trips, {}))
        finally:
            side.stop(cluster, client)
        server_cpu = sum(v for k, v in cpu.items() if k != "relay")
        res = {
            "payload_mib": payload_mib, "round_trips": round_trips, "relayed_gib": relayed_gib,
            "via_proxy_mib_s": round(via, 1),
            "direct_mib_s": round(direct_mib_s, 1),
            "proxy_cpu_s_per_gib": round(cpu["relay"] / relayed_gib, 3),
            "server_cpu_s_per_gib": round(server_cpu / relayed_gib, 3),
        }
        results[side.server.name]["proxy"] = res
        say(f"  {side.server.name:9}: via the proxy {via:.0f} MiB/s (direct {direct_mib_s:.0f} MiB/s), "
            f"proxy process CPU {res['proxy_cpu_s_per_gib'] * 1000:.0f} ms per GiB "
            f"(all server processes {res['server_cpu_s_per_gib'] * 1000:.0f} ms per GiB)")


def measure_rss_clusters(sides, n, results):
    say(f"== server RSS with {n} running clusters")
    for side in sides:
        t0 = time.time()
        names = [side.gateway.submit() for _ in range(n)]
        side.names.update(names)
        pending = set(names)
        while pending:
            if time.time() - t0 > 300:
                raise RuntimeError(f"{side.server.name}: {len(pending)} clusters not running after 300 s")
            for c in side.gateway.list_clusters():
                if c.status.name == "RUNNING":
                    pending.discard(c.name)
                elif c.status.name == "FAILED":
                    raise RuntimeError(f"{side.server.name}: cluster {c.name} failed")
            time.sleep(0.2)
        all_running = time.time() - t0
        time.sleep(1.0)
        total, per = side.server.rss()
        results[side.server.name]["rss_clusters"] = {
            "clusters": n, "kib": total, "per_process_kib": per, "all_running_s": round(all_running, 2)}
        say(f"  {side.server.name:9}: {total / 1024:.1f} MiB "
            + ", ".join(f"{k} {v / 1024:.1f}" for k, v in per.items())
            + f" ({n} clusters running after {all_running:.1f} s)")
        side.stop(names=names)


# -- report --------------------------------------------------------------------------------
def rows_from(results, args):
    ours, ref = results["ours"], results["reference"]
    rows = []

    def add(measure, unit, path, fmt="{:.0f}", scale=1.0, ref_path=None):
        def get(d):
            for k in path:
                if not isinstance(d, dict) or k not in d or d[k] is None:
                    return None
                d = d[k]
            return d * scale
        r, o = get(ref), get(ours)
        if ref_path is not None:
            path = ref_path
            r = get(ref)
        rows.append({"measure": measure, "unit": unit, "reference": r, "ours": o,
                     "ratio": (o / r) if (r and o is not None) else None, "fmt": fmt})

    for c in args.connections:
        k = str(c)
        add(f"API req/s, {c} caller{'s' if c > 1 else ''}", "req/s", ["api_basic", k, "requests_per_s"])
        callers = f"{c} caller{'s' if c > 1 else ''}"
        add(f"API p50 latency, {callers}", "ms", ["api_basic", k, "latency_ms", "p50"], "{:.3f}")
        add(f"API p99 latency, {callers}", "ms", ["api_basic", k, "latency_ms", "p99"], "{:.3f}")
        add(f"server CPU per request, {callers}", "µs", ["api_basic", k, "server_cpu_us_per_request"], "{:.1f}")
    add("API req/s, 16 callers, session cookie", "req/s", ["api_cookie_16", "requests_per_s"])
    add("API p99 latency, 16 callers, cookie", "ms", ["api_cookie_16", "latency_ms", "p99"], "{:.3f}")
    add("API req/s, 16 callers, ours on one worker thread", "req/s",
        ["api_basic_one_thread_16", "requests_per_s"], ref_path=["api_basic", "16", "requests_per_s"])
    add("API p99 latency, 16 callers, ours on one worker thread", "ms",
        ["api_basic_one_thread_16", "latency_ms", "p99"], "{:.3f}",
        ref_path=["api_basic", "16", "latency_ms", "p99"])
    add("create → client connected (median)", "s", ["create_connected", "median_s"], "{:.2f}")
    add("create → client connected, ours from a warm pool (median)", "s",
        ["create_connected_warm", "median_s"], "{:.3f}", ref_path=["create_connected", "median_s"])
    add(f"scale 0 → {args.workers} workers connected (median)", "s", ["scale", "median_s"], "{:.2f}")
    add(f"burst of {args.burst} creates: p99 answer", "s", ["burst", "create_latency_s", "p99"], "{:.3f}")
    add(f"burst of {args.burst} creates: all RUNNING", "s", ["burst", "all_running_s"], "{:.1f}")
    add("proxy CPU per GiB relayed", "ms", ["proxy", "proxy_cpu_s_per_gib"], "{:.0f}", 1000.0)
    add("proxy throughput (scheduler echo)", "MiB/s", ["proxy", "via_proxy_mib_s"])
    add("server RSS idle", "MiB", ["rss_idle", "kib"], "{:.1f}", 1 / 1024)
    add(f"server RSS with {args.clusters} clusters", "MiB", ["rss_clusters", "kib"], "{:.1f}", 1 / 1024)
    return [r for r in rows if r["reference"] is not None or r["ours"] is not None]


def markdown(rows, ref_label):
    out = [f"| measure | {ref_label} | ours | ours/reference |", "|---|---:|---:|---:|"]
    for r in rows:
        def cell(v):
            return "–" if v is None else r["fmt"].format(v) + f" {r['unit']}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3g}"
        out.append(f"| {r['measure']} | {cell(r['reference'])} | {cell(r['ours'])} | {ratio} |")
    return "\n".join(out)


def package_versions(python):
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            "['dask', 'distributed', 'dask-gateway', 'bokeh', 'numpy', 'tornado', 'msgpack']}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


# -- main ----------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="our release gateway-server binary")
    p.add_argument("--venv", required=True, help="our Dask venv (tests/env/python-venv)")
    p.add_argument("--ref-venv", required=True)
    p.add_argument("--ref-version", required=True)
    p.add_argument("--work", required=True, help="an empty directory this run owns")
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="api,create,warm,scale,burst,proxy,rss",
                   help="comma-separated parts: api, create, warm, scale, burst, proxy, rss")
    p.add_argument("--burst", type=int, default=10 if QUICK else 50,
                   help="users creating a cluster at the same moment (burst part)")
    p.add_argument("--duration", type=float, default=env_float("BENCH_DURATION", 2 if QUICK else 10))
    p.add_argument("--warmup", type=float, default=env_float("BENCH_WARMUP", 1 if QUICK else 2))
    p.add_argument("--connections", default="1,16,64")
    p.add_argument("--wrk-threads", type=int, default=1,
                   help="wrk threads (default 1: leaves the other core to the server)")
    p.add_argument("--rounds", type=int, default=int(env_float("BENCH_ROUNDS", 1 if QUICK else 3)))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--clusters", type=int, default=3 if QUICK else 10)
    p.add_argument("--payload-mib", type=int, default=64)
    p.add_argument("--round-trips", type=int, default=2 if QUICK else 8,
                   help="echo round trips (8 x 64 MiB both ways = 1 GiB relayed)")
    args = p.parse_args()
    args.connections = [int(c) for c in args.connections.split(",")]
    parts = set(args.only.split(","))
    unknown = parts - {"api", "create", "warm", "scale", "burst", "proxy", "rss"}
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    warnings.simplefilter("ignore")

    # SIGTERM (from scripts/bench-compare's cleanup) unwinds like Ctrl-C, through the finally.
    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    ours_py = os.path.join(args.venv, "bin", "python")
    ref_py = os.path.join(args.ref_venv, "bin", "python")
    versions = {"ours_venv": package_versions(ours_py), "reference_venv": package_versions(ref_py)}
    for k in ("dask", "distributed", "dask-gateway"):
        if versions["ours_venv"][k] != versions["reference_venv"][k]:
            note(f"WARNING: {k} differs: ours {versions['ours_venv'][k]}, "
                 f"reference venv {versions['reference_venv'][k]}")
    try:
        git_rev = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                                  "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        git_rev = ""

    info = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "load_average_start": loadavg(),
        "quick": QUICK,
        "reference": {"package": "dask-gateway-server", "version": args.ref_version},
        "ours": {"git": git_rev, "binary": args.server},
        "python": platform.python_version(),
        "versions": versions,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
    }
    say(f"machine: {info['machine']['cores']} cores, {info['machine']['cpu']}, load average "
        f"{info['load_average_start']}; reference dask-gateway-server {args.ref_version}; "
        f"dask {versions['ours_venv']['dask']}, distributed {versions['ours_venv']['distributed']}")

    results = {"ours": {}, "reference": {}}
    servers = []
    sides = []
    rc = 0
    try:
        servers.append(Ours(args.work, args.server, args.venv))
        servers.append(Reference(args.work, args.ref_venv, args.ref_version,
                                 os.environ.get("BENCH_REF_LOG_LEVEL", "INFO")))
        for s in servers:
            s.wait_ready()
        info["config"] = {s.name: s.config_text for s in servers}
        time.sleep(2.0)  # let both settle before the idle RSS
        for s in servers:
            total, per = s.rss()
            results[s.name]["rss_idle"] = {"kib": total, "per_process_kib": per}
        say("== server RSS idle: " + "; ".join(
            f"{s.name} {results[s.name]['rss_idle']['kib'] / 1024:.1f} MiB "
            f"({', '.join(f'{k} {v / 1024:.1f}' for k, v in results[s.name]['rss_idle']['per_process_kib'].items())})"
            for s in servers))

        if "api" in parts:
            measure_api(servers, args, results, args.work)
        if "burst" in parts:
            measure_burst(servers, args.burst, results)
        if parts & {"create", "warm", "scale", "proxy", "rss"}:
            sides = [DaskSide(s) for s in servers]
            if "proxy" in parts:
                measure_proxy(sides, args.payload_mib, args.round_trips, results)
            if "create" in parts:
                measure_create(sides, args.rounds, results)
            if "warm" in parts:
                measure_create_warm(args.work, args.server, args.venv, args.rounds, results)
            if "scale" in parts:
                measure_scale(sides, args.rounds, args.workers, results)
            if "rss" in parts:
                measure_rss_clusters(sides, args.clusters, results)
    except BaseException as exc:  # noqa: BLE001
        rc = 130 if isinstance(exc, KeyboardInterrupt) else 1
        if rc == 1:
            import traceback

            traceback.print_exc()
            for s in servers:
                note(f"last lines of the {s.name} server log:\n{s.log_tail()}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for side in sides:
            try:
                side.stop_all()
            except Exception:  # noqa: BLE001
                pass
        for s in servers:
            s.stop()
        left = pids_with_cwd_under(args.work)
        if left:
            note(f"killing leftover processes in the work directory: {left}")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            wait_no_pids_under(args.work, 10)

    if rc == 0:
        info["load_average_end"] = loadavg()
        rows = rows_from(results, args)
        ref_label = f"reference {args.ref_version}"
        table = markdown(rows, ref_label)
        summary = dict(info, results=results,
                       table=[{k: v for k, v in r.items() if k != "fmt"} for r in rows])
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
        say("")
        say(f"Load average at start {info['load_average_start']}, at end {info['load_average_end']}; "
            f"{info['machine']['cores']} cores.")
        say("")
        say(table)
        say("")
        say("ours/reference: above 1 is better for req/s and throughput, below 1 for everything else.")
        note(f"summary written to {args.out}")
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the stock client's finalizers can block on its loop thread.
    os._exit(rc)


if __name__ == "__main__":
    main()
