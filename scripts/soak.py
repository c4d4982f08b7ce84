"""Soak driver for scripts/soak: users looping over the cluster lifecycle with the stock client
while workers and the gateway itself are killed; checks results, leftovers and memory."""

import gc
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from dask_gateway import BasicAuth, Gateway

WORK = os.environ["SOAK_WORK"]
SERVER = os.environ["SOAK_SERVER"]
VENV = os.environ["SOAK_VENV"]
MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))
USERS = int(os.environ.get("SOAK_USERS", "3"))
RESTART_EVERY = float(os.environ.get("SOAK_RESTART_EVERY", "180"))

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
PORT = sock.getsockname()[1]
sock.close()
ADDRESS = f"http://127.0.0.1:{PORT}"
CONFIG = os.path.join(WORK, "gateway.yaml")
with open(CONFIG, "w") as f:
    f.write(
        f"address: 127.0.0.1:{PORT}\n"
        f"data_dir: {WORK}/data\n"
        f"dask: {{python_env: {VENV}}}\n"
        "cluster: {worker_memory: 512M, scheduler_memory: 512M, max_workers: 3,"
        " heartbeat_period: 5, adaptive_period: 1}\n"
    )
LOG = open(os.path.join(WORK, "gateway.log"), "ab")
lock = threading.Lock()
stats = {"cycles": 0, "computations": 0, "errors": 0, "restarts": 0, "worker_kills": 0}
errors = []
gateway = None


def start_gateway():
    global gateway
    gateway = subprocess.Popen([SERVER, "--config", CONFIG], stdout=LOG, stderr=LOG)
    for _ in range(200):
        try:
            urllib.request.urlopen(ADDRESS + "/api/health", timeout=1)
            return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("gateway did not start")


def rss_kib():
    with open(f"/proc/{gateway.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def note(kind, exc):
    with lock:
        stats["errors"] += 1
        errors.append(f"{kind}: {type(exc).__name__}: {exc}")


def user_loop(i, deadline):
    rng = random.Random(i)
    g = Gateway(ADDRESS, auth=BasicAuth(f"soak-user-{i}", ""))
    while time.time() < deadline:
        try:
            cluster = g.new_cluster(shutdown_on_close=True)
            with cluster:
                client = cluster.get_client(set_as_default=False)
                if rng.random() < 0.5:
                    cluster.scale(rng.randint(1, 3))
                else:
                    cluster.adapt(minimum=1, maximum=3)
                for _ in range(rng.randint(1, 4)):
                    n = rng.randint(10, 200)
                    got = client.submit(sum, range(n), pure=False).result(timeout=180)
                    if got != n * (n - 1) // 2:
                        raise AssertionError(f"sum(range({n})) gave {got}")
                    with lock:
                        stats["computations"] += 1
                client.close()
            with lock:
                stats["cycles"] += 1
        except Exception as e:  # keep soaking; counted and reported at the end
            note(f"user {i}", e)
            time.sleep(2)
    g.close()


def chaos(deadline):
    rng = random.Random(99)
    last_restart = time.time()
    while time.time() < deadline:
        time.sleep(rng.uniform(5, 15))
        # Kill a random worker (nanny process group leader) of some cluster.
        workers = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if cwd.startswith(WORK) and b"worker" in cmd and os.getpgid(int(pid)) == int(pid):
                workers.append(int(pid))
        if workers:
            try:
                os.kill(rng.choice(workers), signal.SIGKILL)
                with lock:
                    stats["worker_kills"] += 1
            except ProcessLookupError:
                pass
        if time.time() - last_restart > RESTART_EVERY:
            gateway.kill()
            gateway.wait()
            start_gateway()
            last_restart = time.time()
            with lock:
                stats["restarts"] += 1


def main():
    # The stock client's finalizers can deadlock on distributed's loop lock when the garbage
    # collector runs them on another thread: collect never during the soak (it is bounded).
    gc.disable()
    start_gateway()
    rss_start = rss_kib()
    deadline = time.time() + MINUTES * 60
    threads = [threading.Thread(target=user_loop, args=(i, deadline)) for i in range(USERS)]
    threads.append(threading.Thread(target=chaos, args=(deadline,)))
    for t in threads:
        t.start()
    peak = rss_start
    hard_stop = deadline + 300
    while any(t.is_alive() for t in threads) and time.time() < hard_stop:
        time.sleep(2)
        peak = max(peak, rss_kib())
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        errors.append(f"threads still running 5 min after the deadline: {hung}")
    # A shutdown sent while the gateway was being restarted never arrived (the client only logs
    # that): as a user would, list what is left and stop it. Then the gateway must hold nothing.
    for i in range(USERS):
        g = Gateway(ADDRESS, auth=BasicAuth(f"soak-user-{i}", ""))
        for report in g.list_clusters():
            g.stop_cluster(report.name)
            with lock:
                stats["left_by_failed_shutdowns"] = stats.get("left_by_failed_shutdowns", 0) + 1
    active = []
    for _ in range(60):
        metrics = urllib.request.urlopen(ADDRESS + "/metrics").read().decode()
        active = [l for l in metrics.splitlines() if l.startswith(
            ('dask_gateway_clusters{status="pending"}', 'dask_gateway_clusters{status="running"}',
             'dask_gateway_clusters{status="stopping"}'))]
        if all(l.endswith(" 0") for l in active):
            break
        time.sleep(0.5)
    rss_end = rss_kib()
    gateway.terminate()  # clusters of hung users stay; the wrapper script reports and kills them
    gateway.wait(timeout=30)
    print(f"soak: {MINUTES:g} min, {USERS} users: {stats}")
    print(f"soak: gateway RSS start {rss_start} KiB, peak {peak} KiB, end {rss_end} KiB")
    print("soak: " + "; ".join(active))
    for e in errors[:20]:
        print("soak: error:", e)
    # Errors right around a deliberate gateway kill are expected (requests in flight); anything
    # beyond a few per restart, a wrong result, or an active cluster left over is a failure.
    ok = (
        not hung
        and not any("AssertionError" in e for e in errors)
        and stats["errors"] <= 3 * (stats["restarts"] + 1)
        and all(l.endswith(" 0") for l in active)
        and peak < 64 * 1024
    )
    print("soak: PASS" if ok else "soak: FAIL")
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # do not run the client's finalizers at exit either


if __name__ == "__main__":
    main()
