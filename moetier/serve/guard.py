"""What keeps web pages and idle sockets from reaching ``moetier serve``.

* :class:`RequestGuard` (ASGI middleware) refuses a request whose ``Host`` is not one of the
  server's names (DNS rebinding: a page on ``attacker.example`` resolving to 127.0.0.1 sends
  ``Host: attacker.example``) and any request carrying an ``Origin`` that ``--allow-origin``
  does not name (a cross-site ``fetch`` or form post); allowed origins get CORS headers from
  Starlette's CORSMiddleware, installed inside it. A request without ``Origin`` (curl, SDKs,
  servers) is not a browser's cross-site request and passes.
* :func:`guarded_protocol` is uvicorn's h11 protocol with read timeouts and a connection limit:
  a request's headers must arrive within ``read_timeout`` seconds of the connection (or of the
  previous response), its body may pause at most ``read_timeout`` between reads, and
  connections beyond ``max_connections`` are answered 503 and closed at once.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from moetier.serve.protocol import error_body

log = logging.getLogger("moetier.serve")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_name(header: str) -> str:
    """'Example.COM.:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.partition(":")[0]
    return h.rstrip(".")


class HostPolicy:
    """Which ``Host`` names are served. IP literals always are (a rebinding page sends its own
    domain name, never an address); names are: localhost, the bound host, and ``--allow-host``
    entries (``*`` allows any, ``.example.com`` a domain and its subdomains)."""

    def __init__(self, bind_host: str, allow: Iterable[str] = ()) -> None:
        allow = [a.strip().lower().rstrip(".") for a in allow if a.strip()]
        self.any = "*" in allow
        self.names = set(LOOPBACK_NAMES) | {a for a in allow if not a.startswith(".")}
        self.suffixes = tuple(a for a in allow if a.startswith("."))
        bind = host_name(bind_host)
        if bind not in WILDCARD_BINDS and not _is_ip(bind):
            self.names.add(bind)

    def allows(self, header: str | None) -> bool:
        if header is None or self.any:  # HTTP/1.0 without Host: not a browser
            return True
        h = host_name(header)
        return _is_ip(h) or h in self.names or any(h.endswith(s) or h == s[1:] for s in self.suffixes)


class RequestGuard:
    """Pure ASGI middleware: Host and Origin checks (see the module docstring)."""

    def __init__(self, app: Any, hosts: HostPolicy, allow_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = {o.rstrip("/") for o in allow_origins}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host")
        if not self.hosts.allows(host):
            msg = (
                f"Host '{host}' is not served here (DNS rebinding protection); "
                "start the server with --allow-host NAME to serve it"
            )
            await JSONResponse(error_body(msg, code="host_not_allowed"), status_code=403)(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and "*" not in self.origins and origin.rstrip("/") not in self.origins:
            msg = (
                f"Cross-origin requests from '{origin}' are refused; start the server with "
                "--allow-origin ORIGIN to let that web page call it"
            )
            await JSONResponse(error_body(msg, code="origin_not_allowed"), status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def guarded_protocol(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with read timeouts and a connection limit (see the module docstring)."""

    class GuardedH11Protocol(H11Protocol):
        _timer: Any = None
        _phase: str | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("connection limit (%d) reached: refusing a connection", max_connections)
                transport.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    b"Connection: close\r\nContent-Length: 2\r\n\r\n{}"
                )
                transport.close()
                return
            self._arm("headers")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _update(self) -> None:
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                self._arm("body")  # re-armed at each read: the body may not pause longer
            elif state is h11.IDLE:
                if self._phase != "headers":  # a total deadline for the next request's headers
                    self._arm("headers")
            else:
                self._cancel()  # the request is in; the app (or a stream) takes its time

        def _arm(self, phase: str) -> None:
            self._cancel()
            self._phase = phase
            self._timer = self.loop.call_later(read_timeout, self._timed_out)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _timed_out(self) -> None:
            phase, self._timer, self._phase = self._phase, None, None
            if self.transport.is_closing():
                return
            if phase == "headers":
                if self.conn.trailing_data[0]:  # half-sent headers get a 408; an idle connection just closes
                    body = b'{"error": {"message": "request headers not received in time"}}'
                    self.transport.write(
                        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
            else:
                log.info("%s:%s: request body stalled for %.0fs; closing", *(self.client or ("-", 0)), read_timeout)
            self.transport.close()  # the app sees a disconnect (ClientDisconnect -> 499)

    return GuardedH11Protocol
