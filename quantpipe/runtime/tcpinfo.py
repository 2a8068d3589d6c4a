"""How many bytes the TCP connection under a ZeroMQ DEALER has had acknowledged (Linux ``TCP_INFO``).

A link's application-level ack comes once per frame, so a frame that straddles a step of the link rate
is one sample that blends the old and the new rate (:mod:`quantpipe.runtime.bandwidth`). The kernel
knows more: ``tcpi_bytes_acked`` grows as the receiver's TCP acknowledges each segment, so while the
connection has data outstanding its growth *is* the link's delivery rate, measured inside the frame.
:class:`TcpProgress` finds the connection's file descriptor from the socket's monitor events
(``EVENT_CONNECTED`` carries it), and :meth:`TcpProgress.read` returns ``(delivered, backlogged)``,
``delivered`` being ``tcpi_bytes_acked`` plus the segments the peer acknowledged selectively (SACK),
``backlogged`` meaning that the connection still had unacknowledged or unsent bytes (so the counter was
limited by the link, not by a sender with nothing to send).

Read-only, best effort: the descriptor belongs to libzmq's I/O thread, so it is only ever queried
(``getsockopt``), never kept open, duplicated or closed here; a descriptor that went away (the monitor
says so, or the call fails) is forgotten until the next connection, and each connection has its own
:attr:`TcpProgress.generation`. Stretches in which the receiver's window, not the link, held the bytes
back (``tcpi_rwnd_limited`` grew, Linux 4.10+) are not backlogged: a slow reader is not a slow link.
Where ``TCP_INFO`` with ``tcpi_bytes_acked`` and ``tcpi_notsent_bytes`` (Linux 4.6+) is missing, or the link is not TCP (ipc://, inproc://), :meth:`read`
returns None and the estimator works from application acks alone, as before.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["TcpProgress", "tcp_progress_for"]

log = logging.getLogger(__name__)

# struct tcp_info (include/uapi/linux/tcp.h): offsets of the fields read here.
_SND_MSS = struct.Struct("<I")  # tcpi_snd_mss, offset 16
_UNACKED = struct.Struct("<I")  # tcpi_unacked, offset 24 (segments sent, not yet acked)
_SACKED = struct.Struct("<I")  # tcpi_sacked, offset 28 (segments the peer has selectively acknowledged)
_BYTES_ACKED = struct.Struct("<Q")  # tcpi_bytes_acked, offset 120 (RFC 4898 tcpEStatsAppHCThruOctetsAcked)
_NOTSENT = struct.Struct("<I")  # tcpi_notsent_bytes, offset 144
_RWND_LIMITED = struct.Struct("<Q")  # tcpi_rwnd_limited, offset 176 (us limited by the receive window, 4.10+)
_MIN_LEN = 148  # through tcpi_notsent_bytes (Linux 4.6)
_INFO_LEN = 192

_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


def _read_fd(fd: int) -> tuple[int, bool, int | None]:
    """(delivered bytes, backlogged, microseconds limited by the receive window or None) of TCP socket
    ``fd``; raises OSError if it is not one (any more)."""
    # Wraps the descriptor without duplicating it, and with family and type given so that nothing is
    # asked of it or set on it (a default socket timeout would make it non-blocking) ...
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fileno=fd)
    try:
        buf = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO_LEN)
    finally:
        s.detach()  # ... and gives it back untouched: libzmq owns and closes it
    if len(buf) < _MIN_LEN:
        raise OSError("TCP_INFO without tcpi_bytes_acked and tcpi_notsent_bytes (kernel older than 4.6)")
    # Cumulatively acked bytes jump when a retransmission fills a hole, by all that the peer had SACKed
    # beyond it; counting SACKed segments as they arrive keeps the counter at the link's pace through
    # loss recovery (exact when nothing is lost: then nothing is SACKed).
    acked = _BYTES_ACKED.unpack_from(buf, 120)[0] + _SACKED.unpack_from(buf, 28)[0] * _SND_MSS.unpack_from(buf, 16)[0]
    backlogged = _UNACKED.unpack_from(buf, 24)[0] > 0 or _NOTSENT.unpack_from(buf, 144)[0] > 0
    rwnd = _RWND_LIMITED.unpack_from(buf, 176)[0] if len(buf) >= 184 else None
    return acked, backlogged, rwnd


class TcpProgress:
    """The acknowledged-byte counter of the TCP connection a ZeroMQ socket keeps to one peer.

    Call :meth:`poll_events` often (the link does it in its pump) so that a reconnection is followed,
    and :meth:`close` before closing the socket.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(_EVENTS)
        self.fd: int | None = None
        #: changes with every connection (and loss of one): readings of two connections never mix
        self.generation = 0
        self._rwnd: tuple[float, int] | None = None  # (time, tcpi_rwnd_limited) of the previous reading

    def poll_events(self) -> None:
        """Follow connections and disconnections (non-blocking; about 1 us when nothing happened)."""
        while True:
            try:
                if not self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # the monitor is gone (the context is closing)
                self.fd = None
                return
            event, value = ev.get("event"), ev.get("value")
            if event == zmq.EVENT_CONNECTED:
                self._forget()
                self.fd = int(value)
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and value == self.fd:
                self._forget()

    def _forget(self) -> None:
        self.fd, self._rwnd = None, None
        self.generation += 1

    def read(self, now: float) -> tuple[int, bool] | None:
        """``(delivered bytes, backlogged)`` of the current connection at monotonic time ``now``, or None
        (none, or not readable)."""
        if self.fd is None:
            return None
        try:
            delivered, backlogged, rwnd = _read_fd(self.fd)
        except OSError as exc:
            log.debug("TCP_INFO of fd %s unreadable (%s): forgotten until the next connection", self.fd, exc)
            self._forget()
            return None
        if rwnd is not None:
            previous, self._rwnd = self._rwnd, (now, rwnd)
            if previous is not None and rwnd - previous[1] > 0.5e6 * (now - previous[0]):
                backlogged = False  # the receiver's window held the bytes back, not the link
        return delivered, backlogged

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)


def tcp_progress_for(sock: zmq.Socket, address: str) -> TcpProgress | None:
    """A :class:`TcpProgress` for a socket connected to ``address``, or None where it cannot work
    (not Linux, no ``TCP_INFO``, or not a ``tcp://`` address)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO") or not address.startswith("tcp://"):
        return None
    try:
        return TcpProgress(sock)
    except zmq.ZMQError as exc:  # e.g. a libzmq built without monitoring
        log.debug("no socket monitor for %s (%s): bandwidth from application acks only", address, exc)
        return None
