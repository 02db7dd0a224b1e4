#!/usr/bin/env bash
# `make demo`: the whole msrl pipeline on the embedded MNI152 template cohort, on the CPU:
# pretrain → train the reward networks → PPO fine-tuning against the multi-scale reward → samples.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
progress=(--trainer.enable_progress_bar "${DEMO_PROGRESS:-true}")
runs=(--trainer.logger.init_args.save_dir "$OUT/runs")

echo "== 1/5 pretrain a 3D diffusion model on the template cohort (32³, CPU) =="
msrl pretrain -c configs/pretrain/template.yaml "${progress[@]}" "${runs[@]}"
pretrained="$OUT/runs/pretrain/version_0/checkpoints/last.ckpt"
[ -f "$pretrained" ] || { echo "demo: pretraining wrote no $pretrained" >&2; exit 1; }

echo "== 2/5 train the 2D slice and 3D volume realism critics (real vs generated / artefacts) =="
msrl train-reward -c configs/rewards/critics.yaml --data.init_args.generator_checkpoint "$pretrained" \
  "${progress[@]}" "${runs[@]}"

echo "== 3/5 train the downstream classifier (lesion vs healthy) =="
msrl train-reward -c configs/rewards/classifier.yaml "${progress[@]}" "${runs[@]}"

echo "== 4/5 PPO fine-tuning against the multi-scale reward =="
# configs/rewards/multiscale.yaml points at runs/…; this demo's networks are under $OUT/runs/….
sed "s#runs/critics/#$OUT/runs/critics/#; s#runs/classifier/#$OUT/runs/classifier/#" \
  configs/rewards/multiscale.yaml > "$OUT/multiscale.yaml"
msrl finetune -c configs/finetune/template.yaml --model.init_checkpoint "$pretrained" \
  --model.reward "$OUT/multiscale.yaml" "${progress[@]}" "${runs[@]}"
finetuned="$OUT/runs/finetune/version_0/checkpoints/last.ckpt"
[ -f "$finetuned" ] || { echo "demo: fine-tuning wrote no $finetuned" >&2; exit 1; }

echo "== 5/5 sample 4 volumes per class from both models (DDIM, 50 steps, eta 0, same seeds) =="
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
  checkpoints:       $OUT/runs/{pretrain,critics,classifier,finetune}/version_0/checkpoints/
  resolved configs:  $OUT/runs/*/version_0/config.yaml
  TensorBoard logs:  tensorboard --logdir $OUT/runs   (train/loss, val/loss, val/auroc*, ppo/reward/*, slices)
DONE
