"""The benchmarks behind ``quantpipe bench`` (codec, pipeline), and what they and bench/ share."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

__all__ = ["free_port", "wait_http_ready"]

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


def wait_http_ready(url: str, timeout_s: float = 20.0, process: subprocess.Popen | None = None,
                    poll_s: float = 0.1) -> None:
    """Until ``GET http://URL/v2/health/ready`` answers 200 (a ``quantpipe serve`` at ``URL`` is ready).

    Raises:
        TimeoutError: not ready within ``timeout_s``, or ``process`` (the server, when the caller started
            it) exited first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            raise TimeoutError(f"the server at {url} did not become ready")
        time.sleep(poll_s)
