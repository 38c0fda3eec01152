"""Security settings of a civic server, as deploy/ configures them, against a real `vllm serve`.

* the API key on every route (civic_vllm.access, as deploy/ runs it: CIVIC_API_KEY and
  --middleware): 401 without it everywhere but GET /health and GET /v1/models, including
  /invocations, /tokenize and /metrics, which vLLM's own --api-key leaves open.
* --allowed-media-domains: remote image URLs outside the list are refused before any
  connection is made; VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 stops an allowed host from redirecting
  the fetch elsewhere. vLLM's default (no list) fetches any URL: deploy/ always sets a list.
* local files: refused unless --allowed-local-media-path is set, and then only inside it.

All media traffic goes to a throw-away HTTP server on 127.0.0.1 that counts its hits.
"""

from __future__ import annotations

import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from helpers import make_image

from civic_vllm.serving import ServerConfig, VllmServer

pytestmark = pytest.mark.e2e

API_KEY = "civic-test-key"


class MediaServer:
    """Serves /image.png and /redirect (302 to /image.png on 127.0.0.1); counts requests per path."""

    def __init__(self):
        buffer = io.BytesIO()
        make_image(256, 256, seed=3).save(buffer, format="PNG")
        png = buffer.getvalue()
        self.hits: dict[str, int] = {}
        media = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                media.hits[self.path] = media.hits.get(self.path, 0) + 1
                if self.path == "/image.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(png)))
                    self.end_headers()
                    self.wfile.write(png)
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{media.port}/image.png")
                    self.end_headers()
                else:
                    self.send_error(404)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def media_server():
    server = MediaServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(allowed directory with ok.png, a valid image outside it)."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    make_image(256, 256, seed=4).save(allowed / "ok.png")
    outside = root / "secret.png"
    make_image(256, 256, seed=5).save(outside)
    (allowed / "link.png").symlink_to(outside)
    return allowed, outside


@pytest.fixture(scope="module")
def secure_server(tiny_model, media_dirs):
    allowed, _ = media_dirs
    config = ServerConfig(
        model=tiny_model,
        dtype="float32",
        max_num_batched_tokens=256,
        civic_api_key=API_KEY,
        extra_args=["--allowed-media-domains", "localhost", "--allowed-local-media-path", str(allowed)],
        extra_env={"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"},
    )
    with VllmServer(config) as server:
        yield server


def post_chat(server, image_url: str, *, key: str | None = API_KEY, path="/v1/chat/completions"):
    body = {
        "model": server.config.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 2,
    }
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(server.url + path, data=json.dumps(body), headers=headers, timeout=60)


def _message(response) -> str:
    error = response.json().get("error", {})
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)


def test_api_key_is_required_on_openai_routes(secure_server, media_dirs):
    url = "file://" + str(media_dirs[0] / "ok.png")
    assert post_chat(secure_server, url, key=None).status_code == 401
    assert post_chat(secure_server, url, key="wrong-key").status_code == 401
    assert post_chat(secure_server, url).status_code == 200


def _routes(server) -> list[tuple[str, str]]:
    """(method, path) of every route in the server's OpenAPI schema (read with the key), path
    parameters filled in, plus routes outside the schema and a path that does not exist."""
    schema = requests.get(server.url + "/openapi.json", headers=server.config.auth_headers(), timeout=10)
    assert schema.status_code == 200
    routes = [(method.upper(), re.sub(r"\{[^}]*\}", "x", path))
              for path, methods in schema.json()["paths"].items() for method in methods]
    assert len(routes) > 10 and ("POST", "/invocations") in routes and ("POST", "/tokenize") in routes
    return routes + [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no/such/route"),
                     ("POST", "/health"), ("POST", "/v1/models")]


