"""Free TCP ports for the processes the tests start."""

import socket

_given: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 that this test run has not handed out before.

    A port from `bind(0)` is free again as soon as it is returned, and the kernel may hand the
    same one out twice: a gateway that is down for a restart test would then find its port taken
    by the next server a test starts, or a hub's three ports could coincide.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
