#!/usr/bin/env bash
# `make demo`: the whole msrl pipeline on the embedded MNI152 template cohort, on the CPU, in latent
# space at 64³ (the paper's setting; voxel-space diffusion at 64³ would not fit the time on 2 cores):
# VQ-GAN → latent diffusion → in-domain feature encoder → reward networks → PPO against the multi-scale
# reward → evaluation (paired differences, in-domain FID, reward, memorisation, utility) → report.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
progress=(--trainer.enable_progress_bar "${DEMO_PROGRESS:-true}")
runs=(--trainer.logger.init_args.save_dir "$OUT/runs")
# every stage reads one cohort at 64³: 160 subjects, 64 train / 32 val / 64 test (configs/*/template*.yaml);
# the reward networks' data (configs/data/template.yaml) is set to it here
cohort=(num_subjects 160 spatial_size 64 template_resolution 2 val_fraction 0.2 test_fraction 0.4)
critic_data=() classifier_data=()
for ((i = 0; i < ${#cohort[@]}; i += 2)); do
  critic_data+=(--data.init_args.data.init_args.${cohort[i]} "${cohort[i+1]}")
  classifier_data+=(--data.init_args.${cohort[i]} "${cohort[i+1]}")
done
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s) =="; }
need() { [ -f "$1" ] || { echo "demo: $2 wrote no $1" >&2; exit 1; }; }

stage "1/7 train the 3D VQ-GAN first stage (64³ → 8×16³ latents; the first stage builds the cohort)"
# two workers build the cohort (160 subjects, ~1 s each) in parallel; later stages read its cache
msrl train-autoencoder -c configs/autoencoder/template.yaml --data.init_args.num_workers 2 "${progress[@]}" \
  "${runs[@]}"
autoencoder="$OUT/runs/autoencoder/version_0/checkpoints/last.ckpt"
need "$autoencoder" "train-autoencoder"

stage "2/7 pretrain a class-conditional latent diffusion model"
# latent steps are cheap (~0.2 s): 60 epochs of 16 steps instead of the CPU trainer's 40 (about 3 minutes)
msrl pretrain -c configs/pretrain/template_latent.yaml --model.autoencoder_checkpoint "$autoencoder" \
  --trainer.max_epochs 60 "${progress[@]}" "${runs[@]}"
pretrained="$OUT/runs/pretrain/version_0/checkpoints/last.ckpt"
need "$pretrained" "pretraining"

stage "3/7 train the in-domain feature encoder of the evaluation (self-supervised, no labels, no reward weights)"
msrl train-extractor -c configs/extractor/template.yaml "${progress[@]}" "${runs[@]}"
extractor="$OUT/runs/extractor/version_0/checkpoints/last.ckpt"
need "$extractor" "train-extractor"

stage "4/7 train the reward networks: 2D slice and 3D volume critics, the classifier (64³)"
msrl train-reward -c configs/rewards/critics.yaml --data.init_args.generator_checkpoint "$pretrained" \
  "${critic_data[@]}" "${progress[@]}" "${runs[@]}"
msrl train-reward -c configs/rewards/classifier.yaml "${classifier_data[@]}" "${progress[@]}" "${runs[@]}"

stage "5/7 PPO fine-tuning in latent space against the multi-scale reward on decoded volumes"
# configs/rewards/multiscale.yaml points at runs/…; this demo's networks are under $OUT/runs/….
sed "s#runs/critics/#$OUT/runs/critics/#; s#runs/classifier/#$OUT/runs/classifier/#" \
  configs/rewards/multiscale.yaml > "$OUT/multiscale.yaml"
msrl finetune -c configs/finetune/template_latent.yaml --model.init_checkpoint "$pretrained" \
  --model.reward "$OUT/multiscale.yaml" "${progress[@]}" "${runs[@]}"
finetuned="$OUT/runs/finetune/version_0/checkpoints/last.ckpt"
need "$finetuned" "fine-tuning"

stage "6/7 evaluate fine-tuned vs pretrained, paired (same seeds), at the evaluation and the rollout sampler"
# configs/evaluate/template.yaml reads the encoder under runs/…; this demo's is under $OUT/runs/….
sed "s#runs/extractor/#$OUT/runs/extractor/#" configs/evaluate/template.yaml > "$OUT/evaluate.yaml"
msrl evaluate -c "$OUT/evaluate.yaml" --checkpoint "$pretrained" --checkpoint "$finetuned" \
  --autoencoder "$autoencoder" --names "[pretrained, finetuned, autoencoder-reconstruction]" --out "$OUT/evaluation"

stage "7/7 report: paired differences, curves, metric bars, slices, histograms"
msrl report "$OUT/evaluation" "$OUT/runs/finetune/version_0" "$OUT/runs/pretrain/version_0" \
  "$OUT/runs/autoencoder/version_0" --out "$OUT/report"

echo
sed -n '/^Primary metric/,/^## Summary/p' "$OUT/evaluation/metrics.md" | grep -v '^## Summary'  # the paired table
cat <<DONE

msrl demo finished in $(( $(date +%s) - start )) s.
  report:            $OUT/report/report.html (and report.md, PNG figures beside it)
  metrics:           $OUT/evaluation/metrics.json, $OUT/evaluation/metrics.md
  NIfTI samples:     $OUT/evaluation/samples/<model>/*.nii.gz (64³; manifest.csv and slices.png beside them)
  checkpoints:       $OUT/runs/{autoencoder,pretrain,extractor,critics,classifier,finetune}/version_0/checkpoints/
  resolved configs:  $OUT/runs/*/version_0/config.yaml
  TensorBoard logs:  tensorboard --logdir $OUT/runs   (val/l1, ae/codebook_*, train/loss, ppo/reward_raw/*, ppo/heldout_fid)
DONE
