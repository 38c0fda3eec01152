"""VllmServer's lifecycle without vLLM: a stand-in HTTP server answers /health.

The stand-in runs in its own session exactly like ``vllm serve``, so these tests show what a real
server would outlive: the caller being sent SIGTERM (once, or again while it stops its server), or a
server that dies during start-up. tests/e2e/test_hardening.py repeats the double SIGTERM on a real
server.
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

# Answers GET /health with 200 (or exits at once with code 3 when told to). "drain": like a vLLM
# server draining requests, it outlasts SIGTERM (noting it in the file named by argv[3]) and has a
# child in its process group (as the engine core is) that ignores SIGTERM too.
STAND_IN = textwrap.dedent("""
    import http.server, signal, subprocess, sys
    if sys.argv[2] == "die":
        sys.exit(3)
    if sys.argv[2] == "drain":
        signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[3], "a").write("SIGTERM\\n"))
        subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")

# The caller: starts a server (argv: stand-in source, mode, marker file), prints the server's pid,
# then idles until signalled.
CALLER = textwrap.dedent("""
    import signal, sys, time
    from civic_vllm import serving
    # Python's own SIGINT handler, as in a program started from a terminal; a caller started in the
    # background by a non-interactive shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stand_in, mode, marker = sys.argv[1:4]
    serving.ServerConfig.command = lambda self: [sys.executable, "-c", stand_in, str(self.port), mode, marker]
    with serving.VllmServer(serving.ServerConfig(model="unused")) as server:
        print(server.process.pid, flush=True)
        time.sleep(120)
""")


def _alive(pgid: int) -> bool:
    return bool(serving.group_members(pgid))


def _wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def _run_caller(tmp_path, mode: str, signals: list[int]) -> tuple[int, int]:
    """Start the caller, send it `signals` (each after the server noted the previous SIGTERM when
    draining), return (the caller's exit status, the server's pid)."""
    marker = tmp_path / "sigterms"
    marker.touch()
    caller = subprocess.Popen([sys.executable, "-c", CALLER, STAND_IN, mode, str(marker)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server_pid = None
    try:
        server_pid = int(caller.stdout.readline())
        assert _alive(server_pid)
        if mode == "drain":
            assert _wait_for(lambda: len(serving.group_members(server_pid)) == 2)  # the child runs too
        for count, signum in enumerate(signals, 1):
            caller.send_signal(signum)
            if mode == "drain" and count < len(signals):  # the caller is inside stop(), waiting
                assert _wait_for(lambda count=count: marker.read_text().count("SIGTERM") >= count)
        status = caller.wait(timeout=60)
        assert _wait_for(lambda: not _alive(server_pid), timeout=10), "the server outlived its caller"
        return status, server_pid
    finally:
        caller.kill()
        caller.wait()
        if server_pid is not None and _alive(server_pid):  # the failure case must not leak it either
            os.killpg(server_pid, signal.SIGKILL)


def test_sigterm_to_the_caller_stops_its_server(tmp_path):
    status, _ = _run_caller(tmp_path, "live", [signal.SIGTERM])
    assert status == 128 + signal.SIGTERM


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_while_stopping_kills_the_group(tmp_path, second):
    # The server outlasts SIGTERM (a drain of up to stop()'s 30 s timeout): the second signal must
    # kill its whole group at once rather than abandon it, then reach the caller.
    status, _ = _run_caller(tmp_path, "drain", [signal.SIGTERM, second])
    # SystemExit(143), or KeyboardInterrupt, with which Python ends by re-raising SIGINT
    assert status == (128 + signal.SIGTERM if second == signal.SIGTERM else -signal.SIGINT)


# Two servers stopped together, as the serving benchmark does (argv: stand-in source, marker file).
TWO_SERVER_CALLER = textwrap.dedent("""
    import sys, time
    from civic_vllm import serving
    stand_in, marker = sys.argv[1:3]
    serving.ServerConfig.command = lambda self: [sys.executable, "-c", stand_in, str(self.port), "drain", marker]
    servers = []
    try:
        for _ in range(2):
            servers.append(serving.VllmServer(serving.ServerConfig(model="unused")))
            servers[-1].start()
            print(servers[-1].process.pid, flush=True)
        time.sleep(120)
    finally:
        serving.stop_all(servers)
""")


def test_stop_all_outlasts_a_second_sigterm_while_the_first_server_drains(tmp_path):
    # GNU timeout signals its child twice (directly, then its process group). stop() re-delivers the
    # second SIGTERM once its own group is gone; in a plain loop that ended the loop and orphaned the
    # second server (seen with `timeout 1200 python -m benchmarks.serve`).
    marker = tmp_path / "sigterms"
    marker.touch()
    caller = subprocess.Popen([sys.executable, "-c", TWO_SERVER_CALLER, STAND_IN, str(marker)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    pids = []
    try:
        pids = [int(caller.stdout.readline()) for _ in range(2)]
        caller.send_signal(signal.SIGTERM)
        assert _wait_for(lambda: marker.read_text().count("SIGTERM") >= 1)  # the first server drains
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=60) == 128 + signal.SIGTERM
        assert _wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=10), "a server outlived its caller"
    finally:
        caller.kill()
        caller.wait()
        for pid in pids:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_a_signal_during_stop_is_delivered_after_it(monkeypatch, no_running_servers, default_sigint, tmp_path):
    # stop() called by the program itself (no exception in flight): the signal is not lost.
    marker = tmp_path / "sigterms"
    marker.touch()
    monkeypatch.setattr(serving.ServerConfig, "command",
                        lambda self: [sys.executable, "-c", STAND_IN, str(self.port), "drain", str(marker)])
    server = serving.VllmServer(serving.ServerConfig(model="unused")).start()
    pid = server.process.pid
    # SIGINT to this process once stop() has sent its SIGTERM (the stand-in notes it).
    sender = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, pathlib, signal, time
        while "SIGTERM" not in pathlib.Path({str(marker)!r}).read_text():
            time.sleep(0.05)
        os.kill({os.getpid()}, signal.SIGINT)
    """)])
    try:
        with pytest.raises(KeyboardInterrupt):
            server.stop(timeout=120)
        alive = _alive(pid)
    finally:
        sender.wait()
        if _alive(pid):  # the failure case must not leak it
            os.killpg(pid, signal.SIGKILL)
    assert not alive and server._log.closed and serving._SigtermAsExit._servers == 0


@pytest.fixture
def default_sigint():
    """Python's SIGINT handler in this process, even when pytest was started with SIGINT ignored
    (in the background by a non-interactive shell)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


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
