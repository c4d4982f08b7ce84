"""Pre-imported process start on the local backend (`dask.fork_server`, on by default): schedulers
and workers are forked from a long-lived Python that has imported `distributed`, and are in every
observable way what an exec'd `dask` process is: command line, environment, Dask configuration,
account, process group, exit reporting. A cluster whose environment needs a fresh interpreter,
and a gateway with the server turned off, start processes by exec; a killed server leaves its
processes running and managed.
"""

import contextlib
import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import GatewayServer, new_cluster, wait_for, wait_workers

pytestmark = pytest.mark.local_only  # Kubernetes starts containers, not processes

SERVER_TITLE = "dask-gateway-rs-forkserver"


def fork_servers(server):
    """The fork server processes of `server` (its gateway's children with the server's title)."""
    gateway = psutil.Process(server.proc.pid)
    return [p for p in gateway.children() if SERVER_TITLE in " ".join(p.cmdline())]


def parent_is_fork_server(proc):
    return SERVER_TITLE in " ".join(proc.parent().cmdline())


def hash_under_seed(seed, text="dask"):
    """hash(text) in a Python started with PYTHONHASHSEED=seed."""
    return int(subprocess.run(
        [sys.executable, "-c", f"print(hash({text!r}))"], env={"PYTHONHASHSEED": str(seed)},
        check=True, capture_output=True, text=True).stdout)


# A nanny starts every worker process with this seed, so hash() agrees across workers
# (dask/distributed#8400); forked worker processes must agree with exec'd ones.
NANNY_HASH_SEED = 6640


@contextlib.contextmanager
def cluster_with_workers(server, n, **options):
    """A new cluster of fork-user's with `n` workers connected, and a client; stopped after."""
    gw = server.gateway("fork-user")
    cluster = new_cluster(gw, **options)
    try:
        cluster.scale(n)
        client = cluster.get_client(set_as_default=False)
        wait_workers(client, n)
        yield cluster, client
        client.close()
    finally:
        cluster.shutdown()


def leaders(procs):
    """Process-group leaders only: schedulers and nannies, not a nanny's own worker process."""
    return [p for p in procs if os.getpgid(p.pid) == p.pid]


def wait_fork_server_ready(server):
    wait_for(lambda: "fork server ready" in server.log_path.read_text(), 60,
             what="the fork server to finish its imports")


@pytest.fixture(scope="module")
def server(module_servers):
    env_option = {"field": "environment", "type": "mapping", "default": {},
                  "target": "environment"}
    srv = module_servers("fork", cluster={"options": [env_option]})
    wait_fork_server_ready(srv)
    return srv


def test_scheduler_and_workers_are_forked_and_look_exec_started(server):
    environment = {"DASK_DGRS_TEST__MARKER": "from-options", "FORK_TEST_VAR": "visible"}
    with cluster_with_workers(server, 3, environment=environment) as (cluster, client):
        [sched] = leaders(server.cluster_processes(cluster.name, "scheduler"))
        nannies = leaders(server.cluster_processes(cluster.name, "worker"))
        assert len(nannies) == 3
        for proc in [sched, *nannies]:
            assert parent_is_fork_server(proc), proc.cmdline()
            # The command line and environment an exec would have shown.
            cmd = proc.cmdline()
            assert cmd[1].endswith("/dask"), cmd
            assert cmd[2] == ("scheduler" if proc == sched else "worker"), cmd
            assert ("--dg-api-address" if proc == sched else "--nthreads") in cmd, cmd
            env = proc.environ()
            if proc == sched:
                assert env["DASK_GATEWAY_CLUSTER_NAME"] == cluster.name
            assert env["FORK_TEST_VAR"] == "visible"
            assert env["DASK_DGRS_TEST__MARKER"] == "from-options"
            assert "DGRS_FORKSERVER_ENV_ROOM" not in env
            # Its own session and process group, in the cluster's working directory.
            assert os.getpgid(proc.pid) == proc.pid
            assert os.getsid(proc.pid) == proc.pid
            assert cluster.name in proc.cwd()

        def worker_view():
            import os as _os
            import random

            import dask
            import numpy
            return {
                "marker": dask.config.get("dgrs-test.marker", None),
                "var": _os.environ.get("FORK_TEST_VAR"),
                "cluster": _os.environ.get("DASK_GATEWAY_CLUSTER_NAME"),
                "ca": dask.config.get("distributed.comm.tls.ca-file"),
                "numpy": float(numpy.random.random()),
                "random": random.random(),
                "hash": hash("dask"),
            }

        views = list(client.run(worker_view).values())
        assert len(views) == 3
        for view in views:
            # The cluster's environment and the Dask configuration it implies, not the server's.
            assert view["marker"] == "from-options"
            assert view["var"] == "visible"
            assert view["cluster"] is None  # a scheduler-only variable
            assert cluster.name in view["ca"]
        # str hashes agree with a worker process that a nanny started by exec.
        assert {v["hash"] for v in views} == {hash_under_seed(NANNY_HASH_SEED)}
        # Each process has random state of its own.
        assert len({v["numpy"] for v in views}) == 3
        assert len({v["random"] for v in views}) == 3
        assert client.run_on_scheduler(worker_view)["marker"] == "from-options"
        assert client.submit(sum, [1, 2, 3]).result() == 6


