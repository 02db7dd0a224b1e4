#!/usr/bin/env bash
# `make demo`: the whole msrl pipeline on the embedded MNI152 template cohort, on the CPU.
# Later stages (reward training, evaluation) join here as they land.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
progress=(--trainer.enable_progress_bar "${DEMO_PROGRESS:-true}")

echo "== 1/3 pretrain a 3D diffusion model on the template cohort (32³, CPU) =="
msrl pretrain -c configs/pretrain/template.yaml "${progress[@]}" \
  --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name pretrain
pretrained="$OUT/runs/pretrain/version_0/checkpoints/last.ckpt"
[ -f "$pretrained" ] || { echo "demo: pretraining wrote no $pretrained" >&2; exit 1; }

echo "== 2/3 PPO fine-tuning against the inter-slice continuity reward =="
msrl finetune -c configs/finetune/template.yaml --model.init_checkpoint "$pretrained" "${progress[@]}" \
  --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name finetune
finetuned="$OUT/runs/finetune/version_0/checkpoints/last.ckpt"
[ -f "$finetuned" ] || { echo "demo: fine-tuning wrote no $finetuned" >&2; exit 1; }

echo "== 3/3 sample 4 volumes per class from both models (DDIM, 50 steps, eta 0, same seeds) =="
for model in pretrained finetuned; do
  for label in 0 1; do
    msrl sample --checkpoint "${!model}" --num-samples 4 --label "$label" --steps 50 --eta 0.0 \
      --out "$OUT/samples/$model/label$label"
  done
done

cat <<DONE

msrl demo finished in $(( $(date +%s) - start )) s.
  NIfTI samples:     $OUT/samples/{pretrained,finetuned}/label{0,1}/*.nii.gz (manifest.csv beside them)
  slice PNGs:        $OUT/samples/{pretrained,finetuned}/label{0,1}/slices.png
  checkpoints:       $OUT/runs/pretrain/version_0/checkpoints/, $OUT/runs/finetune/version_0/checkpoints/
  resolved configs:  $OUT/runs/*/version_0/config.yaml
  TensorBoard logs:  tensorboard --logdir $OUT/runs   (train/loss, val/loss, ppo/reward/*, sample slices)
DONE
