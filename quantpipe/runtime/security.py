"""CURVE encryption and allow-list authentication for the pipeline's links.

Every link is a DEALER (upstream, the CURVE *client*) connecting to a ROUTER (downstream, the CURVE
*server*; see :mod:`quantpipe.runtime.link`). With security on:

* the server holds its own key pair and a set of allowed client public keys; a ZAP handler (pyzmq's
  :class:`zmq.auth.thread.ThreadAuthenticator`, one per context, serving every secured socket of that
  context under its own ZAP domain) accepts a handshake only from an allow-listed key. A peer with
  another key, or with no CURVE at all (plaintext), fails the handshake inside libzmq: not one of its
  frames reaches the application, so it can neither inject data nor disturb the link's accounting.
* the client holds its own key pair and the server's public key; a server with another key (a man in
  the middle) fails the handshake the other way round.
* ``ZAP_ENFORCE_DOMAIN`` is set, so a server whose ZAP handler is missing refuses every client
  instead of silently accepting any key (libzmq's historical default).

Wiring into a link is one call before ``bind`` / ``connect``::

    server = security.CurveServer.from_files("keys/stage1.key_secret", allow=["keys/stage0.key"])
    security.apply_server(router, server); router.bind(address)
    client = security.CurveClient.from_files("keys/stage0.key_secret", "keys/stage1.key")
    security.apply_client(dealer, client); dealer.connect(address)

:func:`for_process` derives both from a pipeline's key directory by process name (``source``,
``stage0`` ... ``stageK``, ``sink``). Call :func:`release` before terminating a context to stop its
authenticator thread. Keys never reach a log line: the authenticator logs through a filter that
redacts anything shaped like a Z85 key.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from quantpipe.errors import QuantpipeError
from quantpipe.runtime.keys import PUBLIC_SUFFIX, SECRET_SUFFIX, KeyFileError, KeyPair, load_keypair, load_public_key

__all__ = ["CurveServer", "CurveClient", "AllowList", "apply_server", "apply_client", "release", "for_process",
           "process_name", "RedactKeys", "SecureContext", "context"]

log = logging.getLogger(__name__)

# Z85 keys are exactly 40 characters of this alphabet; redact such a run (also inside b'...' reprs).
# Bounded on both sides so that long paths (which use the same characters) stay readable.
_Z85 = r"0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#"
_Z85_RUN = re.compile(rf"(?<![{_Z85}])[{_Z85}]{{40}}(?![{_Z85}])")


class RedactKeys(logging.Filter):
    """Replace anything that looks like a Z85 key in a record with ``<key>`` (keys never logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logger's problem, not a reason to leak
            message = str(record.msg)
        record.msg, record.args = _Z85_RUN.sub("<key>", message), None
        return True


class AllowList:
    """The client keys a server accepts (the ZAP credentials provider), with accept/deny counts."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = frozenset(keys)
        self.accepted = 0
        self.denied = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator thread with the client's Z85 public key."""
        ok = key in self.keys
        with self._lock:
            if ok:
                self.accepted += 1
            else:
                self.denied += 1
        if not ok:
            log.warning("refused a CURVE client whose key is not allow-listed (domain %s)", domain)
        return ok


@dataclass(frozen=True)
class CurveServer:
    """What a ROUTER needs: its key pair and the allowed client public keys (Z85)."""

    keypair: KeyPair
    allowed: frozenset[bytes] = field(repr=False)

    @classmethod
    def from_files(cls, secret_file: str | os.PathLike, allow: Iterable[str | os.PathLike]) -> CurveServer:
        """Load the server's ``.key_secret`` and the allowed clients' public keys.

        ``allow`` lists ``.key`` files and/or directories (every ``*.key`` inside is allowed).
        """
        keys: set[bytes] = set()
        for entry in allow:
            p = Path(entry)
            files = sorted(p.glob(f"*{PUBLIC_SUFFIX}")) if p.is_dir() else [p]
            keys.update(load_public_key(f) for f in files)
        if not keys:
            raise QuantpipeError("the CURVE allow-list is empty: copy the upstream's NAME.key next to this "
                                 "process's keys (no client could ever connect)")
        return cls(load_keypair(secret_file), frozenset(keys))


@dataclass(frozen=True)
class CurveClient:
    """What a DEALER needs: its key pair and the server's public key (Z85)."""

    keypair: KeyPair
    server_public: bytes

    @classmethod
    def from_files(cls, secret_file: str | os.PathLike, server_public_file: str | os.PathLike) -> CurveClient:
        return cls(load_keypair(secret_file), load_public_key(server_public_file))


class _ContextAuth:
    """The one ZAP handler of a context and the allow-list of each domain it serves."""

    def __init__(self, ctx: zmq.Context) -> None:
        zap_log = logging.getLogger(f"{__name__}.zap")
        if not any(isinstance(f, RedactKeys) for f in zap_log.filters):
            zap_log.addFilter(RedactKeys())  # pyzmq logs client keys at debug level
        self.auth = ThreadAuthenticator(ctx, log=zap_log)
        self.auth.start()
        self.domains = 0


_contexts: dict[int, tuple[zmq.Context, _ContextAuth]] = {}
_lock = threading.Lock()


def _auth_for(ctx: zmq.Context) -> _ContextAuth:
    with _lock:
        entry = _contexts.get(id(ctx))
        if entry is None or entry[0] is not ctx:
            entry = (ctx, _ContextAuth(ctx))
            _contexts[id(ctx)] = entry
        return entry[1]


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise QuantpipeError("this libzmq has no CURVE support: install pyzmq's wheels (they bundle libsodium)")


def apply_server(sock: zmq.Socket, server: CurveServer) -> AllowList:
    """Make ``sock`` (a ROUTER, before ``bind``) a CURVE server that accepts only allow-listed clients.

    Returns the :class:`AllowList`, whose ``accepted``/``denied`` counts a daemon can export.
    """
    _require_curve()
    state = _auth_for(sock.context)
    allow = AllowList(server.allowed)
    with _lock:
        state.domains += 1
        domain = f"quantpipe.{os.getpid()}.{state.domains}"
    state.auth.configure_curve_callback(domain=domain, credentials_provider=allow)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    if hasattr(zmq, "ZAP_ENFORCE_DOMAIN"):
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, server.keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, server.keypair.secret)
    return allow


