"""Tests of the benchmark machinery (no timing is asserted): a tiny run writes every row, FLOPs are counted right."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import bf16_peak_flops, count_flops, model_flop_utilisation, training_step_flops
from benchmarks.harness import PairResult, compare, update_markdown_block
from benchmarks.memory import GPU_SIZES_GB, largest_batch, lora_arguments
from benchmarks.run import main
from benchmarks.settings import TINY
from tests.conftest import REPO, subprocess_env

KEYS = ("pretrain_step_ratio", "rollout_ratio", "ppo_update_ratio", "reward_share", "ckpt_memory_ratio",
        "latent_rollout_ratio", "backprop_ckpt_memory_ratio")


def _positive_finite(value: object) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`python -m benchmarks --tiny` (16³, one repetition), all sections, in a child process.

    Not in this one: the memory plan's tiny rows run in-process under the profiler (PEFT, Lightning Trainers),
    and the state they leave made tests/lightning_modules/test_first_stage.py's bf16 training non-finite later in
    the same pytest process.
    """
    out = tmp_path_factory.mktemp("bench") / "results.json"
    subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out)], check=True, cwd=REPO,
                   env=subprocess_env())
    return json.loads(out.read_text())


def test_tiny_run_writes_every_row_with_positive_finite_numbers(tiny_results: dict) -> None:
    assert set(KEYS) <= set(tiny_results["ratios"])
    for key in KEYS:
        row = tiny_results["ratios"][key]
        for field in ("value", "ratio_min", "ratio_max", "a_median", "b_median", "goal"):
            assert _positive_finite(row[field]), (key, field, row[field])
        assert all(_positive_finite(v) for v in row["a"] + row["b"]), key
        repeats = TINY.latent.rollout_repeats if key == "latent_rollout_ratio" else TINY.repeats
        assert len(row["a"]) == len(row["b"]) == repeats
    for table in ("ppo_split", "latent_split", "scaling_size", "scaling_steps", "memory", "decode_memory",
                  "ppo_memory"):
        assert tiny_results["tables"][table]["rows"], table
    for side, volume, whole, tiled, ratio in tiny_results["tables"]["decode_memory"]["rows"]:
        assert 0 < tiled < whole and ratio == tiled / whole and volume > 0, side
    full, lora = tiny_results["tables"]["ppo_memory"]["rows"]
    assert full[0] == "full fine-tuning" and all(_positive_finite(v) for v in full[1:]), full
    if lora_arguments(8) is None:
        assert lora[1] == "LoRA not available"
    else:
        assert lora[1] < full[1]  # LoRA trains fewer parameters than full fine-tuning
    split = tiny_results["tables"]["ppo_split"]["rows"][0]
    assert all(_positive_finite(v) for v in split[3:8]), split  # rollout, reward, update, other, iteration
    latent = tiny_results["tables"]["latent_split"]["rows"][0]
    assert all(_positive_finite(v) for v in latent[3:9]), latent  # rollout, decode, scoring, update, other, iteration
    assert latent[1] == TINY.latent.iteration.num_steps
    assert tiny_results["meta"]["device"] == "cpu"


def test_tiny_run_measures_reward_backpropagation_beside_ppo(tiny_results: dict) -> None:
    """The backprop section's two ratios are computed from their rows (no timing asserted)."""
    ratios = tiny_results["ratios"]
    seconds, memory = ratios["backprop_iteration_ratio"], ratios["backprop_ckpt_memory_ratio"]
    assert seconds["goal"] is None and memory["goal"] == 0.60
    for row in (seconds, memory):
        assert all(_positive_finite(v) for v in row["a"] + row["b"]), row
        assert row["value"] == pytest.approx(statistics.median(a / b for a, b in zip(row["a"], row["b"], strict=True)))
    assert len(seconds["a"]) == TINY.repeats and memory["unit"] == "MiB"
    split = tiny_results["tables"]["backprop_split"]["rows"]
    assert [row[0] for row in split] == ["reward backpropagation", "PPO"]
    assert all(_positive_finite(v) for row in split for v in row[1:5] + row[6:]), split  # phases, iteration
    with_, without = tiny_results["tables"]["backprop_memory"]["rows"]
    assert (with_[0], without[0]) == ("on", "off") and without[3] == 1.0
    assert with_[1] == memory["a"][0] and with_[3] == pytest.approx(memory["value"])


