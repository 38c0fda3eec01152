"""Start and stop a real ``vllm serve`` process: one helper for the demo, tests and benchmarks.

The server always binds to 127.0.0.1, logs to a file (printed on failure) and is
stopped with SIGTERM then SIGKILL, so no stray server outlives its caller, even when the
caller itself is sent SIGTERM (a timeout, ``kill``): while a server runs, SIGTERM in the caller
raises SystemExit, so ``with`` blocks and ``finally`` clauses stop the server on the way out.
A SIGTERM or SIGINT that arrives while a server is being stopped (a second Ctrl-C, a supervisor
repeating its signal) kills the server's process group at once instead of interrupting the stop;
it is delivered to the caller once the stop is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from civic_vllm.access import MIDDLEWARE
from civic_vllm.prometheus import metric_value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_executable() -> str:
    """The `vllm` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("vllm")
    return str(candidate) if candidate.exists() else (shutil.which("vllm") or "vllm")


@dataclass
class ServerConfig:
    model: str
    civic: bool = True
    port: int = 0  # 0: pick a free port
    max_model_len: int = 4096
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    images_per_prompt: int = 4
    dtype: str = "bfloat16"
    kv_cache_gib: float | None = 1.0  # VLLM_CPU_KVCACHE_SPACE; None: use kv_cache_bytes
    kv_cache_bytes: int | None = None
    civic_defaults: dict = field(default_factory=dict)  # server-wide civic_* kwargs
    trust_request_mm_kwargs: bool = True
    prefix_caching: bool = True
    api_key: str | None = None  # vLLM's --api-key: guards /v1, /v2, /inference, /cohere only
    civic_api_key: str | None = None  # CIVIC_API_KEY + civic_vllm.access: every route but /health, /v1/models
    enforce_eager: bool = True  # False: vLLM's compiled path (torch.compile; CUDA graphs on GPU)
    # Encoder profiling image (width, height) for vLLM's dummy run, instead of the largest image the
    # processor allows: the compiled path profiles the encoder and on CPU a maximum-size image takes minutes.
    profile_image_size: tuple[int, int] | None = None
    videos_per_prompt: int = 0  # 0: the server refuses video (vLLM profiles a max-size video otherwise)
    # Encoder profiling video (width, height, frames) for vLLM's dummy run; None: vLLM's largest.
    profile_video_size: tuple[int, int, int] | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    mm_encoder_tp_mode: str | None = None  # "data": every rank encodes its share of the images
    extra_args: Sequence[str] = ()
    extra_env: dict = field(default_factory=dict)

    def _image_limit(self) -> int | dict:
        if self.profile_image_size is None:
            return self.images_per_prompt
        width, height = self.profile_image_size
        return {"count": self.images_per_prompt, "width": width, "height": height}

    def _video_limit(self) -> int | dict:
        if self.profile_video_size is None or not self.videos_per_prompt:
            return self.videos_per_prompt
        width, height, frames = self.profile_video_size
        return {"count": self.videos_per_prompt, "width": width, "height": height, "num_frames": frames}

    def _parallel_args(self) -> list[str]:
        args = []
        for flag, size in (("--tensor-parallel-size", self.tensor_parallel_size),
                           ("--pipeline-parallel-size", self.pipeline_parallel_size),
                           ("--data-parallel-size", self.data_parallel_size)):
            if size != 1:
                args += [flag, str(size)]
        if self.mm_encoder_tp_mode:
            args += ["--mm-encoder-tp-mode", self.mm_encoder_tp_mode]
        return args

    def command(self) -> list[str]:
        args = [
            vllm_executable(), "serve", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--limit-mm-per-prompt", json.dumps({"image": self._image_limit(), "video": self._video_limit()}),
            "--seed", "0",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        args += self._parallel_args()
        if self.civic:
            args += ["--model-impl", "civic"]
        if self.civic_defaults:
            args += ["--mm-processor-kwargs", json.dumps(self.civic_defaults)]
        if self.trust_request_mm_kwargs:
            args.append("--trust-request-mm-kwargs")
        if self.max_num_batched_tokens:
            args += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.max_num_seqs:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        if not self.prefix_caching:
            args.append("--no-enable-prefix-caching")
        if self.kv_cache_gib is None and self.kv_cache_bytes:
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        if self.api_key:
            args += ["--api-key", self.api_key]
        if self.civic_api_key:
            args += ["--middleware", MIDDLEWARE]
        return args + list(self.extra_args)

    def auth_headers(self) -> dict[str, str]:
        key = self.civic_api_key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
        env.pop("TRITON_INTERPRET", None)  # a test-session setting; the server must not inherit it
        if self.kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.kv_cache_gib:g}"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.civic_api_key:
            env["CIVIC_API_KEY"] = self.civic_api_key
        env.update({k: str(v) for k, v in self.extra_env.items()})
        return env


class ServerError(RuntimeError):
    pass


