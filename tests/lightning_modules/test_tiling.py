"""Tiled decoding (lightning_modules/first_stage/tiling.py): equal to whole decoding, memory flat in the volume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.memory import profiled_peak_bytes
from lightning_modules.diffusion.latent import LatentSpace
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.first_stage.tiling import TiledDecoding, trim_weights
from lightning_modules.first_stage.vqgan import AutoencoderModule
from tests.conftest import tiny_training

# The tolerance tiled vs whole at 64³ (16³ latents in 14³ tiles, overlap 10 voxels): "trim" with a
# margin of 5 latent voxels, which covers the VQ-GAN decoder's receptive field (±5 latent voxels);
# measured max |tiled − whole| 2.9e-4 on outputs of std 0.69.
TRIM_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def decoder_64() -> AutoencoderModule:
    """An untrained 64³ VQ-GAN (8×16³ latents) whose decoder outputs span a useful range."""
    torch.manual_seed(0)
    module = AutoencoderModule(spatial_size=64, channels=(8, 8), num_res_channels=(8, 8), embedding_dim=4,
                               num_embeddings=32, training=tiny_training()).eval()
    with torch.no_grad():  # an untrained decoder outputs ~0.01: scale its last layer so seams would show
        module.network.decoder.blocks[-1].conv.weight.mul_(30)
    return module


def _latents(module: AutoencoderModule, side: int) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return module.encode_latent(torch.rand(1, 1, side, side, side) * 2 - 1)


def test_trim_tiling_equals_whole_decoding_at_64(decoder_64: AutoencoderModule) -> None:
    latents = _latents(decoder_64, 64)
    with torch.no_grad():
        whole = decoder_64.decode_latent(latents)
        tiled = TiledDecoding(tile_size=14, overlap=5 / 7, blend="trim").decode(decoder_64.decode_latent, latents)
    assert whole.std() > 0.05  # outputs span enough of [-1, 1] for a seam to show
    assert tiled.shape == whole.shape == (1, 1, 64, 64, 64)
    assert (tiled - whole).abs().max() < TRIM_TOLERANCE


def test_monai_blends_are_close_but_not_equal(decoder_64: AutoencoderModule) -> None:
    latents = _latents(decoder_64, 32)
    with torch.no_grad():
        whole = decoder_64.decode_latent(latents)
        errors = {blend: (TiledDecoding(4, 0.5, blend).decode(decoder_64.decode_latent, latents) - whole).abs()
                  for blend in ("constant", "gaussian", "trim")}
    for blend, error in errors.items():
        assert error.mean() < 0.25 * whole.abs().mean(), blend
    assert errors["trim"].mean() < errors["gaussian"].mean() < errors["constant"].mean()
    assert errors["gaussian"].max() > TRIM_TOLERANCE  # a margin short of the receptive field shows at seams


def test_a_tile_as_large_as_the_latent_decodes_it_whole(decoder_64: AutoencoderModule) -> None:
    latents = _latents(decoder_64, 64)
    settings = TiledDecoding(tile_size=16)
    assert not settings.is_tiled((16, 16, 16)) and settings.is_tiled((32, 32, 32))
    with torch.no_grad():
        assert torch.equal(settings.decode(decoder_64.decode_latent, latents), decoder_64.decode_latent(latents))


def test_trim_weights_favour_the_deepest_tile() -> None:
    weights = trim_weights(12, 0.5, torch.device("cpu"))
    line = weights[6, 6, :]
    assert weights.shape == (12, 12, 12) and torch.all(weights > 0) and torch.isfinite(weights).all()
    assert torch.equal(line, line.flip(0)) and line[3] == line[6] == line.max()  # margin 3: a flat centre
    assert line[2] / line[1] >= 10 and line[1] / line[0] >= 10


@pytest.mark.parametrize("settings, message", [
    (dict(tile_size=0), "decode_tile_size"), (dict(tile_size=8, overlap=1.0), "decode_overlap"),
    (dict(tile_size=8, blend="linear"), "decode_blend"),
])
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TiledDecoding(**settings)


@pytest.mark.slow  # ~18 s on an idle 2-core machine (profiling a whole 64³ decode)
def test_decoder_peak_memory_is_flat_in_the_volume_size(decoder_64: AutoencoderModule) -> None:
    """Profiled tensor peak of decoding 32³ and 64³ in 4³-latent tiles: flat but for the output buffers."""
    tiled = TiledDecoding(tile_size=4, overlap=0.5, blend="gaussian")
    peaks: dict[tuple[str, int], float] = {}
    for side in (32, 64):
        latents = torch.randn(1, 4, side // 4, side // 4, side // 4)
        output = side**3 * 4 / 2**20  # one float32 channel (MiB): the volume and the inferer's weight sums
        with torch.no_grad():
            peaks["whole", side] = profiled_peak_bytes(lambda z=latents: decoder_64.decode_latent(z)) / 2**20
            peaks["tiled", side] = (profiled_peak_bytes(lambda z=latents: tiled.decode(decoder_64.decode_latent, z))
                                    / 2**20 - 3 * output)
    assert peaks["tiled", 64] < 0.5 * peaks["whole", 64]
    assert peaks["tiled", 64] < 1.3 * peaks["tiled", 32]  # output buffers aside, the same MiB


def test_latent_models_decode_tiled_when_configured(latent_checkpoint: Path) -> None:
    model = DiffusionModule.from_msrl_checkpoint(latent_checkpoint)
    assert model.hparams.decode_tile_size is None and not model.latent.tiling.is_tiled(model.sample_shape[1:])
    settings = {**model.hparams, "decode_tile_size": 2, "decode_overlap": 0.5, "decode_blend": "gaussian",
                "decode_batch_size": 1}
    tiled = DiffusionModule(**settings)
    assert tiled.latent.tiling.is_tiled(tiled.sample_shape[1:]) and tiled.latent.tiling.tiles_per_pass == 1
    samples = torch.randn(3, *model.sample_shape)
    whole, pieces = model.to_images(samples), tiled.to_images(samples)
    assert pieces.shape == whole.shape == (3, 1, 16, 16, 16)
    assert pieces.abs().max() <= 1 and not torch.equal(pieces, whole)  # a 4³ latent in 2³ tiles: seams differ


def test_latent_space_refuses_a_zero_batch(latent_checkpoint: Path) -> None:
    path = DiffusionModule.from_msrl_checkpoint(latent_checkpoint).latent.path
    with pytest.raises(ValueError, match="decode_batch_size"):
        LatentSpace(path, decode_batch_size=0)
