"""TLS on both hops, driven from Python until the handover (the records are rustls', in Rust).

A :class:`TlsSocket` is a raw non-blocking socket with a ``_core.TlsConnection`` on it, offering
the few socket methods the handshakes use (``recv``, ``send``, ``shutdown``, ``close``,
``fileno``): every step of :mod:`wsgate._sockets` works on it unchanged, so the upgrade request
is read and judged by the same code as on a plain socket, and the TLS handshake happens inside
the first reads (under ``handshake_timeout``, counted as a pending upgrade). At the handover,
:meth:`TlsSocket.detach` gives the descriptor and :attr:`TlsSocket.tls` the connection to the
engine, which goes on with the same record state (``rust/stream.rs``).

Certificates: :func:`server_context` reads the PEM files of ``tls_cert``/``tls_key`` and
refuses, naming the key, a file it cannot read, a key that does not match, or a certificate
outside its validity. :func:`client_context` gives the roots bots' certificates are checked
against (the system's, or ``upstream_ca_file``).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from . import _core
from .config import AgentConfig, Config
from .errors import ConfigError

__all__ = ["Certificates", "TlsSocket", "client_context", "server_context"]

_RECV_SIZE = 65536

log = logging.getLogger("wsgate")


class TlsSocket:
    """A non-blocking socket with TLS on it, as :mod:`wsgate._sockets` uses sockets.

    ``recv`` and ``send`` keep the non-blocking contract (``BlockingIOError``: wait for the
    socket). Records the socket did not take at once wait in :attr:`pending`; ``send`` refuses
    more while any wait, and the caller waits for writability and calls :meth:`flush`.
    """

    __slots__ = ("_in", "_out", "sock", "tls")

    def __init__(self, sock: socket.socket, tls: _core.TlsConnection) -> None:
        self.sock = sock
        self.tls = tls
        self._out = b""
        # Bytes read from the socket that the connection did not take yet (it holds a bounded
        # amount of decrypted data: the rest waits here until that is read).
        self._in = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> bool:
        """Whether records wait to be written."""
        return bool(self._out)

    def flush(self) -> None:
        """Write waiting records, as much as the socket takes now."""
        self._out += self.tls.outgoing()
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                return
            self._out = self._out[sent:]

    def recv(self, size: int) -> bytes:
        """Decrypted bytes, at most ``size``; ``b""`` once the peer closed. Raises
        ``BlockingIOError`` when the socket has nothing yet, ``_core.TlsError`` (a
        ``ConnectionError``) when the peer's TLS fails."""
        while True:
            data = self.tls.read(size)
            if data is not None:
                return data
            raw = self._in or self.sock.recv(_RECV_SIZE)
            if not raw:
                return b""
            try:
                self._in = raw[self.tls.feed(raw) :]
            finally:
                self.flush()  # the handshake's answers (or the alert that ends it)

    def send(self, data: bytes | memoryview) -> int:
        """Encrypt and send ``data`` (all of it is taken); ``BlockingIOError`` while earlier
        records still wait."""
        self.flush()
        if self._out:
            raise BlockingIOError
        self.tls.write(bytes(data))
        self.flush()
        return len(data)

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self.tls.close_notify()
            self.flush()
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def settle(self) -> bytes:
        """Before the handover: give the connection every byte read from the socket, and
        return the decrypted bytes this frees (they go to the engine as pending bytes, ahead
        of anything the connection still holds)."""
        freed: list[bytes] = []
        while True:
            while data := self.tls.read(_RECV_SIZE):
                freed.append(data)
            if not self._in:
                return b"".join(freed)
            taken = self.tls.feed(self._in)
            if not taken and self.tls.read(1) is None:
                self._in = b""  # after the peer's close_notify: ignored, as TLS says
            self._in = self._in[taken:]

    def detach(self) -> int:
        """The descriptor, for the engine (with :attr:`tls`). Every record must be written
        first (:attr:`pending` false), and every byte read taken by the connection (the
        engine takes the connection, not our buffers): :meth:`settle` does both."""
        if self._out or self._in:
            raise RuntimeError("TLS bytes still wait in Python's buffers")
        return self.sock.detach()

    def getpeername(self) -> object:
        return self.sock.getpeername()


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r} ({exc.strerror or exc})") from None


def server_context(cert_file: str, key_file: str) -> _core.TlsServerContext:
    """The listener's TLS from PEM files, or ``ConfigError`` naming what is wrong."""
    chain, key = _read("tls_cert", cert_file), _read("tls_key", key_file)
    try:
        return _core.TlsServerContext(chain, key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def client_context(ca_file: str | None) -> _core.TlsClientContext:
    """Roots for bots' certificates: the system's, or only those of ``ca_file`` (PEM)."""
    try:
        roots = None if ca_file is None else _read("upstream_ca_file", ca_file)
        return _core.TlsClientContext(roots)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class Certificates:
    """A gateway's TLS: the listener's certificate (None: plain), and the roots for its
    ``wss://`` bots by CA file. Every file is read when it is built, so a bad one is a
    ``ConfigError`` at start, not at the first session."""

    def __init__(self, config: Config) -> None:
        self._settings = config.gateway
        #: The listener's TLS now; :meth:`reload` swaps it.
        self.listener = self._read_listener()
        self._bots: dict[str | None, _core.TlsClientContext] = {}
        for agent in config.agents:
            if any(url.tls for url in agent.upstream_urls):
                self.for_bots(agent)

    def _read_listener(self) -> _core.TlsServerContext | None:
        cert, key = self._settings.tls_cert, self._settings.tls_key
        return None if cert is None or key is None else server_context(cert, key)

    def reload(self) -> bool:
        """Read ``tls_cert`` and ``tls_key`` again: new connections get the new certificate,
        live sessions keep theirs. A file that cannot be used keeps the old certificate and is
        logged. Returns whether the new one was taken."""
        if self.listener is None:
            return False
        try:
            self.listener = self._read_listener()
        except ConfigError as exc:
            log.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            return False
        log.info("TLS certificate reloaded")
        return True

    def for_bots(self, agent: AgentConfig) -> _core.TlsClientContext:
        """The roots for this agent's ``wss://`` bots (its ``upstream_ca_file``, the gateway's,
        or the system's); also for a bot ``authorize`` picked."""
        ca_file = agent.upstream_ca_file or self._settings.upstream_ca_file
        context = self._bots.get(ca_file)
        if context is None:
            context = self._bots[ca_file] = client_context(ca_file)
        return context