def test_a_killed_forked_worker_is_replaced(server):
    with cluster_with_workers(server, 1) as (cluster, client):
        [nanny] = leaders(server.cluster_processes(cluster.name, "worker"))
        assert parent_is_fork_server(nanny)
        before = set(client.scheduler_info()["workers"])
        os.killpg(nanny.pid, signal.SIGKILL)
        wait_for(lambda: (set(client.scheduler_info()["workers"]) - before)
                 and len(client.scheduler_info()["workers"]) == 1, 90,
                 what="a new worker in place of the killed one")
        assert not psutil.pid_exists(nanny.pid) or nanny.status() == psutil.STATUS_ZOMBIE
        assert client.submit(lambda x: x + 1, 1).result() == 2


def test_an_environment_that_needs_a_fresh_interpreter_is_exec_started(server):
    environment = {"PYTHONHASHSEED": "123"}
    with cluster_with_workers(server, 1, environment=environment) as (cluster, client):
        procs = leaders(server.cluster_processes(cluster.name))
        assert len(procs) == 2
        for proc in procs:
            assert proc.parent().pid == server.proc.pid, proc.cmdline()
        # The scheduler's interpreter really started with it; the worker process gets the
        # nanny's own seed, as it always does.
        assert client.run_on_scheduler(lambda: hash("dask")) == hash_under_seed(123)
        [worker_hash] = client.run(lambda: hash("dask")).values()
        assert worker_hash == hash_under_seed(NANNY_HASH_SEED)


def test_a_killed_fork_server_leaves_its_processes_running_and_managed(module_servers):
    srv = module_servers("fork-killed")
    wait_fork_server_ready(srv)
    with cluster_with_workers(srv, 2) as (cluster, client):
        [fs] = fork_servers(srv)
        forked = [p for p in leaders(srv.cluster_processes(cluster.name))
                  if p.parent().pid == fs.pid]
        assert len(forked) == 3  # the scheduler and two nannies
        fs.kill()
        fs.wait(10)
        assert all(p.is_running() for p in forked)
        # A new worker comes by exec while the server is down; the old ones keep computing.
        cluster.scale(3)
        wait_workers(client, 3)
        newest = [p for p in leaders(srv.cluster_processes(cluster.name, "worker"))
                  if p.parent().pid == srv.proc.pid]
        assert newest, "the third worker should have been exec'd by the gateway"
        assert client.submit(lambda x: x * 2, 21).result() == 42
        # Forked and exec'd workers agree on hash(), so hash-partitioned work is consistent.
        assert set(client.run(lambda: hash("dask")).values()) == {
            hash_under_seed(NANNY_HASH_SEED)}
        # Scaling down still stops orphaned forked workers, and a stop ends them all.
        cluster.scale(1)
        wait_workers(client, 1)
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                             for p in forked), 60, what="the forked processes to stop")
    wait_for(lambda: not srv.cluster_processes(cluster.name), 60,
             what="every process of the stopped cluster to end")


def test_fork_server_off_starts_every_process_by_exec(module_servers):
    srv = module_servers("fork-off", dask={"fork_server": False})
    assert not fork_servers(srv)
    with cluster_with_workers(srv, 1) as (cluster, client):
        procs = leaders(srv.cluster_processes(cluster.name))
        assert len(procs) == 2, [p.cmdline() for p in procs]
        assert all(p.parent().pid == srv.proc.pid for p in procs)
        assert not fork_servers(srv)


def test_bad_preimport_names_are_refused_at_start(tmp_path):
    srv = GatewayServer("fork-bad", tmp_path, dask={"preimport": ["numpy; import os"]})
    with pytest.raises(pytest.fail.Exception, match="exited"):
        srv.start(timeout=15)
    assert "is not a Python module name" in srv.log_path.read_text()


def test_a_configured_worker_hash_seed_is_honoured(server):
    # Dask configuration in the cluster's environment giving worker processes another seed: the
    # forked nanny then spawns its worker process fresh, which takes the seed.
    environment = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": "{'PYTHONHASHSEED': '7'}"}
    with cluster_with_workers(server, 1, environment=environment) as (cluster, client):
        [nanny] = leaders(server.cluster_processes(cluster.name, "worker"))
        assert parent_is_fork_server(nanny)
        [worker_hash] = client.run(lambda: hash("dask")).values()
        assert worker_hash == hash_under_seed(7)
