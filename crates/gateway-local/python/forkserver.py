"""The local backend's fork server: one long-lived Python per environment that has imported
`distributed` (and the modules the configuration lists) and forks `dask worker` and
`dask scheduler` processes from itself, so each starts in milliseconds instead of paying
Python's imports again.

Protocol, over the standard streams the gateway gives it:

* stdin: requests, each a 4-byte big-endian length and that many bytes of JSON:
  {"command": "worker"|"scheduler", "argv0": "...", "args": [...], "env": {...}, "cwd": "...",
   "log": "..."}
* stdout: one JSON object per line:
  {"ready": <pid>} once the imports are done;
  {"started": <pid>} after each request (in request order);
  {"exit": <pid>, "code": <int>} when a child exits (a signal as its negative number).

The server never decodes a request: it reads the bytes into one fixed buffer, forks, and
overwrites the buffer in itself, so no user's environment stays in the memory later children
inherit. The child decodes the request, becomes the leader of a new session and process group,
opens its log, takes on the environment and working directory,
re-reads Dask's configuration for that environment and runs the command's `main`.

The server and its children run under the gateway's own account: the gateway uses it only in
single-user mode (with user isolation every process is exec'd under the user's account).

When stdin closes (the gateway stopped or died) the server exits; its children carry on, and the
next gateway adopts them as it adopts any process it did not start.
"""

import importlib
import json
import os
import selectors
import signal
import sys

MAX_REQUEST = 4 << 20
ENV_ROOM = "DGRS_FORKSERVER_ENV_ROOM"
# The gateway starts the server with the seed a nanny gives worker processes.
SERVER_HASH_SEED = os.environ.get("PYTHONHASHSEED")


def _emit(obj):
    os.write(1, (json.dumps(obj) + "\n").encode())


def _read_into(fd, view):
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            return False
        got += n
    return True