def apply_client(sock: zmq.Socket, client: CurveClient) -> None:
    """Make ``sock`` (a DEALER, before ``connect``) a CURVE client of the server with ``server_public``."""
    _require_curve()
    sock.setsockopt(zmq.CURVE_SERVERKEY, client.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, client.keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, client.keypair.secret)


def release(ctx: zmq.Context) -> None:
    """Stop ``ctx``'s authenticator thread (call before ``ctx.term()``; harmless if it has none)."""
    with _lock:
        entry = _contexts.pop(id(ctx), None)
    if entry is not None and entry[0] is ctx:
        entry[1].auth.stop()


class SecureContext(zmq.Context):
    """A context whose ROUTER sockets are CURVE servers and whose DEALER sockets are CURVE clients.

    The links create their sockets from the context they are given, so handing a ``SecureContext`` to
    :class:`~quantpipe.runtime.stage.StageDaemon` (or the source / sink) secures every link of that
    process without touching the link code. Other socket types (the authenticator's own) are left alone.
    """

    # Declared on the class: pyzmq treats unknown instance attributes as socket-option defaults.
    qp_server: CurveServer | None = None
    qp_client: CurveClient | None = None
    allow_lists: list = []

    def __init__(self, server: CurveServer | None, client: CurveClient | None, io_threads: int = 1) -> None:
        super().__init__(io_threads)
        self.qp_server, self.qp_client, self.allow_lists = server, client, []

    def socket(self, socket_type: int, *args, **kwargs) -> zmq.Socket:  # type: ignore[override]
        sock = super().socket(socket_type, *args, **kwargs)
        try:
            if socket_type == zmq.ROUTER and self.qp_server is not None:
                self.allow_lists.append(apply_server(sock, self.qp_server))
            elif socket_type == zmq.DEALER and self.qp_client is not None:
                apply_client(sock, self.qp_client)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def denied(self) -> int:
        """Handshakes refused so far by this process's servers (not allow-listed keys)."""
        return sum(a.denied for a in self.allow_lists)

    def term(self) -> None:
        release(self)  # the authenticator's sockets would otherwise block term() forever
        super().term()

    def destroy(self, linger: int | None = None) -> None:
        release(self)
        super().destroy(linger)


def context(keys_dir: str | os.PathLike, k: int, n_stages: int) -> zmq.Context:
    """The ZeroMQ context for pipeline position ``k``: plain when ``keys_dir`` is empty, else secured
    with :func:`for_process` (CURVE on both of its links)."""
    if not keys_dir:
        return zmq.Context()
    server, client = for_process(keys_dir, k, n_stages)
    return SecureContext(server, client)


def process_name(k: int, n_stages: int) -> str:
    """The key name of pipeline position ``k``: -1 is the source, ``n_stages`` the sink."""
    if k == -1:
        return "source"
    if k == n_stages:
        return "sink"
    if 0 <= k < n_stages:
        return f"stage{k}"
    raise ValueError(f"position {k} is outside -1..{n_stages}")


def for_process(keys_dir: str | os.PathLike, k: int, n_stages: int) -> tuple[CurveServer | None, CurveClient | None]:
    """The CURVE settings of pipeline position ``k`` (-1 source, 0..n-1 stages, n sink).

    ``keys_dir`` holds this process's ``NAME.key_secret`` and its neighbours' ``NAME.key`` files. The
    server side allows exactly the upstream neighbour's key; the client side trusts exactly the
    downstream neighbour's key. The source has no server side, the sink no client side.
    """
    d = Path(keys_dir)
    me = d / f"{process_name(k, n_stages)}{SECRET_SUFFIX}"
    if not me.is_file():
        raise KeyFileError(f"{me} does not exist: run 'quantpipe keys generate --out {d} "
                           f"--name {process_name(k, n_stages)}' on this device")
    server = None if k == -1 else CurveServer.from_files(me, [d / f"{process_name(k - 1, n_stages)}{PUBLIC_SUFFIX}"])
    client = None if k == n_stages else CurveClient.from_files(me, d / f"{process_name(k + 1, n_stages)}{PUBLIC_SUFFIX}")
    return server, client
