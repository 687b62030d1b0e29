"""requests and httpx in the sandbox: GET and HEAD asked of the parent, everything else refused by name.

Installed by ``shims.py`` when each library is imported. The patch sits where every use of the
library passes, so sessions, clients and the module-level helpers are all covered:

- requests: ``HTTPAdapter.send`` (``requests.get``, ``requests.head``, ``Session`` use).
- httpx, and httpx2 (huggingface_hub 2's client, same layout): ``HTTPTransport``, which every
  sync ``Client`` and ``httpx.get`` use; its constructor no longer builds an SSL context (the
  sandbox cannot read the system's CA files, and the parent verifies TLS). The async transport
  refuses with a message that names it.

A GET comes back after the parent followed its redirects (each hop checked against its policy),
as urllib's would. A HEAD comes back as the server answered it, redirect included, so the
library follows it (or not) the way it would on its own: ``requests.head`` does not,
huggingface_hub reads the Hub's metadata off the redirect itself. Other methods fail with an
error of the library's own kind that names ``Sandbox(network=True)``.
"""

from __future__ import annotations

import importlib
import io
import sys
from typing import Any

from . import shims


fetch = shims.fetch  # one way to ask the parent for a GET or HEAD


def refusal(library: str, method: str, url: Any) -> str:
    return f"safehub: only GET and HEAD go through the parent, not {library} {method} {url}; {shims.NO_NETWORK}"


# -- requests ----------------------------------------------------------------------------------


def patch_requests(requests: Any) -> None:
    adapters = sys.modules.get("requests.adapters") or importlib.import_module("requests.adapters")

    def send(self: Any, request: Any, **kwargs: Any) -> Any:
        if request.method not in ("GET", "HEAD"):
            raise requests.ConnectionError(refusal("requests", request.method, request.url), request=request)
        try:
            value, body = fetch(request.url, request.method)
        except OSError as exc:
            raise requests.ConnectionError(str(exc), request=request) from None
        response = requests.Response()
        response.status_code = int(value.get("status", 200))
        response.headers.update(value.get("headers") or {})
        response.url = str(value.get("url", request.url))
        response.raw = io.BytesIO(body)
        response._content = body
        response.request = request
        response.reason = ""
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        return response

    adapters.HTTPAdapter.send = send


# -- httpx and httpx2 --------------------------------------------------------------------------


def patch_httpx(httpx: Any) -> None:
    library = httpx.__name__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        pass  # no connection pool, no SSL context: the parent connects

    def handle_request(self: Any, request: Any) -> Any:
        method, url = request.method, str(request.url)
        if method not in ("GET", "HEAD"):
            raise httpx.ConnectError(refusal(library, method, url), request=request)
        try:
            value, body = fetch(url, method)
        except OSError as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        headers = [(str(k), str(v)) for k, v in (value.get("headers") or {}).items()]
        return httpx.Response(int(value.get("status", 200)), headers=headers, content=body, request=request)

    def close(self: Any) -> None:
        pass

    async def handle_async_request(self: Any, request: Any) -> Any:
        raise httpx.ConnectError(f"safehub: {library}'s async client has no way out of the sandbox "
                                 f"({request.method} {request.url}); use its sync client, or {shims.NO_NETWORK}", request=request)

    async def aclose(self: Any) -> None:
        pass

    def enter(self: Any) -> Any:
        return self

    def exit(self: Any, *exc_info: Any) -> None:
        pass

    async def aenter(self: Any) -> Any:
        return self

    async def aexit(self: Any, *exc_info: Any) -> None:
        pass

    httpx.HTTPTransport.__init__ = init
    httpx.HTTPTransport.handle_request = handle_request
    httpx.HTTPTransport.close = close
    httpx.HTTPTransport.__enter__, httpx.HTTPTransport.__exit__ = enter, exit
    httpx.AsyncHTTPTransport.__aenter__, httpx.AsyncHTTPTransport.__aexit__ = aenter, aexit
    httpx.AsyncHTTPTransport.__init__ = init
    httpx.AsyncHTTPTransport.handle_async_request = handle_async_request
    httpx.AsyncHTTPTransport.aclose = aclose
