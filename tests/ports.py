"""A free TCP port on localhost for a test's process group (gloo rendezvous, accelerate)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
