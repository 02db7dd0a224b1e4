#!/usr/bin/env bash
# `make study`: the CPU-sized study on the embedded cohort (README, "Does it work?"): the demo's models
# (VQ-GAN, latent diffusion, in-domain encoder, reward networks) into $STUDY_OUT/models, then `msrl study`:
# reward backpropagation with the 2D, the 3D and both critics, and PPO with both, three seeds each, each unit
# evaluated paired against the pretrained model on the test split, then results.md/.json and figures. Rerunning continues: finished models and units are kept.
set -euo pipefail
STUDY_OUT=${STUDY_OUT:-study_out}
OUT="$STUDY_OUT/models"
mkdir -p "$OUT"
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s) =="; }
need() { [ -f "$1" ] || { echo "study: $2 wrote no $1" >&2; exit 1; }; }
STAGES=5 EVALUATE_CONFIG=configs/evaluate/template.yaml  # the study's evaluation, fixed before any tuning
DEMO_PROGRESS=${DEMO_PROGRESS:-false}
source scripts/models.sh
train_models

stage "5/5 msrl study: fine-tuning arms × seeds, paired evaluations, results"
# configs/study/template.yaml names study_out/models/…; another STUDY_OUT is passed on here
msrl study -c configs/study/template.yaml --out "$STUDY_OUT" --pretrained "$pretrained" \
  --reward "$OUT/multiscale_differentiable.yaml" --evaluate_config "$OUT/evaluate.yaml"
echo
sed -n '1,/^## /p' "$STUDY_OUT/results.md" | head -n 60
echo
echo "msrl study finished in $(( $(date +%s) - start )) s: $STUDY_OUT/results.md, results.json, figures/"
