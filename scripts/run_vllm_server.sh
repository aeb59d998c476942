#!/usr/bin/env bash
# Serve a local Hugging Face model directory with vLLM's OpenAI-compatible server
# on this CPU-only machine (the benchmarks' peer; also an upstream for
# INFERENCE_ENGINE=openai).
#
# Usage: scripts/run_vllm_server.sh MODEL_DIR PORT [extra vLLM args...]
#   MODEL_DIR: e.g. the output of `python -m worker.engines.hf_loader`
#   env: SERVED_MODEL_NAME (default smollm2-135m-instruct), MAX_MODEL_LEN (2048),
#        MAX_NUM_SEQS (unset = vLLM's default), HOST (127.0.0.1),
#        VLLM_CPU_KVCACHE_SPACE (GiB, default 1), VLLM_VENV (.venv-vllm)
#
# Ready when GET http://HOST:PORT/v1/models answers (about 35 s here). The
# server runs in the foreground (exec), so this script's PID is the server's.
#
# Why these settings (measured on 2-core AMD EPYC hosts: Zen 2 with AVX2 only, and Zen 4):
#   * --dtype: bfloat16 where the CPU does bf16 natively (avx512_bf16/amx_bf16 in
#     /proc/cpuinfo; on Zen 4: 158 vs 102 tok/s at 8 streams), else float32 (on
#     AVX2-only Zen 2, bfloat16 ran ~3x slower). VLLM_DTYPE overrides.
#   * --enforce-eager: torch.compile warm-up takes 80-110 s at each new
#     configuration for ~5% more throughput (64.6 vs 60-63 tok/s at 8 streams).
#   * OpenMP binding left on "auto": vLLM binds the model's threads to one core
#     and leaves the other to the API server and the engine-core scheduler. Both
#     cores for the model (VLLM_CPU_OMP_THREADS_BIND=0-1) halved throughput:
#     the threads fight the busy-polling scheduler.
#   * `vllm serve` fails on a version lookup in this build: use the module.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL_DIR PORT [extra vLLM args...]" >&2
    exit 2
fi
MODEL_DIR="$1"
PORT="$2"
shift 2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "$VENV missing: run scripts/install_vllm.sh first" >&2
    exit 1
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
if [[ -z "${VLLM_DTYPE:-}" ]]; then
    if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then VLLM_DTYPE=bfloat16; else VLLM_DTYPE=float32; fi
fi

args=(
    --model "$MODEL_DIR"
    --served-model-name "${SERVED_MODEL_NAME:-smollm2-135m-instruct}"
    --host "${HOST:-127.0.0.1}"
    --port "$PORT"
    --dtype "$VLLM_DTYPE"
    --max-model-len "${MAX_MODEL_LEN:-2048}"
    --enforce-eager
    --disable-uvicorn-access-log
)
if [[ -n "${MAX_NUM_SEQS:-}" ]]; then
    args+=(--max-num-seqs "$MAX_NUM_SEQS")
fi

exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
