"""`gateway-cli` as a user runs it, against a real gateway with real Dask, side by side with the
stock Python client: clusters made by one are usable from the other."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from distributed import Client
from distributed.security import Security

from conftest import REPO, free_port, new_cluster, wait_for

pytestmark = pytest.mark.local_only  # the CLI speaks the same API on every backend

PASSWORD = "cli-pw"
USER = "carol-cli"


def cli_binary():
    path = os.environ.get("GATEWAY_CLI_BIN")
    if path:
        return path
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    return str(Path(target) / "debug" / "gateway-cli")


@pytest.fixture(scope="module")
def srv(module_servers):
    return module_servers("cli", password=PASSWORD)


def run(srv, *args, user=USER, password=PASSWORD, env=None, timeout=180, address=True):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    full_env["DASK_CONFIG"] = "/nonexistent"  # no user config files leak in
    full_env["HOME"] = "/nonexistent"
    full_env["DASK_GATEWAY_PASSWORD"] = password
    full_env.update(env or {})
    cmd = [cli_binary()]
    if address:
        cmd += ["--address", srv.url]
    if user:
        cmd += ["--user", user]
    return subprocess.run(cmd + list(args), env=full_env, text=True, capture_output=True,
                          timeout=timeout)


def run_json(srv, *args, **kw):
    r = run(srv, *args, "-o", "json", **kw)
    assert r.returncode == 0, r
    return json.loads(r.stdout)


def workers_of(srv, name):
    return run_json(srv, "info", name)


@pytest.fixture(scope="module")
def cli_cluster(srv):
    out = run_json(srv, "new-cluster", "--opt", "worker_cores=1", "--workers", "2", "--wait")
    yield out
    run(srv, "stop", out["name"])


def test_new_cluster_prints_name_address_and_dashboard(srv, cli_cluster):
    name = cli_cluster["name"]
    assert cli_cluster["status"] == "RUNNING"
    assert cli_cluster["address"] == f"gateway://127.0.0.1:{srv.port}/{name}"
    assert cli_cluster["dashboard"] == f"{srv.url}/clusters/{name}/status"


def test_info_shows_the_workers_through_the_identity_exchange(srv, cli_cluster):
    name = cli_cluster["name"]
    wait_for(lambda: workers_of(srv, name).get("workers") == 2, 90, what="2 workers in info")
    info = workers_of(srv, name)
    assert info["status"] == "RUNNING" and info["threads"] == 2
    assert info["memory"].endswith("iB")
    assert len(info["worker_details"]) == 2
    table = run(srv, "info", name)
    assert table.returncode == 0 and "workers" in table.stdout and name in table.stdout


def test_a_cli_cluster_is_usable_from_python_by_name(srv, cli_cluster):
    gw = srv.gateway(USER)
    cluster = gw.connect(cli_cluster["name"])
    with cluster.get_client(set_as_default=False) as client:
        assert client.submit(lambda x: x * 2, 21).result(timeout=60) == 42


def test_tunnel_serves_a_plain_distributed_client(srv, cli_cluster):
    name = cli_cluster["name"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(DASK_CONFIG="/nonexistent", DASK_GATEWAY_PASSWORD=PASSWORD)
    proc = subprocess.Popen([cli_binary(), "--address", srv.url, "--user", USER, "-o", "json",
                             "tunnel", name], env=env, stdout=subprocess.PIPE, text=True)
    try:
        text = ""
        while True:
            line = proc.stdout.readline()
            assert line, "the tunnel exited before printing its address"
            text += line
            try:
                info = json.loads(text)
                break
            except json.JSONDecodeError:
                continue
        assert info["address"].startswith("tls://127.0.0.1:")
        for key in ("tls_client_key", "tls_client_cert"):
            assert oct(os.stat(info[key]).st_mode & 0o777) == "0o600"
        security = Security(tls_ca_file=info["tls_ca_file"],
                            tls_client_cert=info["tls_client_cert"],
                            tls_client_key=info["tls_client_key"], require_encryption=True)
        with Client(info["address"], security=security, timeout=30) as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            assert len(client.scheduler_info(n_workers=-1)["workers"]) >= 1
        # Without the cluster's certificate the tunnel refuses the connection.
        host, port = info["address"].removeprefix("tls://").rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=info["tls_ca_file"])
        ctx.check_hostname = False
        refused = False
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"\0" * 16)
                    refused = tls.recv(16) == b""
            except (ssl.SSLError, ConnectionError):
                refused = True
        assert refused, "a client without the cluster's certificate was let through"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not Path(info["tls_client_key"]).exists(), "the key is removed on exit"


def read_json_record(stream):
    """The first JSON document a process prints (pretty-printed over several lines)."""
    text = ""
    while True:
        line = stream.readline()
        assert line, "the process exited before printing"
        text += line
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            continue


def test_tunnel_credentials_are_private_and_gone_when_the_terminal_closes(srv, cli_cluster,
                                                                          tmp_path):
    name = cli_cluster["name"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(DASK_CONFIG="/nonexistent", DASK_GATEWAY_PASSWORD=PASSWORD)
    base = [cli_binary(), "--address", srv.url, "--user", USER, "-o", "json", "tunnel", name]
    # A directory others may write to is refused, and nothing is written into it.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = subprocess.run(base + ["--credentials-dir", str(shared)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 5 and "not a private directory" in r.stderr, r
    assert list(shared.iterdir()) == []
    # As from a terminal: SIGHUP has its default action (the test run itself may be under
    # nohup, whose ignored SIGHUP the tunnel would inherit and keep).
    proc = subprocess.Popen(base, env=env, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        info = read_json_record(proc.stdout)
        folder = Path(info["tls_client_key"]).parent
        # A new directory of a name nobody could guess and make first.
        assert str(proc.pid) not in folder.name, folder
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not folder.exists(), "SIGHUP (a closed terminal) removes the credentials"
    # Under nohup (SIGHUP ignored) the tunnel outlives its terminal.
    proc = subprocess.Popen(["nohup", *base], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        info = read_json_record(proc.stdout)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None, "a nohup tunnel ended on SIGHUP"
        assert Path(info["tls_client_key"]).exists()
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not Path(info["tls_client_key"]).parent.exists()


def test_new_cluster_checks_everything_before_creating(srv):
    before = {c["name"] for c in run_json(srv, "list", "--all")}
    for args in (["--adapt", "5:1"], ["--wait", "--timeout=-1"], ["--wait", "--timeout", "nan"],
                 ["--wait", "--timeout", "1e19"]):
        r = run(srv, "new-cluster", *args)
        assert r.returncode == 2, (args, r)
        assert "panicked" not in r.stderr, r
    assert {c["name"] for c in run_json(srv, "list", "--all")} == before


def test_a_new_cluster_that_cannot_be_made_ready_is_stopped(srv):
    active = {c["name"] for c in run_json(srv, "list")}
    r = run(srv, "new-cluster", "--wait", "--timeout", "0")
    assert r.returncode == 7, r
    assert "was created, but" in r.stderr and "it has been stopped" in r.stderr, r
    assert r.stdout == ""
    wait_for(lambda: {c["name"] for c in run_json(srv, "list")} <= active, 60,
             what="the unfinished cluster stopped")


def test_settings_are_read_as_the_python_client_reads_them(srv, tmp_path):
    """Templates filled from the environment, default cluster options, `$DASK_CONFIG` added to
    the user's config directory rather than replacing it."""
    home = tmp_path / "home"
    (home / ".config" / "dask").mkdir(parents=True)
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    (home / ".config" / "dask" / "gateway.yaml").write_text(
        f"gateway:\n  address: 'http://{{CLI_TEST_HOST}}:{port}'\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "cluster.yaml").write_text(
        "gateway:\n  auth:\n    kwargs: {username: '{CLI_TEST_USER}', password: '{CLI_TEST_PW}'}\n"
        "  cluster:\n    options: {worker_cores: 2}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(HOME=str(home), DASK_CONFIG=str(extra), CLI_TEST_HOST=host,
               CLI_TEST_USER=USER, CLI_TEST_PW=PASSWORD)
    r = subprocess.run([cli_binary(), "-o", "json", "new-cluster"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r
    name = json.loads(r.stdout)["name"]
    try:
        info = run_json(srv, "info", name)
        assert info["options"]["worker_cores"] == 2, info
        # The Python client reads the same files the same way.
        script = ("from dask_gateway import Gateway; "
                  "print(Gateway().cluster_options()['worker_cores'])")
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "2", out
    finally:
        run(srv, "stop", name)


def test_scale_adapt_list_and_formats(srv, cli_cluster):
    name = cli_cluster["name"]
    r = run_json(srv, "scale", name, "1")
    assert r["ok"] is True and r["requested"] == 1, r
    wait_for(lambda: workers_of(srv, name).get("workers") == 1, 90, what="1 worker")
    r = run_json(srv, "adapt", name, "--min", "2", "--max", "2")
    assert r["ok"] is True
    wait_for(lambda: workers_of(srv, name).get("workers") == 2, 90, what="adapt to 2")
    listed = run_json(srv, "list")
    assert name in [c["name"] for c in listed]
    as_yaml = yaml.safe_load(run(srv, "list", "-o", "yaml").stdout)
    assert name in [c["name"] for c in as_yaml]
    assert [c["owner"] for c in listed if c["name"] == name] == [USER]
    table = run(srv, "list").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "OWNER", "STATUS"]
    options = run_json(srv, "options")
    assert "worker_cores" in [o["field"] for o in options]


def test_a_python_cluster_is_seen_and_stopped_by_the_cli(srv):
    gw = srv.gateway(USER)
    cluster = new_cluster(gw)
    info = run_json(srv, "info", cluster.name)
    assert info["status"] == "RUNNING" and info["workers"] == 0
    r = run(srv, "stop", cluster.name)
    assert r.returncode == 0, r
    wait_for(lambda: gw.get_cluster(cluster.name).status.name in ("STOPPED", "STOPPING"), 30,
             what="the cluster to stop")
    all_clusters = run_json(srv, "list", "--all")
    assert cluster.name in [c["name"] for c in all_clusters]
    # Why it stopped, and who did it.
    [listed] = [c for c in all_clusters if c["name"] == cluster.name]
    assert listed["reason"] == f"stopped by {USER}", listed
    assert run_json(srv, "info", cluster.name)["owner"] == USER


def test_settings_from_dask_environment_variables(srv):
    r = run(srv, "-o", "json", "list", address=False, user=None,
            env={"DASK_GATEWAY__ADDRESS": srv.url,
                 "DASK_GATEWAY__AUTH__KWARGS__USERNAME": USER})
    assert r.returncode == 0, r
    assert isinstance(json.loads(r.stdout), list)


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["info", "0123456789abcdef0123456789abcdef"], 3, "not found"),
        (["scale", "0123456789abcdef0123456789abcdef", "1"], 3, "not found"),
        (["stop", "0123456789abcdef0123456789abcdef"], 3, "not found"),
        (["new-cluster", "--opt", "worker_cores=99"], 5, "worker_cores"),
        (["new-cluster", "--opt", "nonsense"], 2, "KEY=VALUE"),
        (["adapt", "x", "--min", "5", "--max", "2"], 2, "above"),
        (["info", ".."], 5, "not a cluster name"),
        (["scale", "x", "-1"], 2, ""),
        (["frobnicate"], 2, ""),
        (["list", "--status", "sleeping"], 2, "sleeping"),
    ],
)
def test_bad_input_has_a_clear_message_and_exit_code(srv, args, code, message):
    r = run(srv, *args)
    assert r.returncode == code, r
    assert message.lower() in r.stderr.lower(), r
    assert r.stdout == ""


