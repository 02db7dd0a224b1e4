"""`msrl train-extractor` through the CLI, and `InDomainExtractor` reading what it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msrl.cli import main
from msrl.evaluation import InDomainExtractor
from tests.conftest import REPO, cli_data_args

CONFIG = str(REPO / "configs/extractor/template.yaml")
TINY = ["--model.init_args.channels", "[8,8]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _fit(cache: Path, runs: Path) -> Path:
    """A 2-step fit on the 16³ session cohort; returns its last.ckpt."""
    main(["train-extractor", "-c", CONFIG, *cli_data_args(cache), *TINY, "--trainer.logger.init_args.save_dir",
          str(runs)])
    return runs / "extractor" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoint(cohort_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a 2-step run."""
    return _fit(cohort_cache, tmp_path_factory.mktemp("runs"))


def test_print_config_shows_the_module_and_its_checkpoint_metric(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train-extractor", "-c", CONFIG, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_modules.extractor.SelfSupervisedEncoderModule" in printed
    assert "TemplateCohortDataModule" in printed and "spatial_size: 64" in printed
    assert "monitor: val/loss" in printed and "mode: min" in printed  # the best checkpoint: lowest held-out NT-Xent


def test_fit_writes_a_checkpoint_the_extractor_reads(checkpoint: Path) -> None:
    path = checkpoint
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["spatial_size"] == 16
    assert (path.parent / "last.ckpt").is_file() and len(list(path.parent.glob("best-*.ckpt"))) == 1
    extractor = InDomainExtractor(str(path))
    assert extractor.name.startswith("indomain-ssl-") and len(extractor.name) == len("indomain-ssl-") + 8
    volumes = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    features = extractor.extract(volumes)["3d"]
    assert features.shape == (3, 8) and features.dtype == torch.float64
    assert torch.equal(features, extractor.extract(volumes)["3d"])  # deterministic
    reloaded = InDomainExtractor(str(path)).extract(volumes, batch_size=2)["3d"]  # other batches: rounding only
    torch.testing.assert_close(reloaded, features, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features[0], features[1])


@pytest.mark.slow
def test_same_seed_gives_the_same_encoder(checkpoint: Path, cohort_cache: Path, tmp_path: Path) -> None:
    first, second = (torch.load(p, weights_only=True)["state_dict"] for p in (checkpoint, _fit(cohort_cache, tmp_path)))
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_other_checkpoints_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    from lightning_modules.critics.networks import ClassifierModule

    classifier = ClassifierModule(spatial_size=16, channels=(8, 8))
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(),
                "hyper_parameters": {**classifier.hparams, "_class_path": "lightning_modules.ClassifierModule"}}, path)
    with pytest.raises(ValueError, match="not a self-supervised extractor checkpoint.*ClassifierModule.*"
                                         "msrl train-extractor"):
        InDomainExtractor(str(path))
    with pytest.raises(ValueError, match="needs `checkpoint`.*msrl train-extractor"):
        InDomainExtractor(str(tmp_path / "missing.ckpt"))
