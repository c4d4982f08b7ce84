"""Durability: the gateway dies (kill -9) and comes back on the same config and data_dir; its
clusters are re-adopted. And the opposite failure: a cluster's scheduler dies while the gateway
lives, and the cluster ends FAILED with its workers cleaned up.
"""

import os
import select
import shutil
import signal
import socket
import sqlite3
import threading
import time

import psutil
import pytest

from conftest import (connect, new_cluster, scheduler_log, wait_computes, wait_for,
                      wait_status, wait_workers)

pytestmark = pytest.mark.process_control

USER = "restart-user"


@pytest.fixture(scope="module")
def server(module_servers):
    # heartbeat period 2 s -> a dead scheduler is noticed within a few seconds
    return module_servers("restart", cluster={"heartbeat_period": 2})


def compute_on(cluster, n):
    with cluster.get_client(set_as_default=False) as client:
        wait_workers(client, n, timeout=90)
        futs = client.map(lambda x: x * 2, range(20), pure=False)
        assert client.gather(futs) == [x * 2 for x in range(20)]


def test_clusters_survive_gateway_kill9(server):
    gw = server.gateway(USER)
    a = new_cluster(gw, shutdown_on_close=False)
    b = new_cluster(gw, shutdown_on_close=False)
    a.scale(1)
    compute_on(a, 1)
    a_sched = server.cluster_processes(a.name, "scheduler")
    b_sched = server.cluster_processes(b.name, "scheduler")
    assert len(a_sched) == 1 and len(b_sched) == 1, (a_sched, b_sched)
    a.close()
    b.close()
    gw.close()

    server.kill9()
    assert server.proc.returncode == -signal.SIGKILL
    # the clusters' processes do not depend on the gateway process
    assert all(p.is_running() for p in a_sched + b_sched)

    server.start()
    gw2 = server.gateway(USER)
    wait_for(
        lambda: {c.name: c.status.name for c in gw2.list_clusters()}
        == {a.name: "RUNNING", b.name: "RUNNING"},
        60,
        what="both clusters listed RUNNING after restart",
    )
    # same scheduler processes, not new ones
    assert [p.pid for p in server.cluster_processes(a.name, "scheduler")] == [a_sched[0].pid]
    assert [p.pid for p in server.cluster_processes(b.name, "scheduler")] == [b_sched[0].pid]

    a2 = connect(gw2, a.name)
    b2 = connect(gw2, b.name)
    try:
        compute_on(a2, 1)  # the worker started before the restart is still there
        b2.scale(1)
        compute_on(b2, 1)
        a2.scale(2)
        compute_on(a2, 2)
        a2.scale(1)
        with a2.get_client(set_as_default=False) as client:
            wait_workers(client, 1, timeout=90)
    finally:
        a2.close()
        b2.close()
    gw2.stop_cluster(a.name)
    gw2.stop_cluster(b.name)
    wait_status(gw2, a.name, "STOPPED")
    wait_status(gw2, b.name, "STOPPED")
    wait_for(lambda: not server.cluster_processes(a.name) and not server.cluster_processes(b.name),
             60, what="re-adopted clusters' processes to exit after stop")


def test_cluster_stopped_while_gateway_down_is_failed_after_restart(server):
    # A scheduler that dies while nobody watches is noticed after the restart.
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.close()
    sched = server.cluster_processes(name, "scheduler")
    assert len(sched) == 1
    server.kill9()
    for p in server.cluster_processes(name):
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(sched, timeout=30)
    server.start()
    gw2 = server.gateway(USER)
    wait_status(gw2, name, "FAILED", timeout=90)
    assert gw2.get_cluster(name).stop_time is not None
    assert name not in [x.name for x in gw2.list_clusters()]


def test_an_idle_timeout_that_passes_while_the_gateway_is_down_still_stops_the_cluster(
        module_servers):
    # The scheduler asks once to be stopped when idle; that request meets a dead gateway.
    srv = module_servers("idle-restart", cluster={"idle_timeout": 5})
    gw = srv.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.close()
    gw.close()
    srv.kill9()
    wait_for(lambda: "has been idle" in scheduler_log(srv, name), 60,
             what="the scheduler to ask, in vain, to be stopped")
    srv.start()
    gw2 = srv.gateway(USER)
    # The gateway finds the idleness itself: the cluster does not run idle for good.
    wait_status(gw2, name, "STOPPED", timeout=60)
    r = srv.http("GET", f"/api/v1/clusters/{name}/events", user=USER)
    assert r.status == 200, (r.status, r.body)
    messages = [e["message"] for e in r.json()["events"]]
    assert any("request to stop never arrived" in m for m in messages), messages
    # A cluster that works is not stopped however long it runs past the timeout, including
    # while its work waits for a worker that takes longer than the timeout to start.
    busy = new_cluster(gw2, shutdown_on_close=False)
    with busy.get_client(set_as_default=False) as client:
        fut = client.submit(time.sleep, 12, pure=False)
        busy.scale(1)
        fut.result(timeout=120)
        assert gw2.get_cluster(busy.name).status.name == "RUNNING"
    busy.shutdown()


