"""A fault-injection TCP proxy for PostgreSQL, for tests.

Some failures cannot be produced with a healthy local server alone. The one that matters most
is a COMMIT that the server did perform but whose acknowledgement never reached the client:
the client sees its connection lost during COMMIT and cannot tell whether its transaction
committed, and code that records progress in SQL has to cope with that. Connections killed
under an open session are the other one. ``PgFaultProxy`` sits between a client and a real
server, relays the bytes, frames the v3 wire protocol just enough to recognise the messages
that matter, and injects these faults on demand:

* ``arm_drop_commit_ack(marker)``: the first connection that sends ``marker`` (say, inside a
  ``SELECT 'marker'`` in its transaction) has its next COMMIT forwarded to the server; the
  proxy waits for the server's reply (CommandComplete ``COMMIT`` and ReadyForQuery, so the
  commit has certainly happened), relays none of it, and resets both sockets.
* ``kill_all()``: reset every relayed connection at once.

The proxy has to read the stream, so clients must connect in plaintext: ``proxy.url(url)``
sets ``sslmode=disable`` and ``gssencmode=disable``. If a client negotiates SSL or GSSAPI
anyway, the negotiation is relayed and the connection is then passed through untouched.

psycopg 3 sends ``connection.commit()`` as a simple query (a ``Q`` message with the text
``COMMIT``), except in pipeline mode, where it uses the extended protocol (Parse/Bind/Execute
with an unnamed statement, then Sync); both are recognised. In pipeline mode, the replies
to statements sent after the last Sync before the COMMIT are swallowed with it. A COMMIT that
fails on the server (its reply has no CommandComplete ``COMMIT``) is relayed normally, and the
connection stays the victim for its next COMMIT.

Standard library only. Each client connection is served by its own thread, which moves bytes
in both directions with non-blocking sockets and a selector, so nothing needs coordinating
between threads and a connection can be killed by waking its selector.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import urllib.parse
from types import TracebackType
from typing import Literal

__all__ = ["PgFaultProxy"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_TLS_HANDSHAKE = 0x16  # first byte of a TLS ClientHello (PostgreSQL 17's direct SSL)

_CHUNK = 65536
_HIGH_WATER = 1 << 20  # stop reading a side while this much waits to be written to the other
_CONNECT_TIMEOUT = 5.0
_FLUSH_TIMEOUT = 1.0
_JOIN_TIMEOUT = 5.0

# Query parameters that would send the client elsewhere or let it negotiate encryption.
_OVERRIDDEN_PARAMS = frozenset({"host", "hostaddr", "port", "sslmode", "gssencmode"})

_ABORT_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


class _FramingError(Exception):
    """Bytes that are not the PostgreSQL protocol as understood here."""


def _split_untyped(buf: bytearray) -> bytes | None:
    """Take one startup-phase message (int32 length, itself included) off ``buf``."""
    if len(buf) < 8:
        return None
    (length,) = struct.unpack_from("!i", buf)
    if length < 8:
        raise _FramingError(f"untyped message length {length}")
    if len(buf) < length:
        return None
    message = bytes(buf[:length])
    del buf[:length]
    return message


def _split_typed(buf: bytearray) -> bytes | None:
    """Take one typed message (type byte, int32 length, itself included) off ``buf``."""
    if len(buf) < 5:
        return None
    (length,) = struct.unpack_from("!i", buf, 1)
    if length < 4:
        raise _FramingError(f"typed message length {length}")
    if len(buf) < 1 + length:
        return None
    message = bytes(buf[: 1 + length])
    del buf[: 1 + length]
    return message


def _is_commit_sql(sql: bytes) -> bool:
    return sql.rstrip(b"\0").strip().rstrip(b";").strip().upper() == b"COMMIT"


def _is_commit(message: bytes) -> bool:
    """Whether a typed client message sends COMMIT (simple query, or a Parse of one)."""
    kind, body = message[:1], message[5:]
    if kind == b"Q":
        return _is_commit_sql(body)
    if kind == b"P":  # Parse: statement name NUL, query NUL, parameter types
        _name, _, rest = body.partition(b"\0")
        sql, _, _types = rest.partition(b"\0")
        return _is_commit_sql(sql)
    return False


class _Relay:
    """One client connection and its upstream connection, served by one thread."""

    def __init__(
        self, proxy: PgFaultProxy, client: socket.socket, server: socket.socket, number: int
    ) -> None:
        self._proxy = proxy
        self._client = client
        self._server = server
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._closed = False
        self.thread = threading.Thread(
            target=self._run, name=f"pgproxy-relay-{number}", daemon=True
        )
        self._phase: Literal["startup", "typed", "transparent"] = "startup"
        self._answers_expected = 0  # one-byte answers owed to SSLRequest/GSSENCRequest
        self._from_client = bytearray()  # received, not yet a whole message
        self._to_server = bytearray()
        self._from_server = bytearray()
        self._to_client = bytearray()
        # ReadyForQuery messages the client is owed (one for the startup, one per simple
        # query, Sync or function call) and has been sent; in pipeline mode, those owed for
        # requests before the COMMIT are relayed before the COMMIT's reply is held back.
        self._ready_owed = 0
        self._ready_seen = 0
        self._ready_before_commit = 0
        # Dropping a COMMIT acknowledgement: server replies are held back, not relayed.
        self._dropping = False
        self._commit_done = False
        self._held = bytearray()
        self.dropped = False

    def start(self) -> None:
        self.thread.start()

    def kill(self) -> None:
        """Ask the relay thread to reset both connections (it does so at once)."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        abortive = True
        try:
            for sock in (self._client, self._server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                self._want(selector, self._client, self._to_client, self._to_server)
                self._want(selector, self._server, self._to_server, self._to_client)
                for key, events in selector.select():
                    if key.fileobj is self._wake_r:
                        return  # killed
                    if key.fileobj is self._client:
                        sock, outgoing = self._client, self._to_client
                    else:
                        sock, outgoing = self._server, self._to_server
                    if events & selectors.EVENT_WRITE:
                        self._send_some(sock, outgoing)
                    if events & selectors.EVENT_READ:
                        try:
                            data = sock.recv(_CHUNK)
                        except (BlockingIOError, InterruptedError):
                            continue  # a spurious wake-up
                        if not data:
                            abortive = self._dropping  # the server left during our COMMIT
                            if not abortive:
                                self._flush_before_close(sock)
                            return
                        if sock is self._client:
                            self._client_data(data)
                        else:
                            self._server_data(data)
                        if self.dropped:
                            return
        except OSError:
            pass  # a reset or similar from either side ends the relay
        finally:
            selector.close()
            self._close(abortive=abortive)
            self._proxy._relay_ended(self)

    @staticmethod
    def _want(
        selector: selectors.BaseSelector,
        sock: socket.socket,
        outgoing: bytearray,
        peer_outgoing: bytearray,
    ) -> None:
        """Watch ``sock`` for writing while it has bytes waiting, for reading unless its
        peer's queue is full (back-pressure)."""
        events = 0
        if len(peer_outgoing) < _HIGH_WATER:
            events |= selectors.EVENT_READ
        if outgoing:
            events |= selectors.EVENT_WRITE
        try:
            key: selectors.SelectorKey | None = selector.get_key(sock)
        except KeyError:
            key = None
        if key is None:
            if events:
                selector.register(sock, events)
        elif not events:
            selector.unregister(sock)
        elif key.events != events:
            selector.modify(sock, events)

    @staticmethod
    def _send_some(sock: socket.socket, outgoing: bytearray) -> None:
        try:
            sent = sock.send(outgoing)
        except (BlockingIOError, InterruptedError):
            return
        del outgoing[:sent]

    def _flush_before_close(self, eof_sock: socket.socket) -> None:
        """One side closed: pass on what is queued for the other, briefly, then end."""
        other, outgoing = (
            (self._server, self._to_server)
            if eof_sock is self._client
            else (self._client, self._to_client)
        )
        if outgoing:
            other.settimeout(_FLUSH_TIMEOUT)
            other.sendall(outgoing)
            outgoing.clear()

    def _close(self, *, abortive: bool) -> None:
        with self._lock:
            self._closed = True
            for sock in (self._client, self._server):
                if abortive:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT_LINGER)
                sock.close()
            self._wake_r.close()
            self._wake_w.close()

    # -- framing ----------------------------------------------------------------------------

    def _parsing(self) -> bool:
        return self._phase != "transparent"

    def _go_transparent(self) -> None:
        """Stop reading the protocol (encrypted, cancelled or not understood): relay bytes."""
        self._phase = "transparent"
        self._answers_expected = 0
        self._to_server += self._from_client
        self._from_client.clear()
        self._to_client += self._from_server
        self._from_server.clear()

    def _client_data(self, data: bytes) -> None:
        if self._phase == "transparent":
            self._to_server += data
            return
        self._from_client += data
        try:
            while self._parsing():
                if self._phase == "startup":
                    if self._from_client[:1] == bytes([_TLS_HANDSHAKE]):
                        self._go_transparent()
                        return
                    message = _split_untyped(self._from_client)
                else:
                    message = _split_typed(self._from_client)
                if message is None:
                    return
                self._client_message(message)
        except _FramingError:
            self._go_transparent()

    def _client_message(self, message: bytes) -> None:
        self._to_server += message
        if self._phase == "startup":
            (code,) = struct.unpack_from("!i", message, 4)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                self._answers_expected += 1  # another untyped message follows the answer
            elif code == _CANCEL_REQUEST:
                self._go_transparent()  # the server just closes the connection
            else:
                self._phase = "typed"  # StartupMessage: typed messages from now on
                self._ready_owed += 1
            return
        if self._proxy._is_victim_commit(self, message):
            self._dropping = True
            self._ready_before_commit = self._ready_owed
        if message[:1] in (b"Q", b"S", b"F"):
            self._ready_owed += 1

    def _server_data(self, data: bytes) -> None:
        if self._phase == "transparent":
            self._to_client += data
            return
        self._from_server += data
        try:
            while self._parsing() and not self.dropped:
                if self._answers_expected and not self._from_server:
                    return
                if self._answers_expected and bytes(self._from_server[:1]) in (b"N", b"S", b"G"):
                    answer = bytes(self._from_server[:1])
                    del self._from_server[:1]
                    self._answers_expected -= 1
                    self._to_client += answer
                    if answer != b"N":  # TLS or GSSAPI from the next byte on
                        self._go_transparent()
                    continue
                self._answers_expected = 0  # e.g. an ErrorResponse instead of an answer
                message = _split_typed(self._from_server)
                if message is None:
                    return
                self._server_message(message)
        except _FramingError:
            self._go_transparent()

    def _server_message(self, message: bytes) -> None:
        kind = message[:1]
        if not self._dropping or self._ready_seen < self._ready_before_commit:
            self._to_client += message
            if kind == b"Z":
                self._ready_seen += 1
            return
        self._held += message
        if kind == b"C" and message[5:].rstrip(b"\0") == b"COMMIT":
            self._commit_done = True
        elif kind == b"Z":
            self._ready_seen += 1
            if self._commit_done:
                self.dropped = True  # committed on the server; the client will never know
            else:  # the COMMIT failed (or rolled back): nothing to hide, relay it and go on
                self._dropping = False
                self._to_client += self._held
                self._held.clear()