def _rewrite_region(index, entries):
    """Writes `entries`, NUL-separated, over one of the memory regions the kernel shows as this
    process's /proc/<pid>/cmdline (index 45: arg_start, arg_end) or /proc/<pid>/environ
    (index 47: env_start, env_end), as many whole entries as fit, the rest zeroed. The gateway
    starts the server with a blank argument and a blank variable that make this room."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[index]), int(fields[index + 1])
        room = end - start
        out = b""
        for entry in entries:
            data = entry.encode(errors="surrogateescape") + b"\0"
            if len(out) + len(data) > room:
                if not out:  # a first entry that does not fit is cut rather than dropped
                    out = data[: room - 1] + b"\0"
                break
            out += data
        import ctypes

        ctypes.memmove(start, out + b"\0" * (room - len(out)), room)
    except Exception:
        pass


def _set_title(words):
    """What `ps` shows for this process: its command line as an exec would have made it."""
    _rewrite_region(45, words)


def _set_environ_view(env):
    """What /proc/<pid>/environ shows: the environment the process really runs with."""
    _rewrite_region(47, [f"{k}={v}" for k, v in env.items()])


def _reseed():
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed()
        except Exception:
            pass


def _logging_settings(config):
    return [config.get(k) for k in ("logging", "logging-file-config", "version")] + [
        config.get("distributed", {}).get("admin", {}).get("log-format")
    ]


def _worker_hash_seed(dc):
    """The PYTHONHASHSEED a nanny gives its worker process under this configuration."""
    pre_spawn = dict(dc.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    if str(pre_spawn.get("PYTHONHASHSEED")) in ("None", "0"):
        pre_spawn["PYTHONHASHSEED"] = "6640"  # distributed's own choice
    pre_spawn.update(dc.get("distributed.nanny.environ", default={}) or {})
    return str(pre_spawn["PYTHONHASHSEED"])


def _refresh_dask_config():
    import dask.config as dc

    before = _logging_settings(dc.config)
    if hasattr(dc, "_get_paths"):
        paths = dc._get_paths()
    else:
        import site

        paths = [
            os.getenv("DASK_ROOT_CONFIG", "/etc/dask"),
            os.path.join(sys.prefix, "etc", "dask"),
            *[os.path.join(p, "etc", "dask") for p in site.PREFIXES],
            os.path.join(os.path.expanduser("~"), ".config", "dask"),
        ]
        if "DASK_CONFIG" in os.environ:
            paths.append(os.environ["DASK_CONFIG"])
    dc.paths[:] = paths
    dc.PATH = os.environ.get(
        "DASK_CONFIG", os.path.join(os.path.expanduser("~"), ".config", "dask")
    )
    dc.refresh()
    # A worker's nanny forks its worker process too (the interpreter already has everything
    # imported), unless the user's own configuration chose a method, or gives worker processes
    # a str hash seed other than this interpreter's (a fork keeps the parent's; the nanny gives
    # every worker process the same seed so that hash() agrees across workers).
    key = "distributed.worker.multiprocessing-method"
    chosen = dc.get(key, default=None, config=dc.collect())
    if chosen is None and _worker_hash_seed(dc) == SERVER_HASH_SEED:
        dc.config.setdefault("distributed", {}).setdefault("worker", {})[key.split(".")[-1]] = "fork"
    if _logging_settings(dc.config) != before:
        # The user's environment configures logging: redo it from scratch as a fresh process
        # would (distributed adds handlers again on each call).
        import logging

        from distributed.config import initialize_logging

        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger):
                logger.handlers.clear()
        initialize_logging(dc.config)


def _child(data):
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    req = json.loads(bytes(data))
    del data
    os.setsid()
    log = os.open(
        req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600
    )
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, 1 << 16)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    # The C library no longer points into the original environment block: show the real one.
    _set_environ_view(os.environ)
    import tempfile

    tempfile.tempdir = None
    _reseed()
    os.register_at_fork(after_in_child=_reseed)
    _refresh_dask_config()
    command = req["command"]
    _set_title([sys.executable, req.get("argv0", "dask"), command, *req["args"]])
    if command == "worker":
        from distributed.cli.dask_worker import main
    elif command == "scheduler":
        from distributed.cli.dask_scheduler import main
    else:
        raise SystemExit(f"unknown command {command!r}")
    sys.argv = ["dask " + command, *req["args"]]
    main.main(args=req["args"], prog_name="dask " + command)


def serve(preimport):
    _set_title([sys.executable, "dask-gateway-rs-forkserver", *preimport])
    os.environ.pop(ENV_ROOM, None)
    import dask  # noqa: F401
    import distributed  # noqa: F401
    import distributed.cli.dask_scheduler  # noqa: F401
    import distributed.cli.dask_worker  # noqa: F401
    import distributed.nanny  # noqa: F401

    # What a scheduler and a worker import as they start: the preload, and their dashboards
    # and HTTP routes (bokeh, the heaviest part, when it is installed).
    started = [
        "dask_gateway.scheduler_preload",
        "distributed.dashboard.scheduler",
        "distributed.dashboard.worker",
        "distributed.http.scheduler.info",
        "distributed.http.scheduler.json",
        "distributed.http.scheduler.prometheus",
        "distributed.http.worker.prometheus",
        "distributed.http.health",
        "distributed.http.proxy",
        "distributed.http.statics",
        "distributed.diagnostics.websocket",
    ]
    for name in [*started, *preimport]:
        try:
            importlib.import_module(name)
        except Exception as e:  # a missing extra must not stop the server
            print(f"forkserver: not preimported {name}: {e}", file=sys.stderr, flush=True)
    buf = bytearray(MAX_REQUEST)
    header = bytearray(4)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    _emit({"ready": os.getpid()})
    while True:
        for key, _ in sel.select():
            if key.fd == wake_r:
                try:
                    while os.read(wake_r, 256):
                        pass
                except BlockingIOError:
                    pass
                _reap()
                continue
            if not _read_into(0, memoryview(header)):
                return
            n = int.from_bytes(header, "big")
            if n > MAX_REQUEST:
                print(f"forkserver: request of {n} bytes refused", file=sys.stderr, flush=True)
                return
            view = memoryview(buf)[:n]
            if not _read_into(0, view):
                return
            pid = os.fork()
            if pid == 0:
                # The child leaves through the interpreter's normal exit (atexit handlers,
                # flushed streams), exactly as a `dask worker` started by exec would.
                _child(view)
                sys.exit(0)
            view[:] = bytes(n)
            del view
            _emit({"started": pid})
        _reap()


def _reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)  # a signal as its negative number
        _emit({"exit": pid, "code": code})


if __name__ == "__main__":
    os.chdir("/")
    serve([m for m in sys.argv[1:] if m.strip()])
