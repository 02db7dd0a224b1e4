"""Benchmark sizes: the CPU preset of `make bench`, the GPU preset of `make bench GPU=1`, a tiny one for tests.

Sizes are chosen so that each ratio means something: the work measured (UNet passes) is large
next to a framework's per-step overhead, yet `make bench` stays under 10 minutes on 2 CPU cores.
Every preset is a frozen `BenchConfig`; `dataclasses.replace` derives variants (`--repeats`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Device = Literal["cpu", "cuda"]
Precision = Literal["32-true", "bf16-mixed"]


@dataclass(frozen=True)
class Net:
    """A class-conditional `DiffusionModule` UNet and its cubic volume side.

    Attributes:
        spatial_size: side S of the [B, 1, S, S, S] volumes.
        channels: UNet channels per level.
        attention_levels: self-attention per level.
        norm_num_groups: GroupNorm groups (divides every channel count).
        num_head_channels: channels per attention head.
        num_res_blocks: residual blocks per level.
    """

    spatial_size: int
    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...] = (False, False, True)
    norm_num_groups: int = 8
    num_head_channels: int = 8
    num_res_blocks: int = 1

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `DiffusionModule` (everything but the volume side)."""
        kwargs = asdict(self)
        kwargs.pop("spatial_size")
        return kwargs

    def at(self, spatial_size: int) -> Net:
        """The same network on volumes of another side."""
        return Net(spatial_size, self.channels, self.attention_levels, self.norm_num_groups, self.num_head_channels,
                   self.num_res_blocks)

    def label(self) -> str:
        """Short description for tables, e.g. `32³ (16,32,32)`."""
        return f"{self.spatial_size}³ ({','.join(map(str, self.channels))})"


@dataclass(frozen=True)
class PPOSize:
    """One PPO iteration's size (the `PPOFinetuneModule` arguments that set its cost).

    Attributes:
        net: the policy network.
        samples: `samples_per_iteration`, volumes rolled out per iteration.
        num_steps: DDIM steps per rollout (η = 1, as DDPO).
        timestep_fraction: share of the stochastic steps trained on.
        micro_batch_size: volumes per forward pass in the update.
    """

    net: Net
    samples: int
    num_steps: int
    timestep_fraction: float
    micro_batch_size: int


