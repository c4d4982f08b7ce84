"""Per-cluster resource limits (wire-protocol 8.1): the worker cap derived from max_cores /
max_memory and the cluster's own options, reported as GatewayWarnings on scale/adapt; a scheduler
that alone exceeds a cap is refused at creation with 422.
"""

import subprocess
import warnings

import pytest
import yaml

from conftest import (OPTIONS_CONFIG, GatewayServer, holds, n_workers, new_cluster, server_binary,
                      wait_workers)
from dask_gateway import GatewayWarning

USER = "limited-user"


@pytest.fixture(scope="module")
def server(module_servers):
    # cap = min(floor((3 - 1) / worker_cores), floor((3G - 0.5G) / worker_memory))
    return module_servers(
        "limits",
        cluster={"max_cores": 3, "max_memory": "3G", "scheduler_cores": 1,
                 "scheduler_memory": "512M"},
    )


def gateway_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, GatewayWarning)]


@pytest.mark.parametrize(
    "options,cap",
    [
        ({}, 2),  # cores bound: (3 - 1) / 1
        ({"worker_cores": 2}, 1),  # cores bound: (3 - 1) / 2
        ({"worker_memory": 2.0}, 1),  # memory bound: (3 - 0.5) / 2
    ],
)
def test_worker_cap_follows_cluster_options(server, options, cap):
    gw = server.gateway(USER)
    cluster = new_cluster(gw, **options)
    try:
        with pytest.warns(GatewayWarning) as rec:
            cluster.scale(5)
        assert (
            f"Scale request of 5 workers would exceed resource limit of {cap} workers. "
            f"Scaling to {cap} instead." in gateway_warnings(rec)
        )
        with cluster.get_client(set_as_default=False) as client:
            wait_workers(client, cap, timeout=90)
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            wc = options.get("worker_cores", 1)
            # worker_threads defaults to the profile (small -> 1), cores are a resource request
            assert all(w["nthreads"] == 1 for w in workers)
            wm = options.get("worker_memory", 0.5)
            assert all(w["memory_limit"] == int(wm * 1024**3) for w in workers), (wc, workers)

        with pytest.warns(GatewayWarning) as rec:
            cluster.adapt(minimum=3, maximum=5)
        assert (
            f"Adapt with `maximum=5, minimum=3` workers would exceed resource limit of {cap} "
            f"workers. Using `maximum={cap}, minimum={cap}` instead." in gateway_warnings(rec)
        )
    finally:
        cluster.shutdown()


def test_adapt_without_bounds_under_a_cap_does_not_warn(server, recwarn):
    gw = server.gateway(USER)
    cluster = new_cluster(gw)
    try:
        cluster.adapt()
        cluster.adapt(minimum=1, maximum=2)
        cluster.scale(2)
        assert not gateway_warnings(recwarn)
    finally:
        cluster.shutdown()