def test_scheduler_death_marks_cluster_failed(server):
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.scale(1)
    compute_on(c, 1)
    c.close()
    sched = server.cluster_processes(name, "scheduler")
    workers = server.cluster_processes(name, "worker")
    assert len(sched) == 1 and workers, (sched, workers)

    os.kill(sched[0].pid, signal.SIGKILL)
    # heartbeat timeout = 2 x 2 s; generous deadline
    seen = wait_status(gw, name, ("FAILED", "STOPPED"), timeout=60)
    assert seen == "FAILED"
    report = gw.get_cluster(name)
    assert report.stop_time is not None
    assert report.tls_cert is None and report.dashboard_link is None
    assert name not in [x.name for x in gw.list_clusters()]
    assert name in [x.name for x in gw.list_clusters(status="failed")]
    # the orphaned workers are cleaned up by the gateway
    wait_for(lambda: not server.cluster_processes(name), 60,
             what="workers of the failed cluster to be stopped")


def restart_and_finish(server, name):
    """Starts the gateway again; its cluster `name` is RUNNING, scales, computes and stops."""
    server.start()
    gw = server.gateway(USER)
    wait_status(gw, name, "RUNNING", timeout=60)
    c = connect(gw, name, shutdown_on_close=True)
    c.scale(1)
    compute_on(c, 1)
    c.close()
    wait_status(gw, name, "STOPPED")


def a_cluster_then_sigterm(server):
    """A running cluster (its name and scheduler processes), then the gateway stopped."""
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.close()
    sched = server.cluster_processes(name, "scheduler")
    server.terminate()
    assert server.proc.returncode is not None
    return name, sched


def refused_restart(server, sched, why):
    """The gateway refuses to start, saying `why`, and leaves the cluster's scheduler alone."""
    with pytest.raises(pytest.fail.Exception, match="exited with"):
        server.start(timeout=30)
    log = server.log_tail()
    assert why in log, log
    assert all(p.is_running() for p in sched), "the cluster's scheduler was left alone"


def test_sigterm_keeps_clusters_by_default(server):
    name, sched = a_cluster_then_sigterm(server)
    assert all(p.is_running() for p in sched)
    restart_and_finish(server, name)


@pytest.mark.local_only  # the local backend's state database
def test_a_lost_state_database_stops_the_restart_not_the_clusters(server):
    name, sched = a_cluster_then_sigterm(server)
    files = [server.data_dir / f"gateway.sqlite{s}" for s in ("", "-wal", "-shm")]
    moved = [(f, f.with_name(f.name + ".moved")) for f in files if f.exists()]
    for f, away in moved:
        f.rename(away)
    # Starting would make an empty database and stop every process no record accounts for.
    refused_restart(server, sched, "gateway.sqlite is missing")
    for f, away in moved:
        away.rename(f)
    restart_and_finish(server, name)


@pytest.mark.local_only  # the local backend's state database
def test_a_damaged_record_stops_the_restart_naming_its_cluster(server):
    name, sched = a_cluster_then_sigterm(server)
    db = sqlite3.connect(server.data_dir / "gateway.sqlite")
    (settings,) = db.execute("SELECT settings FROM clusters WHERE name = ?", (name,)).fetchone()
    with db:
        db.execute("UPDATE clusters SET settings = '{oops' WHERE name = ?", (name,))
    refused_restart(server, sched, f"the record of cluster {name} is damaged (column settings:")
    with db:
        db.execute("UPDATE clusters SET settings = ? WHERE name = ?", (settings, name))
    db.close()
    restart_and_finish(server, name)


@pytest.mark.local_only  # the local backend's cluster directories
def test_a_clusters_deleted_files_come_back_for_its_new_workers(server):
    # A cleaner of old files (tmpfiles, a cron job) or a careless operator removes a running
    # cluster's credentials and logs: the next workers still start and join.
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=True)
    cluster_dir = server.data_dir / "clusters" / c.name
    shutil.rmtree(cluster_dir / ".certs")
    shutil.rmtree(cluster_dir / "logs")
    c.scale(1)
    compute_on(c, 1)
    assert (cluster_dir / ".certs" / "dask.pem").stat().st_mode & 0o777 == 0o600
    c.close()