class _SigtermAsExit:
    """SIGTERM -> SystemExit(143) while any server runs (Python's default dies without cleanup).

    The server runs in its own session, so it would not get the caller's signal and would be
    orphaned. Installed only from the main thread and only over the default handler, so an
    application's own SIGTERM handling is left alone; the default is restored with the last server.
    """

    _servers = 0

    @classmethod
    def acquire(cls) -> None:
        cls._servers += 1
        if cls._servers == 1 and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, cls._raise)

    @classmethod
    def release(cls) -> None:
        cls._servers -= 1
        cls.restore_if_idle()

    @classmethod
    def restore_if_idle(cls) -> None:
        if cls._servers == 0 and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is cls._raise:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    @staticmethod
    def _raise(signum, _frame) -> None:
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """SIGTERM and SIGINT only recorded (in the yielded list) inside the block; main thread only,
    elsewhere signals reach the main thread and the list stays empty."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    saved = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum))
             for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


class VllmServer:
    """``with VllmServer(ServerConfig(...)) as server: server.url``"""

    def __init__(self, config: ServerConfig, *, startup_timeout: float = 300.0, log_path: Path | None = None):
        if config.port == 0:
            config.port = free_port()
        self.config = config
        self.startup_timeout = startup_timeout
        self._own_log = log_path is None  # a temporary log is removed when the server stops
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self._started = False  # started and not yet stopped: holds the log and a _SigtermAsExit count

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    def start(self) -> VllmServer:
        self._log = open(self.log_path, "w")
        _SigtermAsExit.acquire()
        self._started = True
        try:
            self.process = subprocess.Popen(
                self.config.command(),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.config.environment(),
                start_new_session=True,  # its own process group: stop() reaches the engine core too
            )
            self._wait_healthy()
        except BaseException:  # also SystemExit / KeyboardInterrupt: `with` never reaches __exit__
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise ServerError(f"vllm serve not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (vLLM drains and exits), then SIGKILL the whole group if it hangs.

        Safe under repeated signals: a SIGTERM/SIGINT received meanwhile (main thread) cuts the
        drain short with SIGKILL and is re-delivered to the caller after the cleanup.
        """
        try:
            with _signals_deferred() as received:
                self._terminate(timeout, received)
            if received:
                signal.raise_signal(received[0])  # the caller's own handling, now the group is gone
        finally:
            self._release()
        return None if self.process is None else self.process.returncode

    def _terminate(self, timeout: float, received: list[int]) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not received and time.monotonic() < deadline:
                try:
                    self.process.wait(min(0.2, max(deadline - time.monotonic(), 0.0)))
                    break
                except subprocess.TimeoutExpired:
                    pass
        try:  # a hung or interrupted drain, and stragglers of the group (engine core): none outlives us
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def _release(self) -> None:
        if self._started:  # the log and the SIGTERM hold are released once
            self._started = False
            self._log.close()
            if self._own_log:
                self.log_path.unlink(missing_ok=True)
            _SigtermAsExit.release()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # vLLM 0.32 serves one registry at two routes. GET /metrics is prometheus-fastapi-
    # instrumentator's sync endpoint, which FastAPI runs in a worker thread: it can render the KV
    # usage gauge before the output handler's record() of an engine step and the token counters
    # after it (a fresh-clone CI saw a decode sample one block short at a block boundary). GET
    # /metrics/ reaches the prometheus ASGI app vLLM mounts, which renders in the event loop that
    # runs record(), so every value in one scrape is from the same engine step.
    METRICS_SNAPSHOT_PATH = "/metrics/"

    @property
    def metrics_url(self) -> str:
        """Where one scrape is a consistent snapshot of the registry (see METRICS_SNAPSHOT_PATH)."""
        return self.url + self.METRICS_SNAPSHOT_PATH

    def metrics(self) -> str:
        """One consistent scrape of the server's Prometheus registry."""
        response = requests.get(self.metrics_url, headers=self.config.auth_headers(), timeout=10)
        response.raise_for_status()
        return response.text

    IDLE_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")

    def wait_until_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and no KV block is in use; the last values.

        A non-zero value in the result after the timeout means something leaked.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.metrics()
            values = {name: metric_value(text, name) for name in self.IDLE_METRICS}
            if all(v == 0 for v in values.values()) or time.monotonic() > deadline:
                return values
            time.sleep(0.5)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all(servers: Iterable[VllmServer]) -> None:
    """Stop every server, even when the caller is signalled meanwhile.

    Each ``stop()`` re-delivers a SIGTERM/SIGINT received during its drain once its group is gone;
    in a plain loop that signal would end the loop and orphan the servers not yet stopped (GNU
    ``timeout`` sends SIGTERM to the caller twice, directly and to its process group). Here the
    re-delivered signals are held until the last server is stopped, then re-delivered once.
    """
    with _signals_deferred() as received:
        for server in servers:
            server.stop()
    try:
        if received:
            signal.raise_signal(received[0])
    finally:
        _SigtermAsExit.restore_if_idle()  # the last stop() ran under the deferral, not under its handler


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of a process group, from /proc (Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members
