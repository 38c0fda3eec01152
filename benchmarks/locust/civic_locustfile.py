"""Locust load for a vLLM OpenAI server serving Qwen3-VL (vanilla or ``--model-impl civic``).

Each user sends streaming chat-completions requests with base64 images back to back (closed
loop, no think time). Images are bundled photographs and synthetic pictures, each request's
unique (see :mod:`benchmarks.load`), so no cache in vLLM ever hits.

    locust -f benchmarks/locust/civic_locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8000 --csv out/run --json-file out/run \\
        --image-size 896 --images-per-request 1 --context-words 0 --max-tokens 64 --civic-ratio 0.3333

Options (also as environment variables, e.g. CIVIC_IMAGE_SIZE=448x448):
``--image-size``, ``--images-per-request``, ``--image-source`` (photo|synthetic|mix),
``--image-format`` (JPEG|PNG), ``--context-words`` (text length), ``--question``,
``--civic-ratio`` (omit for a vanilla server), ``--civic-policy``, ``--civic-settings`` (JSON of
other civic_* settings), ``--max-tokens``, ``--no-ignore-eos``, ``--model-name`` (default: the
server's), ``--image-seed`` (use a new one per run against the same server), ``--records-file``
(JSONL, one line per request, what ``benchmarks/serve.py`` computes exact percentiles from).

Warm-up: ``--warmup-s S`` alone resets locust's stats S seconds after the start (its CSV/JSON then
exclude the warm-up) and the run ends at ``-t``. With ``--measure-s M`` the warm-up lasts at least
S seconds and until every user has finished ``--warmup-requests`` requests (the users all start
together, so the first wave is not steady state), at most ``--warmup-max-s``; then the stats are
reset, M seconds are measured and the run stops, letting in-flight requests finish within
``--stop-timeout``. The records file gets ``measure_start`` / ``measure_end`` events.

Locust metrics, request type ``stream``: ``TTFT`` (send -> first chunk carrying a generated
token), ``ITL`` (one sample per later token: the gap since the previous one), ``TPOT`` (per
request: (last - first token) / (tokens - 1)); request type ``POST``: the whole request
(``/v1/chat/completions``, send -> end of stream). Locust rounds response times above 100 ms to
two significant digits in its percentiles; the records file keeps full resolution.

Only loopback hosts are accepted. Every request has a read timeout; the run time is bounded
by locust's ``-t`` in every mode.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import gevent
import requests
from locust import User, constant, events, task
from locust.exception import StopUser

try:
    import benchmarks.load as workload_lib
except ImportError:  # started from another directory: the repository root is two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import benchmarks.load as workload_lib

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

_state: dict = {"workload": None, "records": None, "model": None, "test_start": None, "completed": {}}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("civic workload")
    group.add_argument("--image-size", default="896", env_var="CIVIC_IMAGE_SIZE",
                       help="WIDTH or WIDTHxHEIGHT in px (multiples of 32 keep N exact)")
    group.add_argument("--images-per-request", type=int, default=1, env_var="CIVIC_IMAGES_PER_REQUEST")
    group.add_argument("--image-source", default="mix", choices=["photo", "synthetic", "mix"],
                       env_var="CIVIC_IMAGE_SOURCE")
    group.add_argument("--image-format", default="JPEG", choices=["JPEG", "PNG"], env_var="CIVIC_IMAGE_FORMAT")
    group.add_argument("--context-words", type=int, default=0, env_var="CIVIC_CONTEXT_WORDS",
                       help="words of context prose before the question (text length)")
    group.add_argument("--question", default=workload_lib.DEFAULT_QUESTION, env_var="CIVIC_QUESTION")
    group.add_argument("--civic-ratio", type=float, default=None, env_var="CIVIC_RATIO",
                       help="per-request civic_ratio (needs --trust-request-mm-kwargs); omit for vanilla")
    group.add_argument("--civic-policy", default=None, env_var="CIVIC_POLICY")
    group.add_argument("--civic-settings", default="{}", env_var="CIVIC_SETTINGS",
                       help='other civic_* settings as JSON without the prefix, e.g. \'{"min_tokens": 4}\'')
    group.add_argument("--max-tokens", type=int, default=64, env_var="CIVIC_MAX_TOKENS")
    group.add_argument("--no-ignore-eos", action="store_true", env_var="CIVIC_NO_IGNORE_EOS",
                       help="let generation stop at EOS (outputs then vary in length)")
    group.add_argument("--model-name", default=None, env_var="CIVIC_MODEL_NAME")
    group.add_argument("--image-seed", type=int, default=0, env_var="CIVIC_IMAGE_SEED")
    group.add_argument("--records-file", default=None, env_var="CIVIC_RECORDS_FILE")
    group.add_argument("--warmup-s", type=float, default=0.0, env_var="CIVIC_WARMUP_S",
                       help="shortest warm-up: locust's stats are reset when it ends")
    group.add_argument("--warmup-requests", type=int, default=0, env_var="CIVIC_WARMUP_REQUESTS",
                       help="with --measure-s: the warm-up also lasts until every user finished this many requests "
                            "(so the synchronised first wave has passed) ...")
    group.add_argument("--warmup-max-s", type=float, default=0.0, env_var="CIVIC_WARMUP_MAX_S",
                       help="... but at most this long")
    group.add_argument("--measure-s", type=float, default=0.0, env_var="CIVIC_MEASURE_S",
                       help="measuring window after the warm-up; the run then stops (in-flight requests finish "
                            "within --stop-timeout). 0: the run ends at -t only")
    group.add_argument("--request-timeout-s", type=float, default=600.0, env_var="CIVIC_REQUEST_TIMEOUT_S")


@events.init.add_listener
def _init(environment, **_) -> None:
    options = environment.parsed_options
    if options is None:  # imported by a tool, not run by locust
        return
    host = urlparse(environment.host or "").hostname
    if host not in LOOPBACK:
        raise SystemExit(f"civic_locustfile: only loopback hosts are allowed, got {environment.host!r}")
    wl = workload_lib.Workload(
        image_size=workload_lib.parse_size(options.image_size),
        images_per_request=options.images_per_request,
        context_words=options.context_words,
        question=options.question,
        max_tokens=options.max_tokens,
        ratio=options.civic_ratio,
        policy=options.civic_policy,
        image_source=options.image_source,
        image_format=options.image_format,
        ignore_eos=not options.no_ignore_eos,
        seed=options.image_seed,
        settings=json.loads(options.civic_settings or "{}"),
    )
    workload_lib.base_images(wl.image_size, wl.image_source)  # build the pool before the clock starts
    # Building it blocks the event loop for seconds; refresh the loop's cached clock so locust's -t
    # timer (gevent.spawn_later, armed right after this event) does not fire that much too early.
    gevent.get_hub().loop.update_now()
    _state["workload"] = wl
    _state["model"] = options.model_name
    if options.records_file:
        Path(options.records_file).parent.mkdir(parents=True, exist_ok=True)
        _state["records"] = open(options.records_file, "a", buffering=1)


def _event(kind: str, **fields) -> None:
    if _state["records"] is not None:
        _state["records"].write(json.dumps({"event": kind, "t": time.time(), **fields}) + "\n")


@events.test_start.add_listener
def _test_start(environment, **_) -> None:
    _state["test_start"] = time.time()
    options = environment.parsed_options
    _event("test_start", users=getattr(options, "num_users", None), warmup_s=options.warmup_s)
    if options.measure_s > 0:
        gevent.spawn(_warm_up_then_measure, environment)
    elif options.warmup_s > 0:
        def reset() -> None:
            environment.stats.reset_all()
            _event("stats_reset")

        gevent.spawn_later(options.warmup_s, reset)


def _warm_up_then_measure(environment) -> None:
    """Warm-up (at least --warmup-s, and until every user finished --warmup-requests requests, at most
    --warmup-max-s), then reset locust's stats, measure for --measure-s and stop the run."""
    options = environment.parsed_options
    users = getattr(options, "num_users", None) or 1
    start = time.monotonic()
    limit = max(options.warmup_max_s, options.warmup_s)
    while True:  # bounded by the --warmup-max-s limit
        elapsed = time.monotonic() - start
        done = _state["completed"]
        steady = len(done) >= users and min(done.values()) >= options.warmup_requests
        if elapsed >= options.warmup_s and (steady or elapsed >= limit):
            break
        gevent.sleep(0.2)
    environment.stats.reset_all()
    _event("measure_start", steady=steady, warmup_s=round(elapsed, 3))
    gevent.sleep(options.measure_s)
    _event("measure_end")
    if environment.runner is not None:
        environment.runner.quit()  # what -t does in a headless run: stop users (stop timeout), then exit


