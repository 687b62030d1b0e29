"""Real loopback servers for the fetch-policy tests: a canary listener, an HTTP(S) server, a CA.

- :class:`Canary`: a listening TCP socket nobody should reach; ``connections()`` counts the
  connections that did (the kernel queues them whether or not anyone accepts).
- :class:`LoopbackHTTPServer`: ``http.server`` on 127.0.0.1 in daemon threads, with routes a
  test sets (``serve(path, body)`` or ``route(path, handler)``), TLS on demand, and a log of
  every request (path and Host header) and of the SNI names TLS clients sent.
- :func:`make_tls_files`: a throw-away CA and a server certificate for given DNS names, made with
  the ``openssl`` command.

Standard library only; every server stops in ``close()``, and slow handlers watch ``stopping``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Canary:
    """A TCP listener on a loopback address that must see no connection."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.bind((host, port))
            self._sock.listen(64)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[1]
        self._seen = 0

    def connections(self) -> int:
        """Connections that reached this listener so far (accepted and closed here)."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return self._seen
            conn.close()
            self._seen += 1

    def close(self) -> None:
        self._sock.close()


def canary_pair() -> tuple[Canary, Canary]:
    """Canaries on 127.0.0.1 and ::1 with the same port, so one URL template aims at both."""
    for _ in range(20):
        v4 = Canary("127.0.0.1")
        try:
            return v4, Canary("::1", v4.port)
        except OSError:
            v4.close()  # that port is taken on ::1; try another
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Request:
    path: str
    host: str | None


class LoopbackHTTPServer:
    """An HTTP (or, with ``tls``, HTTPS) server on a loopback address with routes set by tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self.sni_names: list[str | None] = []
        self.stopping = threading.Event()
        self.scheme = "https" if tls else "http"
        owner = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                owner.requests.append(Request(self.path, self.headers.get("Host")))
                route = owner.routes.get(self.path.split("?", 1)[0])
                try:
                    if route is None:
                        self.send_error(404)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on purpose: what the slow-server tests want
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        class _Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a refused TLS handshake or a cut connection is part of the tests

        self._server = _Server((host, port), _Handler)
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni_names.append(name)
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        name = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{self.scheme}://{name}:{self.port}{path}"

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def serve(self, path: str, body: bytes, *, content_length: bool = True) -> str:
        """Serve ``body`` at ``path``; without Content-Length the body ends when the connection does."""

        def handler(request: BaseHTTPRequestHandler) -> None:
            request.send_response(200)
            if content_length:
                request.send_header("Content-Length", str(len(body)))
            request.send_header("Connection", "close")
            request.end_headers()
            request.wfile.write(body)

        return self.route(path, handler)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        def handler(request: BaseHTTPRequestHandler) -> None:
            request.send_response(status)
            request.send_header("Location", location)
            request.send_header("Content-Length", "0")
            request.end_headers()

        return self.route(path, handler)

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


@dataclass
class TLSFiles:
    ca_path: Path
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))


def make_tls_files(folder: Path, dns_names: tuple[str, ...]) -> TLSFiles:
    """A new CA, and a certificate it signed for ``dns_names`` (EC keys: quick to make)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    ca_key, ca, key, csr, cert, ext = (folder / n for n in ("ca.key", "ca.pem", "leaf.key", "leaf.csr", "leaf.pem", "leaf.ext"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=safehub test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={dns_names[0]}")
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join('DNS:' + name for name in dns_names)}\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return TLSFiles(ca, cert, key)
