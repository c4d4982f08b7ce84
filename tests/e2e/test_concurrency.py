"""Several users at once: clusters started concurrently are independent, and the API keeps
answering while schedulers start."""

import concurrent.futures

import pytest

from conftest import new_cluster, wait_workers

USERS = ["conc-ann", "conc-ben", "conc-cat"]


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


def test_concurrent_users_get_independent_clusters(server):
    gateways = {u: server.gateway(u) for u in USERS}
    with concurrent.futures.ThreadPoolExecutor(len(USERS) + 4) as pool:
        starting = {u: pool.submit(new_cluster, gw) for u, gw in gateways.items()}
        # hammer the API from the side while the schedulers start
        pings = [pool.submit(server.http, "GET", "/api/v1/clusters/", user=u)
                 for u in USERS for _ in range(10)]
        clusters = {u: f.result(timeout=180) for u, f in starting.items()}
        assert [p.result().status for p in pings] == [200] * len(pings)
    try:
        assert len({c.name for c in clusters.values()}) == len(USERS)
        for u, gw in gateways.items():
            assert [c.name for c in gw.list_clusters()] == [clusters[u].name]
        for i, (u, c) in enumerate(clusters.items()):
            c.scale(1)
        for i, (u, c) in enumerate(clusters.items()):
            with c.get_client(set_as_default=False) as client:
                wait_workers(client, 1, timeout=120)
                assert client.submit(lambda x: x + i, 100, pure=False).result(timeout=60) == 100 + i
    finally:
        for c in clusters.values():
            c.shutdown()
    for gw in gateways.values():
        assert gw.list_clusters() == []
