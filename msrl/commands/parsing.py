"""The one way a verb that is not a LightningCLI run reads its options: a jsonargparse parser with `-c`."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser


def command_parser(prog: str, description: str) -> ArgumentParser:
    """A parser for `prog` whose `-c/--config FILE` reads any of its options from YAML (repeatable).

    Options given after `-c` override the file, as in the training verbs' LightningCLI.
    """
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file of any of these options")
    return parser
