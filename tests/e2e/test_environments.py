"""Picking a cluster's Python environment with a cluster option (local backend): a `select`
option with `target: python_env` maps each choice to a venv (or conda prefix) whose `dask` runs
the scheduler and workers. Here the choice is between the tests' own environment (the newest
releases) and the oldest supported one; a client talking to a cluster of other versions gets
Dask's version-mismatch warning.
"""

import subprocess
import warnings

import pytest

from conftest import OPTIONS_CONFIG, REPO, new_cluster, wait_workers

pytestmark = pytest.mark.local_only  # on Kubernetes the image plays this part


@pytest.fixture(scope="module")
def oldest_env():
    out = subprocess.run([str(REPO / "tests" / "env" / "python-venv"), "oldest"], check=True,
                         text=True, stdout=subprocess.PIPE, timeout=900)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(module_servers, oldest_env):
    option = {"field": "python", "label": "Python environment", "type": "select",
              "default": "current", "options": ["current", {"key": "oldest", "value": oldest_env}],
              "target": "python_env"}
    return module_servers("pyenv", cluster={"options": OPTIONS_CONFIG + [option]})


def dask_of(server, name, role):
    procs = server.cluster_processes(name, role)
    assert procs, f"no {role} process of {name}"
    return {" ".join(p.cmdline()[:2]) for p in procs}


def test_the_chosen_environment_runs_scheduler_and_workers(server, oldest_env):
    gw = server.gateway("env-user")
    options = gw.cluster_options()
    assert list(options._fields["python"].options) == ["current", "oldest"]
    cluster = new_cluster(gw, python="oldest")
    try:
        assert gw.get_cluster(cluster.name).options["python"] == "oldest"
        cluster.scale(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = cluster.get_client(set_as_default=False)
        assert any("Mismatched versions" in str(w.message) for w in caught), \
            [str(w.message) for w in caught]
        wait_workers(client, 1, timeout=120)
        versions = client.get_versions(check=False)
        assert versions["scheduler"]["packages"]["distributed"] == "2025.4.1"
        for command in dask_of(server, cluster.name, "scheduler") | dask_of(server, cluster.name,
                                                                             "worker"):
            assert oldest_env in command, command
        client.close()
    finally:
        cluster.shutdown()


def test_the_default_is_the_gateways_own_environment(server, oldest_env):
    gw = server.gateway("env-user")
    cluster = new_cluster(gw)
    try:
        for command in dask_of(server, cluster.name, "scheduler"):
            assert oldest_env not in command, command
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = cluster.get_client(set_as_default=False)
        assert not any("Mismatched versions" in str(w.message) for w in caught)
        client.close()
    finally:
        cluster.shutdown()
