"""The benchmarks behind ``quantpipe bench`` (codec, pipeline), and what they and bench/ share."""

from __future__ import annotations

import socket

__all__ = ["free_port"]

_GIVEN: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` that this process was never given before.

    The kernel can hand out a port again as soon as it is closed, so asking one at a time could give two
    addresses of one config the same port (seen in CI). Remembering what was given rules that out."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