@pytest.mark.parametrize(
    "cluster_config,expected",
    [
        ({"max_memory": "1.5G", "scheduler_memory": "2G"},
         "Scheduler memory request of 2.00 GiB exceeds cluster memory limit of 1.50 GiB"),
        ({"max_cores": 0.5, "scheduler_cores": 1}, "Scheduler cores request of 1"),
    ],
)
def test_static_config_over_the_cap_is_refused_at_startup(tmp_path, cluster_config, expected):
    # A configuration in which no cluster could ever start is rejected up front.
    srv = GatewayServer("limits-invalid", tmp_path, cluster=cluster_config)
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    proc = subprocess.run([str(server_binary()), "--config", str(srv.config_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert expected in proc.stderr


def test_scheduler_option_over_the_cap_is_422(module_servers):
    scheduler_option = {"field": "scheduler_memory", "type": "float", "default": 0.5,
                        "min": 0.25, "max": 8, "target": "scheduler_memory"}
    srv = module_servers("limits-refuse", cluster={
        "max_memory": "1.5G",
        "options": [*OPTIONS_CONFIG, scheduler_option],
    })
    gw = srv.gateway(USER)
    with pytest.raises(ValueError) as e:
        gw.submit(scheduler_memory=2.0)
    assert "Scheduler memory request of 2.00 GiB exceeds cluster memory limit of 1.50 GiB" in str(
        e.value)
    assert gw.list_clusters() == []
    # within the cap it is accepted (and reported back as an option)
    name = gw.submit(scheduler_memory=1.0)
    try:
        assert gw.get_cluster(name).options["scheduler_memory"] == 1.0
    finally:
        gw.stop_cluster(name)


def test_per_user_worker_quota_spans_all_of_a_users_clusters(module_servers):
    """`max_workers_per_user`: the stock client is told (a GatewayWarning naming the quota) and
    the user's workers across clusters never pass it, also when their schedulers adapt."""
    srv = module_servers("user-quota", cluster={"max_workers_per_user": 3})
    gw = srv.gateway("quota-user")
    first, second = new_cluster(gw), new_cluster(gw)
    try:
        first.scale(2)
        with pytest.warns(GatewayWarning, match="quota of 3 workers per user"):
            second.scale(3)
        with first.get_client(set_as_default=False) as c1, \
                second.get_client(set_as_default=False) as c2:
            wait_workers(c1, 2)
            wait_workers(c2, 1)
            # Adaptive scaling of the second cluster is held to the room left too.
            with pytest.warns(GatewayWarning, match="quota"):
                second.adapt(minimum=3, maximum=5)
            # Its adaptive loop (every 1 s) and heartbeats (every 2 s) ask again and again;
            # the user's workers stay within the quota all along, not just at one moment.
            holds(lambda: n_workers(c2) <= 1 and n_workers(c1) + n_workers(c2) <= 3, 6,
                  what="the user's workers within the quota of 3")
            wait_workers(c2, 1)
        # Another user is not affected by this one's usage.
        other = new_cluster(srv.gateway("other-quota-user"))
        other.scale(3)
        with other.get_client(set_as_default=False) as c3:
            wait_workers(c3, 3)
        other.shutdown()
    finally:
        first.shutdown()
        second.shutdown()


def test_adapt_gets_a_default_maximum_and_a_largest_one(module_servers):
    # A reference user's unbounded adapt() once asked for 8,766 pods: a default maximum for an
    # adapt that names none, and a largest maximum any adapt may name.
    srv = module_servers("adapt-caps", admin_users=["adapt-admin"],
                         cluster={"adapt_maximum_default": 2, "adapt_maximum_max": 3})
    gw = srv.gateway(USER)
    cluster = new_cluster(gw)
    try:
        def adapt_events():
            r = srv.http("GET", f"/api/v1/clusters/{cluster.name}/events", user=USER)
            assert r.status == 200
            return [e["message"] for e in r.json()["events"] if e["reason"] == "AdaptRequested"]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cluster.adapt()  # no maximum: the default, silently
        assert not gateway_warnings(caught)
        assert adapt_events()[-1] == f"{USER} turned adaptive scaling on (minimum none, maximum 2)"
        with pytest.warns(GatewayWarning, match="would exceed the adaptive maximum of 3 workers"):
            cluster.adapt(minimum=1, maximum=8766)
        assert adapt_events()[-1] == f"{USER} turned adaptive scaling on (minimum 1, maximum 3)"
        cluster.adapt(minimum=0, maximum=3)  # at the largest: as asked
        assert adapt_events()[-1] == f"{USER} turned adaptive scaling on (minimum 0, maximum 3)"
    finally:
        cluster.shutdown()


def test_a_default_adapt_maximum_above_the_largest_is_refused_at_start(tmp_path):
    srv = GatewayServer("adapt-bad", tmp_path,
                        cluster={"adapt_maximum_default": 10, "adapt_maximum_max": 5})
    with pytest.raises(pytest.fail.Exception, match="exited"):
        srv.start(timeout=15)
    assert "adapt_maximum_default (10) may not exceed adapt_maximum_max (5)" in srv.log_text()
