"""The model card's settings come from the module that was trained, not from a hand-kept list of names."""

from __future__ import annotations

import inspect

from lightning_modules import ControlNetModule, DiffusionModule
from msrl.export.controlnet import CONTROLNET_STATED_ELSEWHERE
from msrl.export.provenance import PRETRAIN_STATED_ELSEWHERE, module_settings
from tests.conftest import TINY_MODEL


class ExtendedDiffusion(DiffusionModule):
    """A DiffusionModule with a setting added after the card was written."""

    def __init__(self, new_setting: float = 0.25, **kwargs: object) -> None:
        super().__init__(**kwargs)


def _tiny(cls: type[DiffusionModule] = DiffusionModule, **kwargs: object) -> DiffusionModule:
    return cls(in_channels=1, spatial_size=16, num_classes=2, **TINY_MODEL, **kwargs)


def test_the_pretraining_settings_are_every_argument_of_the_module() -> None:
    settings = module_settings(_tiny(lesion_loss_weight=2.0), PRETRAIN_STATED_ELSEWHERE)
    assert set(settings) == set(inspect.signature(DiffusionModule).parameters) - PRETRAIN_STATED_ELSEWHERE
    assert settings["lesion_loss_weight"] == 2.0  # a hand-kept list of names had left this one out
    assert settings["channels"] == list(TINY_MODEL["channels"])  # JSON-ready: tuples become lists


def test_a_new_argument_reaches_the_card_unlisted() -> None:
    settings = module_settings(_tiny(ExtendedDiffusion, new_setting=0.5), PRETRAIN_STATED_ELSEWHERE)
    assert settings["new_setting"] == 0.5


def test_what_the_card_states_elsewhere_names_real_arguments() -> None:
    """The exclusions are arguments of the class today (a misspelt or stale one would exclude nothing)."""
    assert PRETRAIN_STATED_ELSEWHERE <= set(inspect.signature(DiffusionModule).parameters)
    assert CONTROLNET_STATED_ELSEWHERE <= set(inspect.signature(ControlNetModule).parameters)
