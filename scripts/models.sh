#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/study.sh: the models every PPO run needs, trained on the embedded
# cohort at 64³ into "$OUT/runs/<stage>/version_0/" — the VQ-GAN, the class-conditional latent diffusion model,
# the in-domain encoder of the evaluation, and the reward networks (2D/3D critics, classifier) — plus
# "$OUT/multiscale.yaml", "$OUT/multiscale_differentiable.yaml", "$OUT/multiscale_critics.yaml" and
# "$OUT/evaluate.yaml" pointing at them.
# A stage whose checkpoint exists is kept.
# Needs from the caller: OUT, stage() and need(), STAGES (the caller's stage count), EVALUATE_CONFIG.
# train_models runs both halves: train_generator (stages 1–2) and train_judges (stages 3–4).
# AUTOENCODER_EPOCHS (64, the config's) and PRETRAIN_EPOCHS (120) shorten stages 1–2 (scripts/demo_mask.sh).
progress=(--trainer.enable_progress_bar "${DEMO_PROGRESS:-true}")
# every stage reads one cohort at 64³: 160 subjects, 64 train / 32 val / 64 test (configs/*/template*.yaml);
# the reward networks' data (configs/data/template.yaml) is set to it here
cohort=(num_subjects 160 spatial_size 64 template_resolution 2 val_fraction 0.2 test_fraction 0.4)
critic_data=() classifier_data=()
for ((i = 0; i < ${#cohort[@]}; i += 2)); do
  critic_data+=(--data.init_args.data.init_args.${cohort[i]} "${cohort[i+1]}")
  classifier_data+=(--data.init_args.${cohort[i]} "${cohort[i+1]}")
done
autoencoder="$OUT/runs/autoencoder/version_0/checkpoints/last.ckpt"
pretrained="$OUT/runs/pretrain/version_0/checkpoints/last.ckpt"
extractor="$OUT/runs/extractor/version_0/checkpoints/last.ckpt"
critics="$OUT/runs/critics/version_0/checkpoints/last.ckpt"
classifier="$OUT/runs/classifier/version_0/checkpoints/last.ckpt"

# every stage's TensorBoard run is version_0 (a rerun after an interruption reuses the folder)
runs=(--trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.version 0)

train_models() {
  train_generator
  train_judges
}

# stages 1–2: the first stage and the latent diffusion model (scripts/demo_mask.sh needs only these)
train_generator() {
  stage "1/$STAGES train the 3D VQ-GAN first stage (64³ → 8×16³ latents; the first stage builds the cohort)"
  # two workers build the cohort (160 subjects, ~1 s each) in parallel; later stages read its cache
  [ -f "$autoencoder" ] || msrl train-autoencoder -c configs/autoencoder/template.yaml \
    --data.init_args.num_workers 2 --trainer.max_epochs "${AUTOENCODER_EPOCHS:-64}" \
    --trainer.check_val_every_n_epoch $(( ${AUTOENCODER_EPOCHS:-64} / 2 )) "${progress[@]}" "${runs[@]}"
  need "$autoencoder" "train-autoencoder"

  stage "2/$STAGES pretrain a class-conditional latent diffusion model"
  # latent steps are cheap (~0.2 s): 120 epochs of 16 steps (about 6 minutes); the config weighs the lesion's latent
  # cells 1 + 3 in the loss, without which no sample draws a lesion (val split, docs/design.md §2a)
  [ -f "$pretrained" ] || msrl pretrain -c configs/pretrain/template_latent.yaml \
    --model.autoencoder_checkpoint "$autoencoder" --trainer.max_epochs "${PRETRAIN_EPOCHS:-120}" \
    "${progress[@]}" "${runs[@]}"
  need "$pretrained" "pretraining"
}

# stages 3–4: the evaluation's in-domain encoder and the reward networks, and the configs that point at them
train_judges() {
  stage "3/$STAGES train the in-domain feature encoder of the evaluation (self-supervised, no labels, no reward weights)"
  [ -f "$extractor" ] || msrl train-extractor -c configs/extractor/template.yaml "${progress[@]}" "${runs[@]}"
  need "$extractor" "train-extractor"

  stage "4/$STAGES train the reward networks: 2D slice and 3D volume critics, the classifier (64³)"
  [ -f "$critics" ] || msrl train-reward -c configs/rewards/critics.yaml \
    --data.init_args.generator_checkpoint "$pretrained" "${critic_data[@]}" "${progress[@]}" "${runs[@]}"
  need "$critics" "train-reward (critics)"
  [ -f "$classifier" ] || msrl train-reward -c configs/rewards/classifier.yaml "${classifier_data[@]}" \
    "${progress[@]}" "${runs[@]}"
  need "$classifier" "train-reward (classifier)"

  # configs/rewards/multiscale.yaml and the evaluation config point at runs/…; these networks are under $OUT/runs/…
  sed "s#runs/critics/#$OUT/runs/critics/#; s#runs/classifier/#$OUT/runs/classifier/#" \
    configs/rewards/multiscale.yaml > "$OUT/multiscale.yaml"
  for reward in multiscale_differentiable multiscale_critics; do
    sed "s#runs/critics/#$OUT/runs/critics/#; s#runs/classifier/#$OUT/runs/classifier/#" \
      "configs/rewards/$reward.yaml" > "$OUT/$reward.yaml"
  done
  sed "s#runs/extractor/#$OUT/runs/extractor/#" "$EVALUATE_CONFIG" > "$OUT/evaluate.yaml"
}