@dataclass(frozen=True)
class Autoencoder:
    """A VQ-GAN first stage (`lightning_modules.AutoencoderModule`) of the latent rows.

    Attributes:
        spatial_size: side S of the [B, 1, S, S, S] volumes it encodes.
        channels: channels of each stride-2 level.
        num_res_channels: channels inside the residual layers, per level.
        downsample_levels: stride-2 levels (the latent side is S / 2^levels).
        embedding_dim: latent channels.
        num_embeddings: codebook size.
        discriminator_channels: channels of the first PatchGAN layer (built, never run here).
        discriminator_layers: strided PatchGAN layers (3·2^layers must not exceed S).
    """

    spatial_size: int
    channels: tuple[int, ...]
    num_res_channels: tuple[int, ...]
    downsample_levels: int
    embedding_dim: int
    num_embeddings: int
    discriminator_channels: int = 8
    discriminator_layers: int = 3

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `AutoencoderModule` (the discriminator's sizes go into its `training`)."""
        from lightning_modules import FirstStageTraining

        kwargs = asdict(self)
        training = FirstStageTraining(discriminator_channels=kwargs.pop("discriminator_channels"),
                                      discriminator_layers=kwargs.pop("discriminator_layers"))
        return {**kwargs, "training": training}

    def latent_label(self) -> str:
        """The latent of one volume, e.g. `8×16³`."""
        return f"{self.embedding_dim}×{self.spatial_size // 2 ** self.downsample_levels}³"


@dataclass(frozen=True)
class LatentBench:
    """The latent rows: `latent_rollout_ratio` and the split of one latent PPO iteration.

    Attributes:
        autoencoder: the first stage (untrained: weights do not change what a pass costs).
        rollout: A of the ratio: the latent UNet (its `spatial_size` is the volume side, as for
            `DiffusionModule`, whose UNet then runs on the latent), volumes per rollout and DDIM steps.
        voxel_net: B of the ratio: the voxel-space UNet at the same volume side; B rolls out as many
            volumes with as many DDIM steps as A.
        rollout_repeats: timed pairs of the ratio (a voxel rollout at 64³ takes tens of seconds on 2 cores).
        iteration: the latent PPO iteration whose time is split into rollout / decode / reward / update;
            the reward-backpropagation rows (`benchmarks/backprop.py`) run this size too.
    """

    autoencoder: Autoencoder
    rollout: PPOSize
    voxel_net: Net
    rollout_repeats: int
    iteration: PPOSize

    def voxel_rollout(self) -> PPOSize:
        """B's size: A's volumes, DDIM steps and PPO settings with the voxel-space UNet."""
        return replace(self.rollout, net=self.voxel_net)


@dataclass(frozen=True)
class BenchConfig:
    """Everything one run of the benchmarks needs.

    Attributes:
        name: "cpu", "gpu" or "tiny" (the block of RESULTS.md it updates; tiny updates none).
        device: where tensors live; the CPU presets never touch CUDA.
        precision: Lightning precision of every A and B ("32-true" on CPU, "bf16-mixed" on GPU).
        threads: torch intra-op threads (None: torch's default). See RESULTS.md for why 1 on CPU.
        repeats: timed repetitions of each pair, alternating A/B, after one warm-up of each.
        pretrain: network of the pretraining pair; pretrain_batch its batch; pretrain_steps the
            training steps timed per repetition.
        ppo: the PPO iteration of the rollout, update and reward-share rows.
        memory: network of the activation-checkpointing memory pair; memory_batch its batch;
            memory_repeats fresh processes per variant; memory_variants the checkpointing variants
            measured ("blocks": msrl's activation checkpointing, "none": without; both make the row).
        scaling_net: network of the scaling tables (same at every volume side).
        scaling_sizes: volume sides of the scaling-by-size table.
        scaling_steps: DDIM steps of the scaling-by-steps table (at the first side of
            `scaling_sizes` that is ≥ 32, else the last).
        scaling_samples: rollout volumes per iteration in the scaling tables.
        scaling_size_steps: DDIM steps of the scaling-by-size table.
        latent: the latent-diffusion rows (`latent_rollout_ratio`, the latent PPO split).
        gpu_sizes: (network, batch) pairs of the GPU throughput table (GPU preset only).
    """

    name: str
    device: Device
    precision: Precision
    threads: int | None
    repeats: int
    pretrain: Net
    pretrain_batch: int
    pretrain_steps: int
    ppo: PPOSize
    memory: Net
    memory_batch: int
    memory_repeats: int
    scaling_net: Net
    scaling_sizes: tuple[int, ...]
    scaling_steps: tuple[int, ...]
    scaling_samples: int
    scaling_size_steps: int
    latent: LatentBench
    gpu_sizes: tuple[tuple[Net, int], ...] = field(default=())
    memory_variants: tuple[str, ...] = ("blocks", "none")

    def scaling_steps_size(self) -> int:
        """The volume side at which the scaling-by-steps table runs."""
        return next((s for s in self.scaling_sizes if s >= 32), self.scaling_sizes[-1])


# The brief's reference network for a 32³ training step (about 1.7 s per step on one core).
_REFERENCE_32 = Net(32, (32, 64, 64), norm_num_groups=16, num_head_channels=16)
# The demo's network (configs/pretrain/template.yaml), which the demo fine-tunes with PPO.
_TEMPLATE_32 = Net(32, (16, 32, 32))
_TINY_16 = Net(16, (8, 8, 8))
_TINY_LATENT = Net(16, (8, 8), attention_levels=(False, True))
# The demo's first stage (configs/autoencoder/template.yaml): 64³ volumes → 8×16³ latents.
_TEMPLATE_AUTOENCODER = Autoencoder(64, channels=(16, 32), num_res_channels=(16, 32), downsample_levels=2,
                                    embedding_dim=8, num_embeddings=256)
# The demo's latent UNet (configs/pretrain/template_latent.yaml) on those latents; attention at 4³.
_TEMPLATE_LATENT_64 = Net(64, (32, 64, 64), norm_num_groups=16, num_head_channels=16)

CPU = BenchConfig(
    name="cpu", device="cpu", precision="32-true", threads=1, repeats=5,
    pretrain=_REFERENCE_32, pretrain_batch=1, pretrain_steps=2,
    ppo=PPOSize(_TEMPLATE_32, samples=2, num_steps=10, timestep_fraction=0.3, micro_batch_size=2),
    memory=_REFERENCE_32, memory_batch=2, memory_repeats=1,
    scaling_net=Net(16, (8, 16, 16)), scaling_sizes=(16, 32, 64), scaling_steps=(4, 8, 16), scaling_samples=1,
    scaling_size_steps=4,
    # B is a voxel rollout at 64³ with the latent UNet's channels: ~5.5 s per UNet pass on one core,
    # hence one volume, 4 DDIM steps and 3 timed pairs. The split uses the `ppo` row's settings.
    latent=LatentBench(
        _TEMPLATE_AUTOENCODER,
        rollout=PPOSize(_TEMPLATE_LATENT_64, samples=1, num_steps=4, timestep_fraction=0.3, micro_batch_size=1),
        voxel_net=_TEMPLATE_LATENT_64, rollout_repeats=3,
        iteration=PPOSize(_TEMPLATE_LATENT_64, samples=2, num_steps=10, timestep_fraction=0.3, micro_batch_size=2)),
)

# 64³ and 128³ on one GPU: four levels, so attention runs at 8³/16³ tokens, not at 16³/32³.
_GPU_64 = Net(64, (64, 128, 128, 256), attention_levels=(False, False, False, True), norm_num_groups=32,
              num_head_channels=32)
GPU = BenchConfig(
    name="gpu", device="cuda", precision="bf16-mixed", threads=None, repeats=5,
    pretrain=_GPU_64, pretrain_batch=4, pretrain_steps=5,
    ppo=PPOSize(_GPU_64, samples=8, num_steps=20, timestep_fraction=0.5, micro_batch_size=4),
    memory=_GPU_64.at(128), memory_batch=1, memory_repeats=1,
    scaling_net=_GPU_64, scaling_sizes=(32, 64, 128), scaling_steps=(10, 20, 50), scaling_samples=2,
    scaling_size_steps=10,
    latent=LatentBench(
        replace(_TEMPLATE_AUTOENCODER, spatial_size=128),  # 128³ → 8×32³
        rollout=PPOSize(_GPU_64.at(128), samples=2, num_steps=4, timestep_fraction=0.5, micro_batch_size=2),
        voxel_net=_GPU_64.at(128), rollout_repeats=5,
        iteration=PPOSize(_GPU_64.at(128), samples=8, num_steps=20, timestep_fraction=0.5, micro_batch_size=4)),
    gpu_sizes=((_GPU_64, 4), (_GPU_64.at(128), 1)),
)

TINY = BenchConfig(
    name="tiny", device="cpu", precision="32-true", threads=1, repeats=1,
    pretrain=_TINY_16, pretrain_batch=1, pretrain_steps=1,
    ppo=PPOSize(_TINY_16, samples=2, num_steps=3, timestep_fraction=0.5, micro_batch_size=2),
    memory=_TINY_16, memory_batch=1, memory_repeats=1,
    scaling_net=_TINY_16, scaling_sizes=(16,), scaling_steps=(2,), scaling_samples=1, scaling_size_steps=2,
    # tests/conftest.py's tiny VQ-GAN (16³ → 4×4³) and a two-level latent UNet (a third level would be 1³)
    latent=LatentBench(
        Autoencoder(16, channels=(8, 8), num_res_channels=(8, 8), downsample_levels=2, embedding_dim=4,
                    num_embeddings=32, discriminator_layers=2),
        rollout=PPOSize(_TINY_LATENT, samples=1, num_steps=2, timestep_fraction=0.5, micro_batch_size=1),
        voxel_net=_TINY_16, rollout_repeats=1,
        iteration=PPOSize(_TINY_LATENT, samples=2, num_steps=3, timestep_fraction=0.5, micro_batch_size=2)),
    memory_variants=("blocks", "none"),
)

PRESETS = {"cpu": CPU, "gpu": GPU, "tiny": TINY}