if hasattr(events, "test_stopping"):  # locust >= 2.x: fired before users are stopped
    @events.test_stopping.add_listener
    def _test_stopping(environment, **_) -> None:
        _event("test_stopping")


@events.test_stop.add_listener
def _test_stop(environment, **_) -> None:
    _event("test_stop")


@events.quit.add_listener
def _quit(**_) -> None:
    if _state["records"] is not None:
        _state["records"].close()
        _state["records"] = None


class ChatUser(User):
    """One closed-loop client: a streaming image chat request, then the next."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()
        self.base_url = self.environment.host.rstrip("/")
        if _state["model"] is None:
            _state["model"] = workload_lib.model_id(self.session, self.base_url)

    def on_stop(self) -> None:
        self.session.close()

    def _fire(self, request_type: str, name: str, seconds: float, length: int = 0, exc: Exception | None = None):
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=seconds * 1000.0, response_length=length,
            exception=exc, context={},
        )

    @task
    def chat(self) -> None:
        wl = _state["workload"]
        if wl is None:
            raise StopUser()
        body = wl.body(_state["model"])
        record = workload_lib.Record()
        options = self.environment.parsed_options
        try:
            workload_lib.stream_chat(self.session, self.base_url, body, record, options.request_timeout_s)
        except gevent.GreenletExit:  # the run ended while this request was streaming
            record.aborted = True
            raise
        except Exception as exc:  # an HTTP, stream or connection error: a locust failure
            record.error = record.error or f"{type(exc).__name__}: {exc}"[:300]
            self._fire("POST", "/v1/chat/completions", time.time() - record.start if record.start else 0.0, 0, exc)
            return
        finally:
            if _state["records"] is not None:
                _state["records"].write(record.as_json() + "\n")
            if not record.aborted:
                _state["completed"][id(self)] = _state["completed"].get(id(self), 0) + 1
        self._fire("POST", "/v1/chat/completions", record.e2e, record.completion_tokens)
        self._fire("stream", "TTFT", record.ttft)
        for gap in record.itl():
            self._fire("stream", "ITL", gap)
        if (tpot := record.tpot()) is not None:
            self._fire("stream", "TPOT", tpot)
