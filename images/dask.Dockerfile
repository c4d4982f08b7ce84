# The default scheduler/worker image: Python with dask, distributed, dask-gateway (for the
# scheduler preload) and bokeh (dashboards), versions pinned in images/dask-requirements.txt to
# match the clients the tests use. Users' clients should run the same versions.
#   docker build -f images/dask.Dockerfile -t ghcr.io/dask-gateway-rs/dask:2026.8.0 images
FROM python:3.11.14-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY dask-requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
 && useradd --create-home --uid 1000 --shell /usr/sbin/nologin dask
USER 1000:1000
WORKDIR /home/dask
# The gateway's pod templates give the command (`dask scheduler ...` / `dask worker ...`).
CMD ["python", "-c", "import dask, distributed, dask_gateway; print(dask.__version__)"]
