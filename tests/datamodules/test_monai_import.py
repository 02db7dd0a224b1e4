"""MONAI is imported without `transformers`' BERT model, and PEFT (which needs `transformers`) still works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

CHILD = """
import json, sys
import lightning_modules  # imports datamodules first, which imports MONAI
bert = "transformers.models.bert.modeling_bert"
seen = {"monai": "monai" in sys.modules, "bert_after_msrl": bert in sys.modules,
        "hidden_left": "transformers" in sys.modules and sys.modules["transformers"] is None}
from monai.networks.nets import DiffusionModelUNet  # what msrl uses imports as usual
from lightning_modules.diffusion.lora import add_lora
unet = DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8, 8),
                          attention_levels=(False, False, False), norm_num_groups=8, num_res_blocks=1)
seen["peft"] = add_lora(unet, 2, None, ["conv1.conv"]) > 0  # PEFT imports transformers: it must be importable
seen["transformers"] = sys.modules["transformers"] is not None
print(json.dumps(seen))
"""


@pytest.mark.timeout(300)
def test_monai_skips_bert_and_peft_still_imports() -> None:
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"monai": True, "bert_after_msrl": False, "hidden_left": False, "peft": True,
                    "transformers": True}


def test_nothing_is_hidden_when_monai_was_imported_first() -> None:
    from datamodules.monai_import import HIDDEN, import_monai

    assert "monai" in sys.modules  # this process imported it (through datamodules or a test)
    import_monai()  # a no-op now
    assert sys.modules.get(HIDDEN, "absent") is not None
