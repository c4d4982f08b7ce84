"""A Helm-installed gateway whose pod is killed outright (deleted with no grace period, so its
process gets SIGKILL): the Deployment's next pod takes over the clusters without touching their
pods, and users connect to them through it and keep working.

An open `Client` gives up reconnecting after distributed's connect timeout (30 s by default);
whether a replacement pod is routable by then depends on the cluster (scheduling, readiness,
endpoint propagation), so this test connects anew. The local-backend kill test checks that an
open Client reconnects through a restarted gateway.
"""

import pytest

from conftest import connect, new_cluster, wait_computes, wait_for, wait_workers

pytestmark = pytest.mark.helm_only

USER = "podkill-user"


def scheduler_pods(server, name):
    return {p["metadata"]["uid"] for p in server.kube_objects("pods", name)
            if p["metadata"]["labels"]["app.kubernetes.io/component"] == "dask-scheduler"}


def test_clusters_and_clients_survive_a_killed_gateway_pod(module_servers):
    srv = module_servers("podkill", cluster={"heartbeat_period": 2})
    gw = srv.gateway(USER)
    c = new_cluster(gw, shutdown_on_close=False)
    name = c.name
    try:
        c.scale(1)
        with c.get_client(set_as_default=False) as client:
            wait_workers(client, 1, timeout=120)
            assert client.submit(lambda x: x + 1, 1, pure=False).result(timeout=60) == 2
        schedulers = scheduler_pods(srv, name)
        assert len(schedulers) == 1, schedulers

        old = srv.kill_gateway_pods()
        assert old and not old & set(srv.gateway_pods())

        # The new pod adopts the cluster as it was: same scheduler pod, still RUNNING.
        gw2 = srv.gateway(USER)
        wait_for(lambda: {x.name: x.status.name for x in gw2.list_clusters()}
                 == {name: "RUNNING"}, 60, what="the cluster listed RUNNING by the new pod")
        assert scheduler_pods(srv, name) == schedulers

        # A connection by name goes through the new pod's proxy to the same scheduler (its
        # worker is still there), and scaling through the new pod reaches the scheduler.
        c2 = connect(gw2, name)
        with c2.get_client(set_as_default=False) as client2:
            wait_computes(client2, 120, what="a new client to compute through the new pod")
            assert len(client2.scheduler_info()["workers"]) == 1
            c2.scale(2)
            wait_workers(client2, 2, timeout=120)
            assert client2.submit(lambda x: x * 3, 7, pure=False).result(timeout=60) == 21
        c2.close()
    finally:
        c.close()
        srv.gateway(USER).stop_cluster(name)
