#!/usr/bin/env bash
# `make demo`: the whole msrl pipeline on the embedded MNI152 template cohort, on the CPU.
# Later stages (reward training, PPO, evaluation) join here as they land.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/2 pretrain a 3D diffusion model on the template cohort (32³, CPU) =="
msrl pretrain -c configs/pretrain/template.yaml \
  --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name pretrain \
  --trainer.enable_progress_bar "${DEMO_PROGRESS:-true}" "$@"
run_dir="$OUT/runs/pretrain/version_0"
ckpt="$run_dir/checkpoints/last.ckpt"
[ -f "$ckpt" ] || { echo "demo: pretraining wrote no $ckpt" >&2; exit 1; }

echo "== 2/2 sample 4 volumes per class with DDIM (50 steps, eta 0) =="
msrl sample --checkpoint "$ckpt" --num-samples 4 --label 0 --steps 50 --eta 0.0 --out "$OUT/samples/label0"
msrl sample --checkpoint "$ckpt" --num-samples 4 --label 1 --steps 50 --eta 0.0 --out "$OUT/samples/label1"

cat <<DONE

msrl demo finished in $(( $(date +%s) - start )) s.
  NIfTI samples:     $OUT/samples/label0/*.nii.gz, $OUT/samples/label1/*.nii.gz (manifest.csv beside them)
  slice PNGs:        $OUT/samples/label0/slices.png, $OUT/samples/label1/slices.png
  checkpoints:       $run_dir/checkpoints/ (last.ckpt + best)
  resolved config:   $run_dir/config.yaml
  TensorBoard logs:  tensorboard --logdir $OUT/runs
DONE
