"""The one module that uses Lightning's private API, each use with the reason no public one serves.

Pinned by pyproject.toml to lightning>=2.4,<2.7; a Lightning upgrade checks this file first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.cli import LightningCLI, _get_module_type, _InstantiatorFn
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters


@contextmanager
def own_hyperparameters() -> Iterator[None]:
    """Build modules that record their own arguments, even while LightningCLI is building another one.

    LightningCLI hands its config to every `save_hyperparameters()` called while it instantiates a
    module (through the `_given_hyperparameters` context variable); a module built inside another
    (PPO's policy, a latent model's autoencoder) would otherwise record the CLI's arguments.
    """
    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


def add_model_instantiator_only(cli: LightningCLI, model_class: type, subclasses: bool) -> None:
    """Register LightningCLI's hyper-parameter instantiator for the model alone, none for `data`.

    LightningCLI registers one for `data` even without a data module class, and it then intercepts
    every LightningDataModule built in the config (the held-out data of `HeldoutFIDGuard` in PPO)
    and fails on the missing `data` section; there is no public switch for it.
    """
    instantiator: Any = _InstantiatorFn(cli=cli, key="model")
    cli.parser.add_instantiator(instantiator, _get_module_type(model_class), subclasses=subclasses)


def cli_model_arguments() -> dict[str, Any] | None:
    """The model's arguments as LightningCLI's config dump gives them, while it builds the model (else None).

    LightningCLI passes its config (plain YAML data: a subclass argument as {class_path, init_args})
    to the model it instantiates only through the `_given_hyperparameters` context variable, which
    `save_hyperparameters` reads; PPO reads it to record the reward's config in its checkpoints. A
    module built in plain Python, or inside `own_hyperparameters`, gets None.
    """
    given = _given_hyperparameters.get()
    if given is None:
        return None
    return {key: value for key, value in given.items() if not key.startswith("_")}
