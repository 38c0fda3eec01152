"""The API key on every route: an ASGI middleware for vLLM's ``--middleware`` option.

vLLM's own ``--api-key`` (vLLM 0.32) checks only paths under /v1, /v2, /inference and /cohere:
/invocations runs a chat completion, /tokenize and /detokenize use the tokenizer, /metrics and
/server_info reveal state, all without the key. With

    CIVIC_API_KEY=... vllm serve M --model-impl civic --middleware civic_vllm.access.ApiKeyMiddleware

every HTTP request needs ``Authorization: Bearer <key>`` except ``GET /health`` (probes) and
``GET /v1/models`` (discovery), and except CORS preflights (OPTIONS, which never carry credentials
and run nothing); a path that does not exist answers 401 too, so nothing is learnt without the key.
WebSocket routes are closed (policy violation) without it.

The key is ``CIVIC_API_KEY``, else ``VLLM_API_KEY`` (then vLLM's own check also guards
/v1/models); vLLM builds the middleware with no arguments, so ``--api-key`` on the command line
cannot reach it: without either variable the server refuses to start. Keys are compared as
SHA-256 digests in constant time, as vLLM does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping

OPEN_PATHS = frozenset({"/health", "/v1/models"})
KEY_VARIABLES = ("CIVIC_API_KEY", "VLLM_API_KEY")
MIDDLEWARE = "civic_vllm.access.ApiKeyMiddleware"  # the --middleware value


class MissingApiKeyError(RuntimeError):
    pass


def configured_key(environ: Mapping[str, str] = os.environ) -> str:
    for name in KEY_VARIABLES:
        if environ.get(name):
            return environ[name]
    raise MissingApiKeyError(
        f"--middleware {MIDDLEWARE} needs the API key in {' or '.join(KEY_VARIABLES)} "
        "(--api-key on the command line does not reach a middleware)"
    )


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


UNAUTHORIZED = json.dumps({"error": {
    "message": "Missing or invalid API key: send the header 'Authorization: Bearer <key>'.",
    "type": "Unauthorized", "code": 401,
}}).encode()


class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 for every request without the key, outside :data:`OPEN_PATHS`."""

    def __init__(self, app, key: str | None = None):
        self.app = app
        self._key = _digest(configured_key() if key is None else key)

    def is_open(self, scope) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        return scope["type"] == "http" and (scope.get("method") == "OPTIONS" or
                                            (scope.get("method") in ("GET", "HEAD") and path in OPEN_PATHS))

    def has_key(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(_digest(token.strip()), self._key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self.is_open(scope) or self.has_key(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake fails
        else:
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(UNAUTHORIZED)).encode()),
                (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": UNAUTHORIZED})
