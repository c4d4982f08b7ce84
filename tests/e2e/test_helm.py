"""A Helm-installed gateway whose pods go away, the ways they do on a real cluster:

- one of the chart's default two replicas is force-deleted (its process gets SIGKILL), the other
  deleted gracefully (preStop, SIGTERM), then the Deployment is rolled: an open `Client` keeps
  computing throughout, reconnecting through the replica that stays;
- every replica is killed at once: the Deployment's next pods take over the clusters without
  touching their pods, and users connect to them through the new pods and keep working.
"""

import pytest

from conftest import (KubeEnv, connect, new_cluster, wait_computes, wait_for, wait_workers)

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


def test_an_open_client_survives_losing_gateway_pods_one_at_a_time(module_servers):
    srv = module_servers("twopods", cluster={"heartbeat_period": 2})
    kube = KubeEnv.get()

    def pod_names():
        pods = kube.get_json("pods", "-n", srv.namespace, "-l",
                             f"app.kubernetes.io/instance={srv.release},{srv.GATEWAY_PODS}")["items"]
        return sorted(p["metadata"]["name"] for p in pods
                      if not p["metadata"].get("deletionTimestamp")
                      and any(c["type"] == "Ready" and c["status"] == "True"
                              for c in p["status"].get("conditions", [])))

    first = wait_for(lambda: len(pod_names()) == 2 and pod_names(), 120,
                     what="the chart's two gateway replicas to be ready")
    gw = srv.gateway(USER)
    c = new_cluster(gw)
    try:
        c.scale(1)
        client = c.get_client(set_as_default=False)
        wait_workers(client, 1, timeout=120)
        for pod, how in zip(first, (["--grace-period=0", "--force"], [])):
            kube.kubectl("delete", "pod", "-n", srv.namespace, pod, "--wait=false", *how)
            # Within the open client's reconnect window (30 s): the other replica serves.
            wait_computes(client, 25, what=f"the open client to compute after {pod} went")
            wait_for(lambda: len(pod_names()) == 2 and pod not in pod_names(), 120,
                     what="two ready replicas again")
            # Connections kube-proxy sent to the gone pod must not catch later ones.
            kube.forget_unanswered(srv.namespace, srv.service)
        kube.kubectl("rollout", "restart", "deployment", "-n", srv.namespace,
                     f"{srv.release}-dask-gateway-rs")
        kube.kubectl("rollout", "status", "deployment", "-n", srv.namespace,
                     f"{srv.release}-dask-gateway-rs", "--timeout=180s", timeout=200)
        kube.forget_unanswered(srv.namespace, srv.service)
        wait_computes(client, 25, what="the open client to compute after the rollout")
        assert client.status == "running"
        client.close()
    finally:
        c.shutdown()
