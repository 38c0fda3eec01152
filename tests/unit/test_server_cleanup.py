"""VllmServer's lifecycle without vLLM: a stand-in HTTP server answers /health.

The stand-in runs in its own session exactly like ``vllm serve``, so these tests show what a real
server would outlive: the caller being sent SIGTERM, or a server that dies during start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from civic_vllm import serving

# Answers GET /health with 200 (or exits at once with code 3 when told to).
STAND_IN = textwrap.dedent("""
    import http.server, sys
    if sys.argv[2] == "die":
        sys.exit(3)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")

# The caller: starts a server, prints the server's pid, then idles until signalled.
CALLER = textwrap.dedent("""
    import sys, time
    from civic_vllm import serving
    stand_in = sys.argv[1]
    serving.ServerConfig.command = lambda self: [sys.executable, "-c", stand_in, str(self.port), "live"]
    with serving.VllmServer(serving.ServerConfig(model="unused")) as server:
        print(server.process.pid, flush=True)
        time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead for our purpose
        return fh.read().split(") ", 1)[1][0] != "Z"


def test_sigterm_to_the_caller_stops_its_server():
    caller = subprocess.Popen([sys.executable, "-c", CALLER, STAND_IN], stdout=subprocess.PIPE, text=True)
    server_pid = None
    try:
        server_pid = int(caller.stdout.readline())
        assert _alive(server_pid)
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid), "the server outlived its SIGTERM-ed caller"
    finally:
        caller.kill()
        caller.wait()
        if server_pid is not None and _alive(server_pid):  # the failure case must not leak it either
            os.killpg(server_pid, signal.SIGKILL)


@pytest.fixture
def no_running_servers(monkeypatch):
    """The SIGTERM bookkeeping as in a process with no server yet (session fixtures may hold some)."""
    monkeypatch.setattr(serving._SigtermAsExit, "_servers", 0)
    saved = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, saved)


def test_sigterm_handling_is_restored_after_the_last_server(monkeypatch, no_running_servers):
    monkeypatch.setattr(serving.ServerConfig, "command",
                        lambda self: [sys.executable, "-c", STAND_IN, str(self.port), "live"])
    with serving.VllmServer(serving.ServerConfig(model="unused")):
        with serving.VllmServer(serving.ServerConfig(model="unused")):
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # one server still runs
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_own_sigterm_handler_is_left_alone(monkeypatch, no_running_servers):
    monkeypatch.setattr(serving.ServerConfig, "command",
                        lambda self: [sys.executable, "-c", STAND_IN, str(self.port), "live"])

    def own(signum, frame):
        pass

    signal.signal(signal.SIGTERM, own)
    with serving.VllmServer(serving.ServerConfig(model="unused")):
        assert signal.getsignal(signal.SIGTERM) is own
    assert signal.getsignal(signal.SIGTERM) is own


def test_a_server_that_dies_at_start_up_is_reported_and_released(monkeypatch, no_running_servers):
    monkeypatch.setattr(serving.ServerConfig, "command",
                        lambda self: [sys.executable, "-c", STAND_IN, str(self.port), "die"])
    server = serving.VllmServer(serving.ServerConfig(model="unused"))
    with pytest.raises(serving.ServerError, match="exited with 3"):
        server.start()
    assert server.process.poll() == 3 and server._log.closed and not server.log_path.exists()
    assert serving._SigtermAsExit._servers == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_server_that_cannot_be_launched_is_released(monkeypatch, no_running_servers):
    monkeypatch.setattr(serving.ServerConfig, "command", lambda self: ["/nonexistent/vllm", "serve"])
    server = serving.VllmServer(serving.ServerConfig(model="unused"))
    with pytest.raises(FileNotFoundError):
        server.start()
    assert server.process is None and server._log.closed and not server.log_path.exists()
    assert serving._SigtermAsExit._servers == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert server.stop() is None  # stopping again is harmless