def test_the_cpu_path_never_initialises_cuda(tiny_results: dict) -> None:
    assert not torch.cuda.is_initialized()


def test_compare_alternates_and_pairs_measurements() -> None:
    calls: list[str] = []
    result = compare("x_ratio", lambda: calls.append("a") or 2.0, lambda: calls.append("b") or 4.0, goal=1.0,
                     repeats=3, a_label="a", b_label="b")
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert result.ratios == [0.5, 0.5, 0.5] and result.holds
    with pytest.raises(ValueError, match="same, non-zero number"):
        PairResult("y", [1.0], [], None, "a", "b")


def test_conv_flops_match_the_formula() -> None:
    conv = torch.nn.Conv3d(4, 6, kernel_size=3, padding=1)
    x = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
    forward = 2 * 2 * 6 * 4 * 27 * 8**3  # 2 · N · C_out · C_in · k³ · output voxels
    assert count_flops(lambda: conv(x)) == forward
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward  # + grad of input and of weight


def test_training_step_flops_count_forward_and_backward() -> None:
    from benchmarks.pretraining import diffusion_module

    module = diffusion_module(TINY.pretrain)
    images, labels = torch.rand(1, 1, 16, 16, 16), torch.tensor([1])
    with torch.no_grad():
        forward = count_flops(lambda: module.diffusion_loss(images, labels))
    step = training_step_flops(TINY.pretrain, 1, TINY)
    assert 2.5 * forward < step <= 3 * forward  # conv_in's input needs no gradient


def test_bf16_peaks_and_utilisation() -> None:
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak_flops("NVIDIA L40S") == 362e12
    assert bf16_peak_flops("cpu") is None
    assert model_flop_utilisation(1e12, 2.0, 1e12) == 0.5
    assert model_flop_utilisation(1e12, 2.0, None) is None


def test_markdown_block_is_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nprose before\n")
    update_markdown_block(path, "cpu", "first")
    update_markdown_block(path, "cpu", "second")
    text = path.read_text()
    assert "prose before" in text and "second" in text and "first" not in text
    assert text.count("<!-- bench:cpu:start -->") == 1


def test_largest_batch_from_two_peaks() -> None:
    # weights 1000 MiB, peak 5000 MiB with two samples, 7000 with three: 2000 MiB per sample, 2000 fixed
    assert largest_batch(24, 1000.0, 5000.0, 7000.0) == int((24e9 / 2**20 - 2000.0) // 2000.0)
    assert largest_batch(24, 1e9, 1.0, 2.0) == 0  # does not fit at all
    assert GPU_SIZES_GB == (24, 40, 80)


@pytest.mark.slow
def test_gpu_dry_run_fills_every_gpu_row_on_the_cpu(tmp_path: Path) -> None:
    """`python -m benchmarks --gpu-dry-run`: the GPU run's tables at 16³ on the CPU, no CUDA touched."""
    out = tmp_path / "results_gpu.json"
    assert main(["--gpu-dry-run", "--out", str(out)]) == 0
    tables = json.loads(out.read_text())["tables"]
    layouts = tables["gpu_pretraining"]["rows"]
    assert [(row[2], row[3]) for row in layouts] == [(False, False), (True, False), (False, True), (True, True)]
    assert all(_positive_finite(row[4]) and _positive_finite(row[5]) for row in layouts)
    ppo = tables["gpu_latent_ppo"]["rows"]
    assert [(row[0].split()[0], row[1].split()[0]) for row in ppo] == [
        ("full", "whole"), ("full", "tiled"), ("LoRA", "whole"), ("LoRA", "tiled")]
    for row in ppo:
        if row[4] == "LoRA not available":
            assert lora_arguments(8) is None
        else:
            assert all(_positive_finite(v) for v in row[4:8]), row
    assert not torch.cuda.is_initialized()