def test_only_health_and_the_model_list_are_open(secure_server):
    statuses = {(method, path): requests.request(method, secure_server.url + path, json={}, timeout=30).status_code
                for method, path in _routes(secure_server)}
    open_routes = {route for route, status in statuses.items() if status != 401}
    closed = {path for (_, path), status in statuses.items() if status == 401}
    assert open_routes == {("GET", "/health"), ("GET", "/v1/models")}, open_routes
    assert "/invocations" in closed and "/tokenize" in closed and "/metrics" in closed


def test_the_key_opens_every_route(secure_server, media_dirs):
    # Prometheus scrapes with the key (deploy/README.md); the SageMaker route and the tokenizer work with it.
    headers = secure_server.config.auth_headers()
    assert requests.get(secure_server.url + "/metrics", headers=headers, timeout=10).status_code == 200
    tokenize = requests.post(secure_server.url + "/tokenize", json={"prompt": "hello"}, headers=headers, timeout=10)
    assert tokenize.status_code == 200
    url = "file://" + str(media_dirs[0] / "ok.png")
    assert post_chat(secure_server, url, path="/invocations").status_code == 200
    models = requests.get(secure_server.url + "/v1/models", timeout=10)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == secure_server.config.model


def test_remote_url_outside_allowed_domains_is_not_fetched(secure_server, media_server):
    response = post_chat(secure_server, f"http://127.0.0.1:{media_server.port}/image.png")
    assert response.status_code == 400, response.text[:300]
    assert "The URL must be from one of the allowed domains: ['localhost']" in _message(response)
    assert media_server.hits.get("/image.png", 0) == 0


def test_remote_url_on_an_allowed_domain_is_fetched(secure_server, media_server):
    before = media_server.hits.get("/image.png", 0)
    response = post_chat(secure_server, f"http://localhost:{media_server.port}/image.png")
    assert response.status_code == 200, response.text[:300]
    assert media_server.hits.get("/image.png", 0) == before + 1


def test_allowed_domain_cannot_redirect_the_fetch(secure_server, media_server):
    before = media_server.hits.get("/image.png", 0)
    response = post_chat(secure_server, f"http://localhost:{media_server.port}/redirect")
    assert response.status_code >= 400
    assert media_server.hits.get("/redirect", 0) >= 1
    assert media_server.hits.get("/image.png", 0) == before  # the redirect was not followed


def test_local_file_inside_the_allowed_directory_is_read(secure_server, media_dirs):
    response = post_chat(secure_server, "file://" + str(media_dirs[0] / "ok.png"))
    assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize("escape", ["dotdot", "symlink", "absolute"])
def test_local_file_outside_the_allowed_directory_is_refused(secure_server, media_dirs, escape):
    allowed, outside = media_dirs
    path = {"dotdot": f"{allowed}/../{outside.name}", "symlink": f"{allowed}/link.png",
            "absolute": str(outside)}[escape]
    response = post_chat(secure_server, "file://" + path)
    # A valid image, so only the path check can refuse it.
    assert response.status_code == 400, response.text[:300]
    assert "must be a subpath of `--allowed-local-media-path" in _message(response)


def test_default_server_refuses_local_files(civic_server):
    # No --allowed-local-media-path: refused, nothing read. vLLM 0.32 answers 500 here (a
    # RuntimeError in its media connector, outside the plugin's reach), not 400.
    body = {
        "model": civic_server.config.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "x"}]}],
        "max_tokens": 2,
    }
    response = requests.post(civic_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 500
    assert "Cannot load local files without `--allowed-local-media-path`" in response.text
    assert "root:" not in response.text


def test_default_server_fetches_any_url(civic_server, media_server):
    # Why deploy/ always passes --allowed-media-domains: without it vLLM fetches any URL a
    # client names (a server-side request forgery risk). If this starts failing, vLLM changed
    # its default: update deploy/README.md.
    before = media_server.hits.get("/image.png", 0)
    body = {
        "model": civic_server.config.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{media_server.port}/image.png"}},
            {"type": "text", "text": "x"}]}],
        "max_tokens": 2,
    }
    response = requests.post(civic_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text[:300]
    assert media_server.hits.get("/image.png", 0) == before + 1