class PgFaultProxy:
    """A TCP proxy in front of a PostgreSQL server that can drop a COMMIT's acknowledgement
    and kill connections (see the module docstring)."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        self.commit_dropped = threading.Event()
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._victim: _Relay | None = None
        self._relays: set[_Relay] = set()
        self._threads: list[threading.Thread] = []
        self._count = 0
        self._stopped = False
        self._accept_thread: threading.Thread | None = None
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(64)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]

    def url(self, database_url: str) -> str:
        """``database_url`` (an SQLAlchemy or libpq URL) pointed at this proxy, in plaintext."""
        parts = urllib.parse.urlsplit(database_url)
        userinfo, at, _hostport = parts.netloc.rpartition("@")
        query = [
            (name, value)
            for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if name not in _OVERRIDDEN_PARAMS
        ]
        query += [("sslmode", "disable"), ("gssencmode", "disable")]
        return urllib.parse.urlunsplit(
            parts._replace(
                netloc=f"{userinfo}{at}127.0.0.1:{self.port}",
                query=urllib.parse.urlencode(query),
            )
        )

    def start(self) -> PgFaultProxy:
        """Accept and relay connections in daemon threads, until ``stop()``."""
        with self._lock:
            if self._accept_thread is not None or self._stopped:
                raise RuntimeError("PgFaultProxy can be started once")
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name=f"pgproxy-accept-{self.port}", daemon=True
            )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join the threads."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._wake_w.send(b"\0")
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_TIMEOUT)
        self.kill_all()  # the accept loop has ended: no relay starts after this
        for thread in self._threads:
            thread.join(_JOIN_TIMEOUT)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def arm_drop_commit_ack(self, marker: str) -> None:
        """Drop the acknowledgement of the next COMMIT of the first connection that sends
        ``marker``, once; ``commit_dropped`` is set when that has happened."""
        with self._lock:
            self._marker = marker.encode()
            self._victim = None
            self.commit_dropped.clear()

    def kill_all(self) -> None:
        """Reset every relayed connection, both sides, and wait until they are closed."""
        with self._lock:
            relays = list(self._relays)
        for relay in relays:
            relay.kill()
        for relay in relays:
            relay.thread.join(_JOIN_TIMEOUT)

    def __enter__(self) -> PgFaultProxy:
        if self._accept_thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _events in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        client, _address = self._listener.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    self._serve(client)
        finally:
            selector.close()

    def _serve(self, client: socket.socket) -> None:
        client.setblocking(True)
        try:
            server = socket.create_connection(self.upstream, timeout=_CONNECT_TIMEOUT)
        except OSError:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT_LINGER)
            client.close()
            return
        with self._lock:
            self._count += 1
            relay = _Relay(self, client, server, self._count)
            self._relays.add(relay)
            self._threads.append(relay.thread)
        relay.start()

    def _is_victim_commit(self, relay: _Relay, message: bytes) -> bool:
        """Note a client message; whether it is the COMMIT whose acknowledgement to drop."""
        with self._lock:
            if self._marker is None:
                return False
            if self._victim is None:
                if self._marker in message:
                    self._victim = relay
                return False
            return self._victim is relay and _is_commit(message)

    def _relay_ended(self, relay: _Relay) -> None:
        with self._lock:
            self._relays.discard(relay)
            if self._victim is relay:
                self._victim = None  # another connection may still send the marker
                if relay.dropped:
                    self._marker = None  # done: disarm
        if relay.dropped:
            self.commit_dropped.set()
