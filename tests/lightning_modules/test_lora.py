"""Tests of LoRA PPO: adapters only are trained and saved, the base is the reference, checkpoints load and merge."""

import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_modules.diffusion.lora import (
    AdapterEMA,
    adapters_disabled,
    add_lora,
    is_adapter,
    load_adapters,
)
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.cli import main
from tests.lightning_modules.test_ppo import BrightnessReward, _finetune, _scalars

# few steps (the CPU tests pay for each); 4 samples: 2 per class, or the advantages are all 0
LORA = ["--model.lora_rank", "2", "--model.lora_alpha", "4", "--model.kl_coef", "0.1", "--model.num_steps", "3",
        "--model.samples_per_iteration", "4", "--model.iterations_per_epoch", "1"]


@pytest.fixture(scope="module")
def base(pretrained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own copy of the pretrained checkpoint (its path and hash are recorded)."""
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    shutil.copy(pretrained_checkpoint, path)
    return path


@pytest.fixture(scope="module")
def lora_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 LoRA PPO iterations (2 epochs of 1) through the CLI."""
    return _finetune(base, tmp_path_factory.mktemp("lora"), *LORA, "--trainer.max_epochs", "2")


def _forward(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, 16, 16, 16), generator=generator)
    with torch.no_grad():
        return unet(x, torch.tensor([900, 300]), class_labels=torch.tensor([0, 1]))


def test_only_adapters_train_and_the_base_is_the_reference(base: Path) -> None:
    module = PPOFinetuneModule(str(base), BrightnessReward(), num_steps=3, samples_per_iteration=4,
                               iterations_per_epoch=1, lora_rank=2, kl_coef=0.1, lr=1e-2)
    unet = module.policy.unet
    assert module.reference is None
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    assert {n for n, _ in unet.named_parameters() if "lora_A" in n} and len(trainable) % 2 == 0
    # the EMA holds its own adapters but the very same base tensors
    ema_params = dict(module.policy.ema.module.named_parameters())
    for name, parameter in unet.named_parameters():
        assert (ema_params[name].data_ptr() == parameter.data_ptr()) != is_adapter(name), name
    pretrained = DiffusionModule.from_msrl_checkpoint(base).ema.module
    expected = _forward(pretrained)
    base_before = {n: p.detach().clone() for n, p in unet.named_parameters() if not is_adapter(n)}
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    optimised = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimised} == {id(p) for n, p in unet.named_parameters() if is_adapter(n)}
    for name, parameter in unet.named_parameters():
        if not is_adapter(name):
            assert torch.equal(parameter, base_before[name]), name
    assert trainer.logged_metrics["ppo/kl_to_pretrained"] > 0  # the adapters moved away from the base
    with adapters_disabled(unet) as reference:
        torch.testing.assert_close(_forward(reference), expected, rtol=0, atol=0)
    assert not torch.allclose(_forward(unet), expected)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable  # restored after the reference


def test_checkpoint_holds_adapters_and_names_its_base(lora_run: Path, base: Path) -> None:
    checkpoint = torch.load(lora_run / "checkpoints/last.ckpt", weights_only=True)
    record = checkpoint["msrl_lora"]
    assert (record["rank"], record["alpha"], record["base_checkpoint"]) == (2, 4.0, str(base.resolve()))
    assert record["base_weights"] == "ema" and len(record["base_sha256"]) == 64
    policy = [k for k in checkpoint["state_dict"] if k.startswith(("policy.unet.", "policy.ema.module."))]
    assert policy and all(is_adapter(k) for k in policy)
    assert "iteration" in checkpoint["state_dict"] and "policy.ema.n_averaged" in checkpoint["state_dict"]
    # what resuming does (the whole run: test_resume_continues_the_same_lora_run): base weights put back, strict load
    module = PPOFinetuneModule(str(base), BrightnessReward(), lora_rank=2, lora_alpha=4, kl_coef=0.1)
    saved = dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    restored = module.state_dict()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    with pytest.raises(ValueError, match="resume with the same init_checkpoint and lora_"):
        saved = torch.load(lora_run / "checkpoints/last.ckpt", weights_only=True)
        PPOFinetuneModule(str(base), BrightnessReward(), lora_rank=4).on_load_checkpoint(saved)


