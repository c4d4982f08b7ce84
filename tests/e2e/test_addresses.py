"""Address layouts (wire-protocol 11.4, 11.5, 12): a dedicated scheduler port reached with
`Gateway(address, proxy_address=<port>)`, and a URL prefix reached with
`Gateway("http://host:port/<prefix>")`.
"""

import urllib.error
import urllib.request
from urllib.parse import urlparse

import pytest

from conftest import free_port, new_cluster, tls_probe, wait_status, wait_workers


def run_work(cluster):
    cluster.scale(1)
    with cluster.get_client(set_as_default=False) as client:
        wait_workers(client, 1, timeout=90)
        assert client.submit(lambda x: x**2, 12, pure=False).result(timeout=60) == 144


@pytest.mark.not_helm  # a second host port; the chart's service.schedulerPort is tested in tests/helm
def test_separate_scheduler_port(module_servers):
    sched_port = free_port()
    srv = module_servers("sched-port", scheduler_address=f"127.0.0.1:{sched_port}")
    assert srv.scheduler_port == sched_port != srv.port
    gw = srv.gateway("port-user", proxy_address=sched_port)
    assert gw.proxy_address == f"gateway://127.0.0.1:{sched_port}"
    cluster = new_cluster(gw)
    try:
        assert cluster.scheduler_address == f"gateway://127.0.0.1:{sched_port}/{cluster.name}"
        assert cluster.dashboard_link == f"{srv.url}/clusters/{cluster.name}/status"
        run_work(cluster)
        # the scheduler port only carries scheduler TLS: plain HTTP there is not served
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{sched_port}/api/health", timeout=10)
        # and unknown SNIs are closed silently there as well
        probe = tls_probe(sched_port, "daskgateway-doesnotexist")
        assert probe.eof and probe.received == b"", probe
        # dashboards stay on the HTTP port
        with urllib.request.urlopen(cluster.dashboard_link, timeout=30) as r:
            assert r.status == 200
    finally:
        cluster.shutdown()


def test_url_prefix(module_servers):
    srv = module_servers("prefix", prefix="/gw")
    assert srv.url.endswith("/gw")
    gw = srv.gateway("prefix-user")
    assert gw.list_clusters() == []
    assert gw.get_versions()["server"]["version"]
    cluster = new_cluster(gw)
    try:
        # dashboard_route is relative to the public root *without* the prefix; the client
        # prepends its address, which carries the prefix.
        report = gw.get_cluster(cluster.name)
        assert report.dashboard_link == f"{srv.url}/clusters/{cluster.name}/status"
        assert cluster.scheduler_address == f"gateway://127.0.0.1:{srv.port}/{cluster.name}"
        run_work(cluster)
        with urllib.request.urlopen(report.dashboard_link, timeout=30) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/html")
        # the API is under the prefix, not beside it
        r = srv.http("GET", "/api/v1/clusters/", user="prefix-user", raw_path=True)
        assert r.status == 404, r
        r = srv.http("GET", "/api/v1/clusters/", user="prefix-user")
        assert r.status == 200 and cluster.name in r.json(), r
    finally:
        cluster.shutdown()


# Code that runs in a scheduler before its first heartbeat (here through the `environment`
# option's PYTHONPATH) decides what the heartbeat says.
REPORT_ELSEWHERE = '''
import os
import dask_gateway.scheduler_preload as preload

if os.environ.get("REPORTED_DASHBOARD"):
    preload.GatewaySchedulerService.dashboard_address = property(
        lambda self: os.environ["REPORTED_DASHBOARD"])
if os.environ.get("REPORTED_SCHEDULER"):
    heartbeat = preload.GatewayClient.heartbeat

    async def reported(self, msg):
        return await heartbeat(self, dict(msg, scheduler_address=os.environ["REPORTED_SCHEDULER"]))

    preload.GatewayClient.heartbeat = reported
'''


@pytest.mark.local_only  # the local backend takes the addresses from the first heartbeat
@pytest.mark.parametrize("field", ["REPORTED_DASHBOARD", "REPORTED_SCHEDULER"])
def test_a_scheduler_cannot_point_the_proxy_at_another_port(shared_server, tmp_path, field):
    """A scheduler that reports the gateway's own port (a proxy loop that ran the gateway out of
    connections) or any other service's: the cluster fails, saying why, and nothing is routed."""
    (tmp_path / "sitecustomize.py").write_text(REPORT_ELSEWHERE)
    tmp_path.chmod(0o755)
    own = urlparse(shared_server.url)
    reported = {
        "REPORTED_DASHBOARD": f"http://127.0.0.1:{own.port}",
        "REPORTED_SCHEDULER": f"tls://127.0.0.1:{own.port}",
    }[field]
    gw = shared_server.gateway("address-user")
    name = gw.submit(environment={"PYTHONPATH": str(tmp_path), field: reported})
    wait_status(gw, name, "FAILED", timeout=90)
    details = shared_server.http(
        "GET", f"/api/v1/clusters/{name}/details", user="address-user"
    ).json()
    why = details.get("reason") or ""
    assert reported in why and "is not a port its own processes listen on" in why, details
    # No route was made: the dashboard path is refused, the gateway answers as before.
    r = shared_server.http("GET", f"/clusters/{name}/status", user="address-user")
    assert r.status in (404, 502, 503), r
    assert shared_server.health()
