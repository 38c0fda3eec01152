# Every target depends on `install`, which is idempotent and quick when nothing changed.
VENV      := .venv
PY        := $(VENV)/bin/python
CIVIC     := $(VENV)/bin/civic
STAMP_DIR := $(VENV)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all test-kernels bench-kv bench-kernels clean-results docs

install:
	@bash scripts/install.sh

# Builds the default model if needed, serves it with --model-impl civic, asks one question
# about a real photograph, prints the answer, visual tokens, prompt tokens and TTFT.
demo: install
	$(PY) -m civic_vllm.demo

# Unit, kernel (Triton interpreter) and end-to-end tests (real `vllm serve` over HTTP).
# Exits non-zero when no test ran.
test: install
	$(PY) -m pytest -m "not slow" -q

test-all: install
	$(PY) -m pytest -q

test-kernels: install
	$(PY) -m pytest tests/kernels -q

bench-kv: install
	$(PY) -m benchmarks.kv_blocks

bench-kernels: install
	$(PY) -m benchmarks.kernels.bench_kernels

# Accuracy vs retention ratio on the civic-shapes test split through vllm serve (full, civic,
# civic + KL distillation, downscale, pool, random; early exit layers): benchmarks/results/accuracy.*
bench-accuracy: install
	$(PY) -m benchmarks.accuracy

# Video accuracy at r = 1/3 on the civic-shapes-video test split (640 videos) with models/civic-shapes-video-tiny:
# full, civic (civic_video_ratio), vLLM's EVS (vanilla, --video-pruning-rate 2/3) and uniform frame subsampling,
# bootstrap intervals and paired differences: benchmarks/results/video_accuracy.{json,md,png}. VIDEO_ACC_ARGS passes options.
.PHONY: bench-video-accuracy
bench-video-accuracy: install
	$(PY) -m benchmarks.video_accuracy $(VIDEO_ACC_ARGS)

# Serving benchmark: vanilla vs --model-impl civic under locust load (bench preset, fixed KV pool).
# Writes benchmarks/results/serve.json, serve/ (CSVs, plots, summary.md). QUICK=1: a few minutes.
.PHONY: bench-serve
bench-serve: install
	QUICK="$(QUICK)" $(PY) -m benchmarks.serve

# Prefill time at Qwen3-VL's real depth (qwen3-vl-2b preset, random weights, 24 vision blocks), in-process
# with HF transformers: full vs civic r=1/3 after the last block and at exit layers 6 and 12, paired rounds,
# next to civic plan's FLOP limits. Writes benchmarks/results/depth_probe.json and .png.
# DEPTH_ARGS="--rounds 5 --budget-s 1800" passes options through.
.PHONY: bench-depth
bench-depth: install
	$(PY) -m benchmarks.depth_probe $(DEPTH_ARGS)

# Soak: locust against --model-impl civic (tiny preset) for SOAK_SECONDS (default 1800) with mixed
# ratios, sizes and image counts; checks 0 failures and an RSS slope over the second half of the run
# of at most 2 MiB/min (fixed). Writes benchmarks/results/soak.json and soak.png.
# SOAK_SECONDS=120 make soak: a two-minute smoke run.
.PHONY: soak
soak: install
	$(PY) -m benchmarks.soak

# Lints and schema-validates deploy/ (hadolint, kubernetes-validate, yamllint, docker compose config).
.PHONY: test-deploy
test-deploy: install
	$(PY) -m pytest tests/unit/test_deploy.py -q

# The prepared GPU check (issue 23): Triton kernels compiled on CUDA vs their torch references, the fused merger's
# call site, do_bench microbenchmarks and the HF compact prefill (qwen3-vl-2b, 1344x1344), in under 8 minutes.
# Installs nothing and needs no vLLM: it runs with the machine's own python (this venv's when there is one).
# Without CUDA it is a CPU harness check (interpreter, small sizes) that exits 0. Writes gpu_check.json and .md
# to $$OUT, else benchmarks/results/gpu/ (CUDA) or benchmarks/results/tmp/gpu_check/. GPU_CHECK_ARGS passes options.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# Video serving: vanilla vs vLLM's EVS (--video-pruning-rate 2/3) vs civic at EVS's kept count vs uniform frame
# subsampling (1/3 of the frames), bench preset, same KV pool, fresh random videos; locust at concurrency 1 and 8,
# paired TTFT probe, vllm bench serve random-mm. Writes benchmarks/results/video_serve.json, .png, .md.
# QUICK=1: a few minutes (video_serve_quick.*). VIDEO_ARGS passes options (e.g. --preset tiny --video 256x256x12).
.PHONY: bench-video
bench-video: install
	QUICK="$(QUICK)" $(PY) -m benchmarks.video_serve $(VIDEO_ARGS)

# Rewrites every generated table in README.md and docs/*.md from benchmarks/results/*.json (the prose
# around them stays). tests/unit/test_docs.py fails when they drift; `python -m tools.docs_gen --check`.
docs:
	$(GPU_PYTHON) -m tools.docs_gen