@pytest.mark.slow  # sampling and merging: make test-full (the default suite keeps the checkpoint and refusal tests)
def test_lora_checkpoint_samples_and_merges(lora_run: Path, base: Path, tmp_path: Path) -> None:
    lora = lora_run / "checkpoints/last.ckpt"
    main(["sample", "--checkpoint", str(lora), "--num-samples", "2", "--steps", "3", "--out", str(tmp_path / "s")])
    assert len(list((tmp_path / "s").glob("*.nii.gz"))) == 2
    merged_path = tmp_path / "merged.ckpt"
    main(["merge-lora", "--checkpoint", str(lora), "--out", str(merged_path)])
    assert "msrl_lora" not in torch.load(merged_path, weights_only=True)
    from_lora, merged = DiffusionModule.from_msrl_checkpoint(lora), DiffusionModule.from_msrl_checkpoint(merged_path)
    torch.testing.assert_close(merged.generate(2, num_steps=3), from_lora.generate(2, num_steps=3), rtol=0, atol=0)
    # merging is the unmerged adapters' function: base + adapters as trained, within float rounding
    checkpoint = torch.load(lora, weights_only=True)
    for unet, prefix in ((from_lora.unet, "policy.unet."), (from_lora.ema.module, "policy.ema.module.")):
        unmerged = DiffusionModule.from_msrl_checkpoint(base).ema.module
        add_lora(unmerged, 2, 4.0, checkpoint["msrl_lora"]["targets"])
        load_adapters(unmerged, checkpoint["state_dict"], prefix, lora)
        torch.testing.assert_close(_forward(unet), _forward(unmerged), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_forward(from_lora.unet), _forward(DiffusionModule.from_msrl_checkpoint(base).ema.module))


def test_missing_or_changed_base_is_refused(lora_run: Path, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    checkpoint = torch.load(lora_run / "checkpoints/last.ckpt", weights_only=True)
    changed = tmp_path / "changed.ckpt"
    state = torch.load(base, weights_only=True)
    state["state_dict"]["unet.out.2.conv.weight"] += 0.01
    torch.save(state, changed)
    for target, error, match in ((tmp_path / "gone.ckpt", FileNotFoundError, "gone.ckpt does not exist"),
                                 (changed, ValueError, "changed.ckpt is not the one")):
        checkpoint["msrl_lora"]["base_checkpoint"] = str(target)
        torch.save(checkpoint, tmp_path / "lora.ckpt")
        with pytest.raises(error, match=match):
            DiffusionModule.from_msrl_checkpoint(tmp_path / "lora.ckpt")
        with pytest.raises(SystemExit):
            main(["merge-lora", "--checkpoint", str(tmp_path / "lora.ckpt"), "--out", str(tmp_path / "m.ckpt")])
        assert re.search(match, capsys.readouterr().err) and not (tmp_path / "m.ckpt").exists()


@pytest.mark.slow  # 2 more CLI runs; the checkpoint test above checks the reload in-process
def test_resume_continues_the_same_lora_run(lora_run: Path, base: Path, tmp_path: Path) -> None:
    whole = lora_run
    half = _finetune(base, tmp_path / "half", *LORA, "--trainer.max_epochs", "1")
    resumed = _finetune(base, tmp_path / "resumed", *LORA, "--trainer.max_epochs", "2",
                        "--ckpt_path", str(half / "checkpoints/last.ckpt"))
    assert _scalars(half, "ppo/reward/mean") + _scalars(resumed, "ppo/reward/mean") == pytest.approx(
        _scalars(whole, "ppo/reward/mean"), abs=1e-6)
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)
    assert set(a["state_dict"]) == set(b["state_dict"]) and int(b["state_dict"]["iteration"]) == 2
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)
    full = PPOFinetuneModule(str(base), BrightnessReward())
    with pytest.raises(ValueError, match="written with LoRA"):
        full.on_load_checkpoint(a)


@pytest.mark.parametrize("bad, match", [
    (dict(lora_rank=2, lora_targets=["nope"]), "lora_targets \\['nope'\\] do not name"),
    (dict(lora_rank=2, trainable_blocks=["out"]), "not trainable_blocks"), (dict(lora_rank=-1), "lora_rank"),
])
def test_bad_lora_settings_are_explained(base: Path, bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PPOFinetuneModule(str(base), BrightnessReward(), **bad)


def test_adapter_ema_averages_adapters_like_averaged_model() -> None:
    unet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    add_lora(unet, 2, None, ["0", "2"])
    ema = AdapterEMA(unet, decay=0.5)
    values = []
    for step in range(3):
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if is_adapter(name):
                    parameter.fill_(float(step + 1))
        ema.update_parameters(unet)
        values.append(dict(ema.module.named_parameters())["0.lora_B.default.weight"][0, 0].item())
    assert values == [1.0, 1.5, 2.25]  # first copy, then lerp by 1 − decay
