#!/usr/bin/env bash
# The encoder benchmark on a CUDA GPU, offline: `envenc bench encoder` for the built-in tiny VLM and for a
# random 291M-parameter Llava-architecture model (benchmarks/build_random_llava.py), both built here.
#
#   . .venv/bin/activate && benchmarks/gpu_check.sh     # results in $OUT if set, else benchmarks/gpu/
#
# Writes bench_encoder_<model>.json (+ its batch-sweep .png) per model and gpu_check.log (everything printed).
# One bench run measures both dtypes: float32 and bfloat16 in process (batch sweep) and through Serve, so each
# model runs once, with vlm.dtype=float32 as its headline. Nothing is trained: the bench times an untrained
# encoder of the config's shape when the run has none. Without a CUDA GPU it prints one line and exits 0.
set -euo pipefail

# A python without torch is a broken setup, not a machine without a GPU: fail, don't skip.
cuda="$(python -c 'import torch; print(torch.cuda.is_available())')" || {
    echo "gpu_check: error: python cannot import torch; activate the project's environment (. .venv/bin/activate)" >&2
    exit 1
}
if [[ "$cuda" != "True" ]]; then
    echo "gpu_check: skipped: torch sees no CUDA GPU (torch.cuda.is_available() is False)"
    exit 0
fi

cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/gpu}"
mkdir -p "$out_dir"
work="$(mktemp -d)"  # the models (1.2 GB) and run folders: scratch, not results
trap 'rm -rf "$work"' EXIT

bench() {  # bench NAME MODEL_DIR [--set KEY=VALUE ...]
    local name="$1" model="$2"
    shift 2
    # --seconds 2 per timed phase (default 4): a GPU runs many batches in that, and the whole check stays near
    # an estimated 6-8 minutes (not yet timed on a GPU). vlm.num_threads=8: the naive baseline (a) and the FLOP
    # count run the full HF model on the CPU (bench.py loads it there), one thread would take minutes.
    envenc bench encoder configs/pong-tiny.yaml --json "$out_dir/bench_encoder_$name.json" --seconds 2 \
        --set experiment.run_root="$work/runs" --set vlm.model="$model" --set vlm.dtype=float32 \
        --set vlm.device=cuda --set serve.num_gpus=1 --set vlm.num_threads=8 "$@"
}

main() {
    python -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__,
                                   "CUDA", torch.version.cuda)'
    envenc model init-tiny --out "$work/tiny-vlm"
    python benchmarks/build_random_llava.py --tokenizer-from "$work/tiny-vlm" --out "$work/random-llava"
    bench tiny "$work/tiny-vlm"
    # mid-depth, as configs/llava-1.5-gpu.yaml reads layer 16 of 32; the whole frame, as a Pong run should see it
    bench random-llava "$work/random-llava" --set vlm.layer=6 --set vlm.crop=none
    echo "gpu_check: done in ${SECONDS} s; results in $out_dir"
}

main 2>&1 | tee "$out_dir/gpu_check.log"
