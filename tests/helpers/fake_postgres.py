"""A fake PostgreSQL server on 127.0.0.1 that asks for a password in the clear (or MD5), or
accepts anyone without authentication ("trust").

It speaks just enough of the v3 protocol: it declines SSLRequest/GSSENCRequest with 'N',
reads the StartupMessage (recording the user), answers AuthenticationCleartextPassword
(R, code 3) or AuthenticationMD5Password (R, code 5), and records whatever PasswordMessage
('p') arrives. That is exactly what an impostor on `spec.database.host` would do to learn the
admin password; a client that refuses never sends the 'p' message.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
TRUST = 0
CLEARTEXT = 3
MD5 = 5


@dataclass
class Attempt:
    user: str | None = None
    password_message: bytes | None = None
    accepted: bool = False


@dataclass
class FakePostgres:
    """Use as a context manager; `.port`, `.attempts` (one per connection handled)."""

    auth_code: int = CLEARTEXT
    host: str = "127.0.0.1"
    attempts: list[Attempt] = field(default_factory=list)
    port: int = 0
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> FakePostgres:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-pg")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    @property
    def passwords(self) -> list[bytes]:
        with self._lock:
            return [a.password_message for a in self.attempts if a.password_message]

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.attempts)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                attempt = Attempt()
                with self._lock:
                    self.attempts.append(attempt)
                try:
                    self._handle(conn, attempt)
                except (OSError, ValueError):
                    pass  # the client hung up: that is the refusal we want to see

    @staticmethod
    def _read_exact(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ValueError("connection closed")
            out += chunk
        return out

    def _handle(self, conn: socket.socket, attempt: Attempt) -> None:
        while True:
            (length,) = struct.unpack("!I", self._read_exact(conn, 4))
            body = self._read_exact(conn, length - 4)
            (code,) = struct.unpack("!I", body[:4])
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                conn.sendall(b"N")
                continue
            break
        params = body[4:].split(b"\0")
        for key, value in zip(params[::2], params[1::2], strict=False):
            if key == b"user":
                attempt.user = value.decode(errors="replace")
        if self.auth_code == TRUST:
            # "trust": no authentication, straight to ReadyForQuery (an impostor accepting
            # anyone, to receive the DDL and role verifiers that would follow). Recorded
            # before answering: the client may check the record as soon as it is in.
            attempt.accepted = True
            conn.sendall(b"R" + struct.pack("!II", 8, TRUST) + b"Z" + struct.pack("!I", 5)
                         + b"I")
            conn.recv(1024)
            return
        if self.auth_code == MD5:
            conn.sendall(b"R" + struct.pack("!II", 12, MD5) + b"salt")
        else:
            conn.sendall(b"R" + struct.pack("!II", 8, CLEARTEXT))
        kind = self._read_exact(conn, 1)
        (length,) = struct.unpack("!I", self._read_exact(conn, 4))
        payload = self._read_exact(conn, length - 4)
        if kind == b"p":
            attempt.password_message = payload
        # then fail the login, as a real server would for a wrong password
        message = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        conn.sendall(b"E" + struct.pack("!I", len(message) + 4) + message)
