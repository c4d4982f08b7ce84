"""The seed tutorial's workload, run on a gateway cluster as a user would.

One server and one cluster for the module; the tests run in file order and build on each other
where the tutorial does (scale to 2, compute, scale to 4, adapt, shut down), but each test
establishes what it needs itself.
"""

import asyncio
import os
import re
import time
import urllib.request

import dask
import dask.array as da
import numpy as np
import pytest
import websockets

from conftest import (
    CONFIG_ENV,
    DEFAULT_OPTIONS,
    GIB,
    check_options,
    connect,
    n_workers,
    new_cluster,
    wait_for,
    wait_workers,
)
from dask_gateway import Gateway

# The compatibility smoke set (tests/run runs it on the oldest supported releases too).
pytestmark = pytest.mark.smoke

USER = "tutorial-user"


@pytest.fixture(scope="module")
def server(module_servers):
    # No worker cap; quick adaptive loop so adapt() reacts fast.
    return module_servers("workload", cluster={"adaptive_period": 1, "heartbeat_period": 2})


@pytest.fixture(scope="module")
def gateway(server) -> Gateway:
    return server.gateway(USER)


@pytest.fixture(scope="module")
def cluster(gateway):
    c = new_cluster(gateway, worker_memory=1.0, environment={"E2E_FROM_OPTIONS": "opt-value"})
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(cluster):
    cl = cluster.get_client()
    yield cl
    cl.close()


def tutorial_functions():
    """The tutorial's toy functions (with shorter sleeps). Defined in a closure so that they are
    pickled by value: the workers cannot import this test module."""

    def square(x):
        time.sleep(0.05)
        return x**2

    def add(x, y):
        time.sleep(0.05)
        return x + y

    def square_root(x):
        time.sleep(0.05)
        return x ** (1 / 2)

    return square, add, square_root


square, add, square_root = tutorial_functions()


def executed(client):
    """Tasks executed so far, summed over the current workers."""
    return sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())


def test_options_listed(gateway):
    check_options(gateway.cluster_options())


def test_new_cluster_running(gateway, cluster, server):
    report = gateway.get_cluster(cluster.name)
    assert report.status.name == "RUNNING"
    assert report.options == {
        **DEFAULT_OPTIONS,
        "worker_memory": 1.0,
        "environment": {"E2E_FROM_OPTIONS": "opt-value"},
    }
    assert cluster.scheduler_address == f"gateway://{server.host}:{server.port}/{cluster.name}"
    assert cluster.dashboard_link == f"{server.url}/clusters/{cluster.name}/status"
    assert cluster.name in [c.name for c in gateway.list_clusters()]


def test_scale_to_two_and_worker_settings(cluster, client):
    cluster.scale(2)
    wait_workers(client, 2)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    # profile=small -> worker_threads 1; worker_memory option 1.0 GiB -> --memory-limit bytes
    assert [w["nthreads"] for w in workers] == [1, 1]
    assert [w["memory_limit"] for w in workers] == [GIB, GIB]


def test_environment_reaches_workers_and_scheduler(cluster, client):
    cluster.scale(2)
    wait_workers(client, 2, exact=False)

    def env():
        return {k: os.environ.get(k) for k in ("E2E_FROM_OPTIONS", *CONFIG_ENV)}

    expected = {"E2E_FROM_OPTIONS": "opt-value", **CONFIG_ENV}
    for value in client.run(env).values():
        assert value == expected
    assert client.run_on_scheduler(env) == expected


def test_delayed_chain(cluster, client):
    cluster.scale(2)
    wait_workers(client, 2, exact=False)
    x = dask.delayed(square)(3)
    y = dask.delayed(square)(4)
    z = dask.delayed(add)(x, y)
    r = dask.delayed(square_root)(z)
    assert r.compute() == 5.0


def test_many_delayed_chains(cluster, client):
    results = []
    for value in range(30):
        x = dask.delayed(square)(value)
        y = dask.delayed(square)(value)
        z = dask.delayed(add)(x, y)
        results.append(dask.delayed(square_root)(z))
    before = executed(client)
    (got,) = dask.compute(results)
    assert got == pytest.approx([(2 * v * v) ** 0.5 for v in range(30)])
    # the work really ran on the gateway's workers (4 tasks per chain)
    assert executed(client) - before >= 120


def test_dask_array_sum_matches_numpy(cluster, client):
    shape = (600, 200, 200)
    darr = da.random.RandomState(1234).random_sample(shape, chunks=(300, 100, 200))
    assert darr.numblocks == (2, 2, 1)
    remote = darr.sum().compute()
    reference = darr.compute(scheduler="sync")  # the same blocks, computed locally with NumPy
    assert reference.shape == shape
    assert remote == pytest.approx(float(reference.sum()), rel=1e-12)


def test_dask_array_from_numpy_data(cluster, client):
    # Data shipped from the client through the proxy to the workers and back.
    arr = np.random.default_rng(7).random((400, 300))
    darr = da.from_array(arr, chunks=(100, 150))
    got = (darr.T @ darr).compute()
    np.testing.assert_allclose(got, arr.T @ arr, rtol=1e-10)
    np.testing.assert_array_equal(darr[::7, 3].compute(), arr[::7, 3])


