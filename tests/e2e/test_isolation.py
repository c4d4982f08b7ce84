"""User isolation on the local backend: with `dask.isolation: uid-range` each user's Dask
processes run under a uid of their own, and code on mallory's scheduler cannot read alice's
TLS key or API token, nor signal her processes. The control at the end shows the same probe
succeeding in single-user mode (the default), so the assertions can fail.

Needs root (the gateway starts processes under other uids) and a Python environment every uid
can run (`tests/env/python-venv shared`, outside root's private home).
"""

import os
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import REPO, GatewayServer, new_cluster

pytestmark = pytest.mark.local_only

PASSWORD = "pw"
ALICE = "alice-iso"
MALLORY = "mallory-iso"


@pytest.fixture(scope="module")
def shared_env():
    out = subprocess.run([str(REPO / "tests" / "env" / "python-venv"), "shared"], check=True,
                         text=True, stdout=subprocess.PIPE, timeout=900)
    return out.stdout.strip().splitlines()[-1]


def start_server(name, shared_env, isolation):
    base = Path(tempfile.mkdtemp(prefix=f"dgrs-{name}-", dir="/tmp"))
    base.chmod(0o711)
    srv = GatewayServer(name, base, password=PASSWORD,
                        dask={"python_env": shared_env, "isolation": isolation,
                              "uid_range": {"first": 231000, "count": 50}})
    srv.start()
    return srv


@pytest.fixture(scope="module")
def isolated(shared_env):
    if os.geteuid() != 0:
        pytest.skip("user isolation needs a root gateway")
    srv = start_server("isolated", shared_env, "uid-range")
    yield srv
    srv.shutdown()


