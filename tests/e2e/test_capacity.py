"""The gateway's own capacity under a flood of idle connections: it holds at most
`max_connections` at once and closes the rest at once, so it never runs out of descriptors
and stops accepting; the heartbeats it turns away meanwhile fail no cluster; and once the
flood ends, users and their clusters carry on.
"""

import socket
import time

import pytest

from conftest import new_cluster, wait_computes, wait_for, wait_workers

pytestmark = pytest.mark.not_helm  # its own limits and timeouts in the server's configuration

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def test_a_flood_of_idle_connections_fails_no_cluster(module_servers):
    srv = module_servers("capacity", max_connections=64,
                         cluster={"heartbeat_period": 1, "heartbeat_timeout": 3})
    gw = srv.gateway("cap-user")
    cluster = new_cluster(gw, shutdown_on_close=True)
    cluster.scale(1)
    with cluster.get_client(set_as_default=False) as client:
        wait_workers(client, 1, timeout=90)
    flood = []
    try:
        # Idle HTTP/2 connections (a preface and its settings, then nothing): more than the
        # gateway holds. The ones over its limit are closed at once.
        for _ in range(200):
            s = socket.create_connection((srv.host, srv.port), timeout=10)
            s.sendall(H2_PREFACE + EMPTY_SETTINGS)
            flood.append(s)
        # The gateway is full: nobody gets in, the schedulers' heartbeats neither...
        with pytest.raises(Exception):
            srv.http("GET", "/api/health", timeout=5)
        # ... for more than three heartbeat timeouts.
        time.sleep(10)
    finally:
        for s in flood:
            s.close()
    # The flood is gone: the API answers again, no cluster failed, and the cluster computes.
    wait_for(lambda: srv.http("GET", "/api/health").status == 200, 30,
             what="the API answering after the flood")
    assert gw.get_cluster(cluster.name).status.name == "RUNNING"
    with cluster.get_client(set_as_default=False) as client:
        wait_computes(client)
    assert "turning connections away" in srv.log_text()
    cluster.shutdown()