def test_xarray_zarr_reduction(cluster, client, shared_tmp):
    xr = pytest.importorskip("xarray")
    rng = np.random.default_rng(3)
    data = rng.normal(280, 10, size=(48, 30, 40))
    ds = xr.Dataset(
        {"tas": (("time", "lat", "lon"), data)},
        coords={"time": np.arange(48), "lat": np.linspace(-60, 60, 30), "lon": np.arange(40) * 9.0},
    )
    store = shared_tmp / "tas.zarr"
    ds.to_zarr(store, encoding={"tas": {"chunks": (12, 15, 20)}}, mode="w")

    opened = xr.open_zarr(store, chunks={})
    assert opened.tas.chunks is not None and len(opened.tas.data.chunks[0]) == 4
    z = opened.tas.mean(["lat", "lon"]).dot(opened.tas.T)
    got = z.compute()
    expected = np.einsum("t,tyx->xy", data.mean(axis=(1, 2)), data)
    assert got.dims == ("lon", "lat")
    np.testing.assert_allclose(got.values, expected, rtol=1e-10)
    assert float(opened.tas.mean().compute()) == pytest.approx(data.mean(), rel=1e-12)


def test_dashboard_through_gateway(cluster, server):
    base = f"{server.url}/clusters/{cluster.name}"
    with urllib.request.urlopen(f"{base}/status", timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/html")
        html = r.read().decode()
    assert "Bokeh" in html
    tokens = re.findall(r'"token"\s*:\s*"([^"]+)"', html)
    assert tokens, "no Bokeh session token in the status page"
    # The page loads its scripts relative to /clusters/<name>/ ...
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', html)
    assert scripts
    js = scripts[0] if scripts[0].startswith("http") else f"{base}/{scripts[0].lstrip('/')}"
    with urllib.request.urlopen(js, timeout=30) as r:
        assert r.status == 200
        assert len(r.read()) > 1000

    # ... and opens its WebSocket at <page>/ws with subprotocols ["bokeh", <token>].
    ws_url = f"ws://{server.host}:{server.port}{server.prefix}/clusters/{cluster.name}/status/ws"

    async def handshake():
        async with websockets.connect(ws_url, subprotocols=["bokeh", tokens[0]],
                                      open_timeout=30, max_size=None) as ws:
            assert ws.response.status_code == 101
            assert ws.subprotocol == "bokeh"
            first = await asyncio.wait_for(ws.recv(), 30)
            return first

    first = asyncio.run(handshake())
    assert '"msgtype": "ACK"' in first or '"msgtype":"ACK"' in first

    # The dashboard's root redirects to its status page, under the cluster's route.
    for root in (f"/clusters/{cluster.name}", f"/clusters/{cluster.name}/"):
        r = server.http("GET", root)
        assert r.status in (301, 302, 303, 307, 308), r
        assert r.headers["Location"] == f"{server.prefix}/clusters/{cluster.name}/status", r


def test_scale_to_four(cluster, client):
    cluster.scale(4)
    wait_workers(client, 4)
    futs = client.map(square, range(200))
    assert client.gather(futs) == [x * x for x in range(200)]
    assert n_workers(client) == 4
    # work was spread over more than one worker
    who = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(who) == 4
    assert sum(1 for v in who.values() if v > 0) >= 2


def test_adapt_up_and_down(cluster, client):
    cluster.adapt(minimum=0, maximum=4)
    wait_workers(client, 0, timeout=120)

    def slow(x):
        time.sleep(0.5)
        return x + 1

    futs = client.map(slow, range(40), pure=False)
    wait_for(lambda: n_workers(client) >= 1, 120, what="adaptive scale-up under load")
    assert client.gather(futs) == [x + 1 for x in range(40)]
    del futs
    wait_workers(client, 0, timeout=120)


def test_second_gateway_connects_by_name(server, cluster):
    other = server.gateway(USER)
    c2 = connect(other, cluster.name)
    try:
        assert c2.name == cluster.name
        assert c2.scheduler_address == cluster.scheduler_address
        c2.scale(1)
        with c2.get_client(set_as_default=False) as cl:
            wait_workers(cl, 1)
            assert cl.submit(lambda x: x * 10, 4).result(timeout=60) == 40
    finally:
        c2.close()  # shutdown_on_close=False for connect(): the cluster stays up
    assert gateway_status(server, cluster.name) == "RUNNING"


def gateway_status(server, name):
    return server.gateway(USER).get_cluster(name).status.name


def test_shutdown_removes_cluster(gateway, cluster, client):
    name = cluster.name
    client.close()
    cluster.shutdown()
    assert name not in [c.name for c in gateway.list_clusters()]
    stopped = wait_for(
        lambda: [c for c in gateway.list_clusters(status="stopped") if c.name == name],
        60,
        what="cluster listed as STOPPED",
    )
    assert stopped[0].stop_time is not None
    assert stopped[0].stop_time >= stopped[0].start_time
