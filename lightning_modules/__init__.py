"""LightningModules of msrl: diffusion pretraining, DDIM sampling with log-probabilities, the CLI."""