@pytest.mark.local_only  # processes on the gateway's machine
@pytest.mark.parametrize("cwd", [None, "/"], ids=["in-its-directory", "gone-elsewhere"])
def test_a_process_a_scheduler_starts_in_a_session_of_its_own_stops_with_the_cluster(server, cwd):
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name

    def escape(cwd):
        import subprocess
        return subprocess.Popen(["sleep", "777"], start_new_session=True, cwd=cwd).pid

    with c.get_client(set_as_default=False) as client:
        pid = client.run_on_scheduler(escape, cwd)
    stray = psutil.Process(pid)
    assert stray.is_running() and os.getpgid(pid) == pid, "out of the scheduler's group"
    c.shutdown()
    wait_status(gw, name, "STOPPED")

    def gone():
        try:
            return not stray.is_running() or stray.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, 30, what="the scheduler's stray process to be stopped with its cluster")


def test_sigterm_with_stop_clusters_on_shutdown(module_servers):
    srv = module_servers("stop-on-shutdown", stop_clusters_on_shutdown=True)
    gw = srv.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    c.close()
    procs = srv.cluster_processes(name)
    assert procs
    srv.terminate(timeout=60)
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"cluster processes survived a shutdown with stop_clusters_on_shutdown: {alive}"
    srv.start()
    gw2 = srv.gateway(USER)
    status = gw2.get_cluster(name).status.name
    assert status in ("STOPPED", "FAILED"), status
    assert name not in [x.name for x in gw2.list_clusters()]


@pytest.mark.local_only  # process groups of local workers; test_kube.py covers pods
def test_killed_worker_is_replaced_and_its_process_group_cleaned(server):
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    try:
        c.scale(1)
        compute_on(c, 1)
        # The `dask worker` nanny leads its own process group; its worker process is in it.
        leaders = [p for p in server.cluster_processes(name, "worker") if os.getpgid(p.pid) == p.pid]
        assert len(leaders) == 1, leaders
        old_group = leaders[0].pid
        os.kill(old_group, signal.SIGKILL)

        def group_gone():
            for p in psutil.process_iter(["pid"]):
                try:
                    if os.getpgid(p.pid) == old_group and p.status() != psutil.STATUS_ZOMBIE:
                        return False
                except (ProcessLookupError, psutil.NoSuchProcess):
                    continue
            return True

        wait_for(group_gone, 30, what="every process of the killed worker's group to exit")
        # The scheduler still wants one worker: the gateway starts a replacement.
        compute_on(c, 1)
        assert gw.get_cluster(name).status.name == "RUNNING"
    finally:
        gw.stop_cluster(name)


def test_connected_client_survives_gateway_kill9(server):
    """A user's open Client reconnects through the restarted gateway and keeps working."""
    gw = server.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    try:
        c.scale(1)
        client = c.get_client(set_as_default=False)
        wait_workers(client, 1, timeout=90)
        assert client.submit(lambda x: x + 1, 1, pure=False).result(timeout=60) == 2

        server.kill9()
        server.start()
        wait_computes(client, 90, what="the open client to compute after the restart")
        client.close()
    finally:
        c.close()
        server.gateway(USER).stop_cluster(name)


def test_a_killed_gateway_never_drops_a_connection_before_the_client_speaks(server_factory):
    """Clients that reconnect the instant their connection breaks (as the stock client's comm
    does) must never meet a connection that the gateway accepted and then closed before they
    sent anything: the stock connector turns that into a ValueError and the Client gives up for
    good. Without TCP_DEFER_ACCEPT a gateway killed with SIGKILL did exactly that to a few
    reconnects each time (Linux resets its accept queue as it closes the listener, after the
    established connections)."""
    srv = server_factory("drops")
    stop = threading.Event()
    dropped, reconnected = [], [0]

    def holder():
        while not stop.is_set():
            try:
                c = socket.create_connection((srv.host, srv.port), timeout=5)
            except OSError:
                time.sleep(0.01)
                continue
            c.settimeout(None)
            with c:
                c.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")  # unfinished: held open
                try:
                    c.recv(1)  # returns when the gateway goes
                except OSError:
                    pass
            while not stop.is_set():  # reconnect at once, like a client's comm
                r = socket.socket()
                r.settimeout(2)
                try:
                    r.connect((srv.host, srv.port))
                except OSError:
                    r.close()
                    time.sleep(0.002)
                    continue
                if select.select([r], [], [], 0.05)[0]:
                    try:
                        closed = r.recv(1) == b""
                    except OSError:
                        closed = True
                    if closed:
                        dropped.append(time.time())
                        r.close()
                        continue
                reconnected[0] += 1
                r.close()
                break

    threads = [threading.Thread(target=holder, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            time.sleep(0.3)
            srv.kill9()
            srv.start()
    finally:
        stop.set()
        srv.kill9()
        for t in threads:
            t.join(timeout=10)
    assert reconnected[0] >= 40
    assert dropped == [], f"{len(dropped)} connections closed before the client spoke"
