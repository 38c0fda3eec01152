"""civic_vllm.access.ApiKeyMiddleware on a stand-in ASGI app (the e2e tests run it inside vLLM)."""

from __future__ import annotations

import asyncio
import json

import pytest

from civic_vllm.access import OPEN_PATHS, ApiKeyMiddleware, MissingApiKeyError, configured_key

KEY = "s3cret"


async def _app(scope, receive, send):
    if scope["type"] == "websocket":
        await send({"type": "websocket.accept"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"reached"})


def call(path, method="GET", authorization: str | None = None, *, kind="http", root_path=""):
    """(status or websocket message type, body) of one request through the middleware."""
    headers = [(b"host", b"x")] + ([(b"authorization", authorization.encode())] if authorization else [])
    scope = {"type": kind, "path": path, "method": method, "headers": headers, "root_path": root_path}
    sent = []

    async def receive():
        return {"type": "websocket.connect"} if kind == "websocket" else {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(ApiKeyMiddleware(_app, key=KEY)(scope, receive, send))
    if kind == "websocket":
        return sent[0]["type"], sent[0].get("code")
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


GUARDED = ["/v1/chat/completions", "/invocations", "/tokenize", "/detokenize", "/metrics", "/server_info",
           "/docs", "/openapi.json", "/ping", "/", "/no/such/path", "/health/", "/v1/models/x", "//health",
           "/v1/models/../chat/completions"]


@pytest.mark.parametrize("path", GUARDED)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_every_other_route_needs_the_key(path, method):
    status, body = call(path, method)
    assert status == 401 and json.loads(body)["error"]["code"] == 401
    assert call(path, method, "Bearer wrong")[0] == 401
    assert call(path, method, f"Basic {KEY}")[0] == 401
    assert call(path, method, f"Bearer {KEY}") == (200, b"reached")
    assert call(path, method, f"bearer {KEY}") == (200, b"reached")


@pytest.mark.parametrize("path", sorted(OPEN_PATHS))
def test_health_and_model_list_are_open_to_get_only(path):
    assert OPEN_PATHS == {"/health", "/v1/models"}
    assert call(path) == (200, b"reached")
    assert call(path, "HEAD")[0] == 200
    assert call(path, "POST")[0] == 401


def test_root_path_is_removed_before_matching():
    assert call("/api/health", root_path="/api")[0] == 200
    assert call("/api/metrics", root_path="/api")[0] == 401


def test_cors_preflight_passes():
    assert call("/v1/chat/completions", "OPTIONS")[0] == 200


def test_websockets_are_closed_without_the_key():
    assert call("/v1/realtime", kind="websocket") == ("websocket.close", 1008)
    assert call("/v1/realtime", authorization=f"Bearer {KEY}", kind="websocket")[0] == "websocket.accept"


def test_lifespan_passes_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(ApiKeyMiddleware(app, key=KEY)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_key_comes_from_the_environment(monkeypatch):
    assert configured_key({"CIVIC_API_KEY": "a", "VLLM_API_KEY": "b"}) == "a"
    assert configured_key({"CIVIC_API_KEY": "", "VLLM_API_KEY": "b"}) == "b"
    with pytest.raises(MissingApiKeyError, match="CIVIC_API_KEY or VLLM_API_KEY"):
        configured_key({})
    monkeypatch.delenv("CIVIC_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(MissingApiKeyError):  # the server refuses to start rather than run open
        ApiKeyMiddleware(_app)
    monkeypatch.setenv("CIVIC_API_KEY", KEY)
    middleware = ApiKeyMiddleware(_app)
    assert middleware.has_key({"headers": [(b"authorization", f"Bearer {KEY}".encode())]})
