#!/usr/bin/env bash
# Encoder kinds on one set of hidden states (issue 25, item 3): collect + embed once (stage2 pretrained: the
# untrained tiny VLM, spatial read-out), then each variant's train-encoder; the same experiment name retrains
# encoder/ for each encoder config (its hash differs), so each metrics.json is copied out before the next.
# Usage: benchmarks/encoder-kinds/run.sh [variant ...]   (default: every variant below)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/encoder-kinds
base=(configs/pong-tiny.yaml --set "experiment.run_root=$PWD/runs" --set experiment.name=kinds --set stage2.method=pretrained)
declare -A variants=(  # name -> its --set flags over pong-tiny.yaml's encoder section (the baseline)
  [temporal-w4-d64]=""
  [temporal-w2-d64]="--set encoder.window=2"
  [temporal-w4-d128]="--set encoder.latent_dim=128"
  [temporal-w4-d64-e60]="--set encoder.epochs=60"
  [mlp-d64]="--set encoder.kind=mlp"
  [vq-d64]="--set encoder.kind=vq"
  [linear-d64]="--set encoder.kind=linear"
  [linear-d128]="--set encoder.kind=linear --set encoder.latent_dim=128"
  [linear-d128-e60]="--set encoder.kind=linear --set encoder.latent_dim=128 --set encoder.epochs=60"
)
order=(temporal-w4-d64 temporal-w2-d64 temporal-w4-d128 temporal-w4-d64-e60 mlp-d64 vq-d64 linear-d64 linear-d128
       linear-d128-e60)
envenc collect "${base[@]}"
envenc embed "${base[@]}"
for name in "${@:-${order[@]}}"; do
  # shellcheck disable=SC2086  # the variant's flags are words
  envenc train-encoder "${base[@]}" ${variants[$name]}
  cp runs/kinds/encoder/metrics.json "$out/$name.json"
done