def test_wrong_credentials_and_no_address(srv):
    r = run(srv, "list", password="wrong")
    assert r.returncode == 4 and "unauthorized" in r.stderr.lower(), r
    r = run(srv, "list", address=False)
    assert r.returncode == 5 and "no gateway address" in r.stderr, r
    r = subprocess.run([cli_binary(), "--address", f"http://127.0.0.1:{free_port()}", "list"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DASK_CONFIG": "/nonexistent"})
    assert r.returncode == 1 and "cannot reach" in r.stderr, r
    # A password in the address would go with every request and into every printed address.
    r = run(srv, "list", address=False, env={"DASK_GATEWAY__ADDRESS": "http://u:p@127.0.0.1:1"})
    assert r.returncode == 5 and "user name or password" in r.stderr, r


def test_stop_all(srv):
    gw = srv.gateway(USER)
    names = [gw.submit() for _ in range(2)]
    r = run_json(srv, "stop", "--all")
    assert set(names) <= {row["name"] for row in r}
    assert {row["status"] for row in r} <= {"STOPPING", "STOPPED"}, r
    # Output into a reader that stops early ends the command quietly.
    env = {**os.environ, "DASK_CONFIG": "/nonexistent", "DASK_GATEWAY_PASSWORD": PASSWORD}
    piped = subprocess.run(
        ["bash", "-c", f"'{cli_binary()}' --address {srv.url} --user {USER} list --all -o json"
                       " | true; echo ${PIPESTATUS[0]}"],
        env=env, capture_output=True, text=True, timeout=60)
    assert "panicked" not in piped.stderr, piped.stderr
    assert piped.stdout.strip() in ("0", "141"), piped
    time.sleep(0.5)
    assert run_json(srv, "list") == []


def test_help_documents_exit_codes_and_completions_work():
    r = subprocess.run([cli_binary(), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Exit codes" in r.stdout and "3  cluster not found" in r.stdout
    r = subprocess.run([cli_binary(), "completions", "bash"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "gateway-cli" in r.stdout


def test_https_is_checked_against_ssl_cert_file_as_python_does(module_servers, tmp_path):
    """A gateway with a certificate of a private CA: refused, with the reason, until the user
    names the CA the way Python's ssl reads it (SSL_CERT_FILE)."""
    ca, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    cert, key, csr = tmp_path / "gw.crt", tmp_path / "gw.key", tmp_path / "gw.csr"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-days", "2", "-subj", "/CN=test CA", "-keyout", ca_key,
         "-out", ca],
        ["req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days",
         "2", "-extfile", "/dev/stdin", "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True,
                       input=b"subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    tls_srv = module_servers("cli-tls", password=PASSWORD,
                             tls={"cert": str(cert), "key": str(key)})
    https = f"https://127.0.0.1:{tls_srv.port}"
    r = run(tls_srv, "list", address=False, env={"DASK_GATEWAY__ADDRESS": https})
    assert r.returncode == 1 and "certificate" in r.stderr.lower(), r
    r = run(tls_srv, "-o", "json", "list", address=False,
            env={"DASK_GATEWAY__ADDRESS": https, "SSL_CERT_FILE": str(ca)})
    assert r.returncode == 0 and json.loads(r.stdout) == [], r
