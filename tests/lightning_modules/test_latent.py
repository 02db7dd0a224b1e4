"""Latent diffusion: training and sampling in the VQ-GAN's latent space, PPO on latents, clear errors."""

import shutil
from pathlib import Path

import nibabel as nib
import pytest
import torch

from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.diffusion.sampling import ddim_step_with_logprob, guided_prediction
from lightning_modules.first_stage.vqgan import AutoencoderModule
from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.cli import main
from tests.lightning_modules.test_ppo import BrightnessReward


def test_latent_model_denoises_latents_and_samples_full_size_volumes(latent_checkpoint: Path,
                                                                      autoencoder_checkpoint: Path) -> None:
    model = DiffusionModule.from_msrl_checkpoint(latent_checkpoint)
    autoencoder = AutoencoderModule.from_msrl_checkpoint(autoencoder_checkpoint)
    assert model.sample_shape == autoencoder.latent_shape == (4, 4, 4, 4)
    assert model.unet.conv_in.conv.in_channels == 4  # the UNet follows the latent channels
    assert model.latent.scale_factor == pytest.approx(autoencoder.scale_factor) and model.latent.scale_factor != 1.0
    volumes = model.generate(3, num_steps=3, seed=0)
    assert volumes.shape == (3, 1, 16, 16, 16) and volumes.abs().max() <= 1
    images = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    latents = model.to_diffusion_space(images)
    assert torch.allclose(latents, autoencoder.encode_latent(images) * autoencoder.scale_factor, atol=1e-6)
    # no weights of the frozen first stage enter the diffusion checkpoint
    checkpoint = torch.load(latent_checkpoint, weights_only=True)
    assert not any("autoencoder" in key or "network.encoder" in key for key in checkpoint["state_dict"])
    assert checkpoint["msrl_diffusion"]["autoencoder"]["path"] == str(autoencoder_checkpoint)


def test_msrl_sample_writes_image_sized_volumes(latent_checkpoint: Path, tmp_path: Path) -> None:
    main(["sample", "--checkpoint", str(latent_checkpoint), "--num-samples", "2", "--steps", "3",
          "--out", str(tmp_path / "samples")])
    image = nib.load(tmp_path / "samples" / "sample_0000.nii.gz")
    assert image.shape == (16, 16, 16)


def test_missing_or_changed_autoencoder_gives_a_clear_error(latent_checkpoint: Path, autoencoder_checkpoint: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    saved = tmp_path / "saved.ckpt"
    shutil.copy(autoencoder_checkpoint, saved)
    try:
        autoencoder_checkpoint.unlink()
        with pytest.raises(SystemExit):
            main(["sample", "--checkpoint", str(latent_checkpoint), "--out", str(tmp_path / "a")])
        message = capsys.readouterr().err
        assert str(autoencoder_checkpoint) in message and "does not exist" in message
        autoencoder_checkpoint.write_bytes(saved.read_bytes() + b"\0")  # same place, different file
        with pytest.raises(ValueError, match="is not the one this diffusion model was trained with"):
            DiffusionModule.from_msrl_checkpoint(latent_checkpoint)
    finally:
        shutil.copy(saved, autoencoder_checkpoint)
    assert not (tmp_path / "a").exists()


def test_latent_ppo_scores_decoded_volumes_and_its_logprobs_match_the_step(latent_checkpoint: Path) -> None:
    torch.manual_seed(0)
    module = PPOFinetuneModule(str(latent_checkpoint), BrightnessReward(), samples_per_iteration=2, num_steps=4,
                               micro_batch_size=2)
    labels, trajectory, samples = module.rollout()
    assert trajectory.latents.shape == (2, 5, 4, 4, 4, 4)  # the policy acts on latents
    volumes = module.policy.to_images(samples)
    assert volumes.shape == (2, 1, 16, 16, 16)
    assert BrightnessReward()(volumes).shape == (2,)
    scheduler = module.scheduler
    scheduler.set_timesteps(4)
    for step in torch.nonzero(trajectory.stochastic).flatten().tolist():
        x_t, t = trajectory.latents[:, step], int(trajectory.timesteps[step])
        timesteps = torch.full((2,), t)
        with torch.no_grad():
            prediction = guided_prediction(
                lambda x, s, y: module.policy.unet(x, s, class_labels=y), x_t, timesteps, labels, 1.0,
                module.policy.null_class)
        _, log_prob = ddim_step_with_logprob(scheduler, prediction, t, x_t, eta=module.hparams.eta,
                                             prev_sample=trajectory.latents[:, step + 1])
        assert torch.allclose(log_prob, trajectory.log_probs[:, step], atol=1e-5), step


def test_latent_ppo_runs_an_iteration_through_the_cli(latent_checkpoint: Path, tmp_path: Path) -> None:
    from tests.lightning_modules.test_ppo import _finetune

    run = _finetune(latent_checkpoint, tmp_path, "--trainer.max_epochs", "1", "--model.iterations_per_epoch", "1",
                    "--model.num_steps", "3")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    finetuned = DiffusionModule.from_msrl_checkpoint(run / "checkpoints" / "last.ckpt")
    assert finetuned.latent is not None and finetuned.generate(1, num_steps=2).shape == (1, 1, 16, 16, 16)


def test_training_latents_are_encoded_once_per_subject(latent_checkpoint: Path) -> None:
    model = DiffusionModule.from_msrl_checkpoint(latent_checkpoint)
    calls = []
    encode = model.latent.autoencoder.encode_latent
    model.latent.autoencoder.encode_latent = lambda images: calls.append(len(images)) or encode(images)
    images = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    first = model.to_diffusion_space(images, ["a", "b", "c"])
    again = model.to_diffusion_space(images[[2, 0]], ["c", "a"])
    assert calls == [3]  # the second batch came from the cache
    assert torch.equal(again, first[[2, 0]])
    assert torch.allclose(first, model.latent.encode(images), atol=1e-6)
