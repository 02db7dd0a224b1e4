"""One module per `msrl` verb, each with `main(argv)`; msrl/cli.py lists them in one table.

Training verbs (msrl/commands/training.py) are LightningCLI runs; every other verb builds its
options with `command_parser` (msrl/commands/parsing.py), so `-c FILE` is a YAML of the verb's own
options everywhere.
"""

from msrl.commands.parsing import command_parser

__all__ = ["command_parser"]