def make_probe():
    """The probe mallory runs on her scheduler (defined in a function so that it is pickled
    by value: the scheduler cannot import this test module)."""

    def probe(dask_scheduler=None, victim_dir=None, victim_pids=(), victim_token=None):
        """Runs on mallory's scheduler: everything she could try against alice."""
        import os as _os

        out = {"uid": _os.getuid(), "gid": _os.getgid(), "groups": _os.getgroups()}
        for what, path in [("key", f"{victim_dir}/.certs/dask.pem"),
                           ("token_file", f"{victim_dir}/.certs/api-token"),
                           ("work_dir", f"{victim_dir}/work")]:
            try:
                if what == "work_dir":
                    out[what] = _os.listdir(path)
                else:
                    with open(path) as f:
                        out[what] = f.read()
            except OSError as e:
                out[what] = f"error: {type(e).__name__}"
        leaked = []
        for pid in _os.listdir("/proc"):
            if not pid.isdigit():
                continue
            for name in ("environ", "cmdline"):
                try:
                    with open(f"/proc/{pid}/{name}", "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if victim_token and victim_token.encode() in data:
                    leaked.append(f"{pid}/{name}")
        out["leaked"] = leaked
        signals = []
        for pid in victim_pids:
            try:
                _os.kill(pid, 0)
                signals.append("allowed")
            except PermissionError:
                signals.append("refused")
            except ProcessLookupError:
                signals.append("gone")
        out["signals"] = signals
        return out

    return probe


def attack(srv):
    """Alice and mallory each start a cluster; mallory probes alice's from her scheduler."""
    alice_gw = srv.gateway(ALICE)
    mallory_gw = srv.gateway(MALLORY)
    victim = new_cluster(alice_gw)
    attacker = new_cluster(mallory_gw)
    victim.scale(1)
    victim_client = victim.get_client(set_as_default=False)
    victim_client.wait_for_workers(1, timeout=90)
    victim_dir = srv.data_dir / "clusters" / victim.name
    # The cluster's API token, as the gateway keeps it (the test runs as root).
    with sqlite3.connect(srv.data_dir / "gateway.sqlite") as db:
        (victim_token,) = db.execute("SELECT token FROM clusters WHERE name = ?",
                                     (victim.name,)).fetchone()
    pids = [p.pid for p in srv.cluster_processes(victim.name)]
    assert pids, "alice's processes are running"
    if srv.config["dask"]["isolation"] != "none":
        # No fork server under root: every user's process is exec'd by the gateway itself.
        gateway = psutil.Process(srv.proc.pid)
        assert not [c for c in gateway.children() if "forkserver" in " ".join(c.cmdline())]
        leaders = [p for p in srv.cluster_processes(victim.name) if os.getpgid(p.pid) == p.pid]
        assert leaders and all(p.ppid() == srv.proc.pid for p in leaders)
    with attacker.get_client(set_as_default=False) as client:
        out = client.run_on_scheduler(make_probe(), victim_dir=str(victim_dir), victim_pids=pids,
                                      victim_token=victim_token)
    uids = {p.uids().real for p in srv.cluster_processes(victim.name)}
    return out, victim, victim_client, attacker, uids


def test_one_users_code_cannot_reach_anothers_cluster(isolated):
    out, victim, victim_client, attacker, victim_uids = attack(isolated)
    try:
        assert out["uid"] != 0 and out["uid"] not in victim_uids, (out, victim_uids)
        assert 231000 <= out["uid"] < 231050 and out["gid"] == out["uid"]
        assert out["groups"] in ([], [out["gid"]]), "no supplementary groups"
        assert len(victim_uids) == 1 and victim_uids.pop() >= 231000
        assert out["key"] == "error: PermissionError", out
        assert out["token_file"] == "error: PermissionError", out
        assert out["work_dir"] == "error: PermissionError", out
        assert out["leaked"] == [], out
        assert set(out["signals"]) == {"refused"}, out
        # Alice's cluster is untouched and works.
        assert victim_client.submit(sum, [1, 2, 3]).result() == 6
        # The data directory can be passed through, not listed; the database is private.
        d = isolated.data_dir
        assert (d.stat().st_mode & 0o777) == 0o711
        assert ((d / "gateway.sqlite").stat().st_mode & 0o777) == 0o600
        assert ((d / "clusters" / victim.name / "logs").stat().st_mode & 0o777) == 0o700
    finally:
        victim_client.close()
        victim.shutdown()
        attacker.shutdown()


def test_uids_are_stable_across_restarts(isolated):
    gw = isolated.gateway(ALICE)
    first = new_cluster(gw)
    uids = {p.uids().real for p in isolated.cluster_processes(first.name)}
    first.shutdown()
    isolated.terminate()
    isolated.start()
    gw = isolated.gateway(ALICE)
    second = new_cluster(gw)
    try:
        assert {p.uids().real for p in isolated.cluster_processes(second.name)} == uids
    finally:
        second.shutdown()


def test_a_user_without_a_system_account_gets_a_clear_error(shared_env):
    if os.geteuid() != 0:
        pytest.skip("user isolation needs a root gateway")
    srv = start_server("sysusers", shared_env, "system-users")
    try:
        r = srv.http("POST", "/api/v1/clusters/", user="no-such-account-here",
                     body={"cluster_options": {}})
        assert r.status == 422, r
        assert "no system account" in r.json()["error"]
        listed = srv.http("GET", "/api/v1/clusters/?status=pending,running,stopped,failed",
                          user="no-such-account-here")
        assert listed.json() == {}, "nothing half-created"
        r = srv.http("POST", "/api/v1/clusters/", user="root", body={"cluster_options": {}})
        assert r.status == 422 and "never run as root" in r.json()["error"], r
    finally:
        srv.shutdown()


def test_control_single_user_mode_shares_everything(shared_env):
    """Without isolation (the default) the same probe reads alice's key: the assertions
    above are what isolation changes."""
    srv = start_server("shared-mode", shared_env, "none")
    try:
        out, victim, victim_client, attacker, _ = attack(srv)
        victim_client.close()
        assert out["key"].startswith("-----BEGIN"), out
        assert set(out["signals"]) == {"allowed"}, out
        victim.shutdown()
        attacker.shutdown()
    finally:
        srv.shutdown()
