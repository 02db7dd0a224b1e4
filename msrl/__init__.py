"""msrl: 3D brain-MRI diffusion models pretrained with Lightning and fine-tuned with PPO against multi-scale rewards.

The design card's packages hold the data (`datamodules`), the models (`lightning_modules`) and the
rewards (`rewards`); this package holds what msrl adds beyond them: the `msrl` console script
(`msrl.cli`), one module per verb (`msrl.commands`) and the evaluation (`msrl.evaluation`).
Imports run one way, datamodules → lightning_modules → rewards → msrl (docs/design.md).
"""

from importlib import metadata

__version__ = metadata.version("msrl")  # the installed release (pyproject.toml, CHANGELOG.md)
