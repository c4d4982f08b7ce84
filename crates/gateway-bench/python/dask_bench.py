"""The Dask-side measurements of scripts/bench, driven with the stock dask-gateway client.

Run by scripts/bench against a gateway it started; prints one line per metric and writes a JSON
object to --json. Every cluster it creates is shut down before it exits (also on errors).

Gateway-side timestamps come from the gateway's log (INFO lines "cluster created, scheduler
starting", "cluster running", "worker starting"), so that time spent in the gateway can be told
apart from time Python/Dask needs to start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

from dask_gateway import BasicAuth, Gateway
from dask_gateway.client import ClusterStatus
from distributed.comm import connect
from distributed.protocol import to_serialize

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_LINE = re.compile(r"^(\S+Z)\s+\w+\s+\S+ (.*)$")


# When the client's `GET /api/v1/clusters/<name>?wait` first answered RUNNING, per cluster.
RUNNING_SEEN = {}
_cluster_report = Gateway._cluster_report


async def _observed_cluster_report(self, cluster_name, wait=False):
    report = await _cluster_report(self, cluster_name, wait=wait)
    if report.status is ClusterStatus.RUNNING:
        RUNNING_SEEN.setdefault(cluster_name, time.time())
    return report


Gateway._cluster_report = _observed_cluster_report


def log_events(path, message, cluster=None):
    """Unix times of gateway log lines with this message (and cluster=<name>)."""
    out = []
    with open(path, "rb") as f:
        text = ANSI.sub("", f.read().decode("utf-8", "replace"))
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if not m or message not in m.group(2):
            continue
        if cluster is not None and f"cluster={cluster}" not in m.group(2):
            continue
        ts = m.group(1).rstrip("Z")
        if "." in ts:
            head, frac = ts.split(".")
            ts = f"{head}.{frac[:6]}"
        t = dt.datetime.fromisoformat(ts).replace(tzinfo=dt.timezone.utc).timestamp()
        out.append(t)
    return out


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def ms(seconds):
    return round(seconds * 1000.0, 1)


def say(line):
    print(line, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.gateway = Gateway(args.address, auth=BasicAuth(args.user))
        self.names = set()
        self.results = {}
        # Every client-side object stays referenced until the process ends: a stock `Gateway`
        # garbage-collected on the client's event-loop thread deadlocks in its __del__
        # (close() -> sync() onto the very loop that is running it).
        self.keep = []

    # -- helpers --------------------------------------------------------------------------
    def new_cluster(self):
        cluster = self.gateway.new_cluster(shutdown_on_close=True)
        self.names.add(cluster.name)
        self.keep.append(cluster)
        return cluster

    def client(self, cluster):
        client = cluster.get_client(set_as_default=False)
        self.keep.append(client)
        return client

    def shutdown_all(self):
        for name in list(self.names):
            with contextlib.suppress(Exception):
                self.gateway.stop_cluster(name)
        deadline = time.time() + 60
        for name in list(self.names):
            while time.time() < deadline:
                try:
                    status = self.gateway.get_cluster(name).status.name
                except Exception:  # noqa: BLE001
                    break
                if status in ("STOPPED", "FAILED"):
                    break
                time.sleep(0.1)
            self.names.discard(name)

    def wait_stopped(self, name, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.gateway.get_cluster(name).status.name in ("STOPPED", "FAILED"):
                return
            time.sleep(0.05)

    # -- create -> connected --------------------------------------------------------------
    def create_connect(self, rounds):
        rows = []
        for i in range(rounds):
            t0 = time.time()
            cluster = self.new_cluster()
            t1 = time.time()
            client = self.client(cluster)
            client.scheduler_info()  # a round trip through the proxy
            t2 = time.time()
            created = log_events(self.args.log, "cluster created", cluster.name)
            running = log_events(self.args.log, "cluster running", cluster.name)
            row = {
                "total_ms": ms(t2 - t0),
                "new_cluster_ms": ms(t1 - t0),
                "get_client_ms": ms(t2 - t1),
            }
            seen = RUNNING_SEEN.get(cluster.name)
            if created and running and seen:
                # request -> scheduler process spawned; spawn -> scheduler's first heartbeat
                # (Dask start-up); heartbeat -> the client's ?wait long-poll answered RUNNING;
                # that answer -> new_cluster() returned (client TLS context + first comm to the
                # scheduler through the proxy).
                row["gateway_spawn_ms"] = ms(created[0] - t0)
                row["scheduler_boot_ms"] = ms(running[0] - created[0])
                row["running_to_wait_answer_ms"] = ms(seen - running[0])
                row["client_setup_ms"] = ms(t1 - seen)
            rows.append(row)
            say(f"  create->connected round {i + 1}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
            client.close()
            cluster.close(shutdown=True)
            self.wait_stopped(cluster.name)
            self.names.discard(cluster.name)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        self.results["create_connected"] = {"rounds": rows, "median": med}
        line = (f"create -> get_client() connected: {med['total_ms']:.0f} ms median of {rounds} "
                f"(new_cluster {med['new_cluster_ms']:.0f} ms + get_client {med['get_client_ms']:.0f} ms)")
        if "gateway_spawn_ms" in med:
            line += (f"; of which gateway request->scheduler spawned {med['gateway_spawn_ms']:.0f} ms, "
                     f"Dask scheduler boot->first heartbeat {med['scheduler_boot_ms']:.0f} ms, "
                     f"heartbeat->?wait answered RUNNING {med['running_to_wait_answer_ms']:.1f} ms, "
                     f"client-side setup {med['client_setup_ms']:.0f} ms")
        say("RESULT " + line)

    # -- scale 0 -> 8 ---------------------------------------------------------------------
    def scale(self, n, rounds):
        rows = []
        for i in range(rounds):
            cluster = self.new_cluster()
            client = self.client(cluster)
            t0 = time.time()
            cluster.scale(n)
            t1 = time.time()
            while len(client.scheduler_info(n_workers=-1)["workers"]) < n:
                if time.time() - t0 > 120:
                    raise RuntimeError(f"scale to {n} did not finish in 120 s")
                time.sleep(0.05)
            t2 = time.time()
            starts = log_events(self.args.log, "worker starting", cluster.name)
            row = {"total_ms": ms(t2 - t0), "scale_call_ms": ms(t1 - t0)}
            if len(starts) >= n:
                row["gateway_first_worker_spawned_ms"] = ms(starts[0] - t0)
                row["gateway_last_worker_spawned_ms"] = ms(starts[n - 1] - t0)
            rows.append(row)
            say(f"  scale 0->{n} round {i + 1}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
            if i == rounds - 1:
                last = (cluster, client)
                break
            client.close()
            cluster.close(shutdown=True)
            self.wait_stopped(cluster.name)
            self.names.discard(cluster.name)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        self.results["scale"] = {"workers": n, "rounds": rows, "median": med}
        line = (f"scale 0->{n} workers (all connected to the scheduler): {med['total_ms']:.0f} ms "
                f"median of {rounds}")
        if "gateway_last_worker_spawned_ms" in med:
            line += (f"; gateway had spawned worker 1 after {med['gateway_first_worker_spawned_ms']:.0f} ms "
                     f"and worker {n} after {med['gateway_last_worker_spawned_ms']:.0f} ms "
                     f"(the rest is Dask worker start-up on {os.cpu_count()} cores)")
        say("RESULT " + line)
        # The proxy measurement uses the last cluster, with its workers idle.
        cluster, client = last
        self.proxy_throughput(cluster, client)
        client.close()
        cluster.close(shutdown=True)
        self.wait_stopped(cluster.name)
        self.names.discard(cluster.name)

    # -- proxy throughput -----------------------------------------------------------------
    def proxy_throughput(self, cluster, client):
        """MiB/s of the scheduler's `echo` handler over one TLS comm: through the gateway
        (`gateway://`, spliced by SNI), directly to the scheduler's `tls://` address, and through
        bare `gateway-bench splice` forwarders with 8 KiB and 64 KiB copy buffers."""
        direct = client.scheduler_info()["address"]
        via = cluster.scheduler_address
        conn_args = cluster.security.get_connection_args("client")
        size = self.args.payload_mib * 2**20
        payload = os.urandom(size)
        reps = self.args.echo_reps
        paths = {"gateway": via, "direct": direct}
        relayers = {"gateway": self.args.pid}  # path -> pid of the process relaying its bytes
        splicers = []
        try:
            if self.args.bench_bin:
                target = direct.split("://", 1)[1]
                for kib in (8, 64):
                    proc = subprocess.Popen(
                        [self.args.bench_bin, "splice", "--target", target, "--buffer-kib", str(kib)],
                        stdout=subprocess.PIPE, text=True,
                    )
                    splicers.append(proc)
                    listen = proc.stdout.readline().split()[1]
                    paths[f"splice_{kib}k"] = f"tls://{listen}"
                    relayers[f"splice_{kib}k"] = proc.pid
            r = asyncio.run(self._echo_all(paths, relayers, conn_args, payload, reps))
        finally:
            for proc in splicers:
                proc.terminate()
                proc.wait()
        med = {k: statistics.median(v) for k, v in r["mib_s"].items()}
        gw, di = med["gateway"], med["direct"]
        res = {
            "payload_mib": self.args.payload_mib,
            "round_trips": reps,
            "mib_s": {k: [round(x, 1) for x in v] for k, v in r["mib_s"].items()},
            "median_mib_s": {k: round(v, 1) for k, v in med.items()},
            "gateway_over_direct": round(gw / di, 3),
            "relay_cpu_ms_per_gib": {k: round(v, 1) for k, v in r["cpu_ms_per_gib"].items()},
            "connect_ms": {k: round(v, 2) for k, v in r["connect_ms"].items()},
        }
        self.results["proxy"] = res
        say(f"RESULT proxy throughput (scheduler echo of {self.args.payload_mib} MiB x {reps} over "
            f"TLS, bytes counted both ways, median of {self.args.echo_rounds}): via gateway {gw:.0f} "
            f"MiB/s, direct {di:.0f} MiB/s, ratio {gw / di:.2f}; gateway CPU "
            f"{r['cpu_ms_per_gib']['gateway']:.0f} ms per GiB relayed")
        if len(med) > 2:
            say("  bare gateway-bench splices to the same scheduler: " + ", ".join(
                f"{k} {v:.0f} MiB/s ({r['cpu_ms_per_gib'][k]:.0f} ms CPU per GiB)"
                for k, v in med.items() if k.startswith("splice")))
        say("  TLS comm connect (median of 20): " + ", ".join(
            f"{k} {v:.2f} ms" for k, v in r["connect_ms"].items()))

    async def _echo_all(self, paths, relayers, conn_args, payload, reps):
        size = len(payload)
        tick = os.sysconf("SC_CLK_TCK")

        def cpu_s(pid):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

        async def echo_mib_s(addr):
            comm = await connect(addr, **conn_args)
            try:
                await comm.write({"op": "echo", "data": to_serialize(payload), "reply": True})
                await comm.read()  # warm-up round trip
                t0 = time.perf_counter()
                for _ in range(reps):
                    await comm.write({"op": "echo", "data": to_serialize(payload), "reply": True})
                    back = await comm.read()
                t = time.perf_counter() - t0
                if len(back) != size:
                    raise RuntimeError(f"echo returned {len(back)} bytes, sent {size}")
            finally:
                await comm.close()
            return 2 * size * reps / t / 2**20

        async def connect_ms(addr, n=20):
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                comm = await connect(addr, **conn_args)
                times.append(time.perf_counter() - t0)
                await comm.close()
            return statistics.median(times) * 1000.0

        out = {k: [] for k in paths}
        cpu = {k: 0.0 for k in relayers}
        moved = 0
        for _ in range(self.args.echo_rounds):  # interleave the paths so they share the noise
            moved += 2 * size * (reps + 1)
            for k, addr in paths.items():
                c0 = cpu_s(relayers[k]) if k in relayers else 0.0
                out[k].append(await echo_mib_s(addr))
                if k in relayers:
                    cpu[k] += cpu_s(relayers[k]) - c0
        conn = {k: await connect_ms(addr) for k, addr in paths.items()}
        return {
            "mib_s": out,
            "cpu_ms_per_gib": {k: v * 1000.0 / (moved / 2**30) for k, v in cpu.items()},
            "connect_ms": conn,
        }

    # -- RSS with 10 clusters -------------------------------------------------------------
    def ten_clusters(self, n):
        pid = self.args.pid
        before = rss_kib(pid)
        t0 = time.time()
        names = []
        for _ in range(n):
            name = self.gateway.submit()
            self.names.add(name)
            names.append(name)
        pending = set(names)
        while pending:
            if time.time() - t0 > 180:
                raise RuntimeError(f"{len(pending)} clusters not RUNNING after 180 s")
            for c in self.gateway.list_clusters():
                if c.status.name == "RUNNING":
                    pending.discard(c.name)
                elif c.status.name == "FAILED":
                    raise RuntimeError(f"cluster {c.name} failed")
            time.sleep(0.1)
        t_all = time.time() - t0
        time.sleep(1.0)
        with_n = rss_kib(pid)
        say(f"RESULT gateway RSS with {n} running clusters: {with_n / 1024:.1f} MiB "
            f"(before {before / 1024:.1f} MiB; {n} clusters RUNNING after {t_all:.1f} s)")
        rate = None
        if self.args.bench_bin:
            out = subprocess.run(
                [self.args.bench_bin, "http", f"{self.args.address}/api/v1/clusters/",
                 "--user", self.args.user, "-c", "16", "-d", "5", "--warmup", "1", "--json"],
                check=True, capture_output=True, text=True,
            )
            rate = json.loads(out.stdout)
            say(f"RESULT API list with {n} clusters (16 callers, {rate['response_body_bytes']} B "
                f"bodies): {rate['requests_per_s']:.0f} req/s, p99 {rate['latency_ms']['p99']:.2f} ms")
            after_load = rss_kib(pid)
        for name in names:
            self.gateway.stop_cluster(name)
        for name in names:
            self.wait_stopped(name)
            self.names.discard(name)
        time.sleep(1.0)
        after = rss_kib(pid)
        say(f"  gateway RSS after stopping them: {after / 1024:.1f} MiB")
        self.results["ten_clusters"] = {
            "clusters": n,
            "rss_before_kib": before,
            "rss_with_clusters_kib": with_n,
            "rss_after_list_load_kib": after_load if rate else None,
            "rss_after_stop_kib": after,
            "all_running_s": round(t_all, 2),
            "list_load": rate,
        }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--user", default="bench")
    p.add_argument("--json")
    p.add_argument("--bench-bin")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--payload-mib", type=int, default=64)
    p.add_argument("--echo-reps", type=int, default=4)
    p.add_argument("--echo-rounds", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    b = Bench(args)
    rc = 0
    try:
        b.create_connect(args.rounds)
        b.scale(args.workers, args.rounds)
        b.ten_clusters(args.clusters)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        b.shutdown_all()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(b.results, f, indent=2)
    # Skip interpreter teardown: the stock client's finalizers can block on its loop thread.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
