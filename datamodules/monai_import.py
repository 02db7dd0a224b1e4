"""Import MONAI without the `transformers` BERT import that msrl never uses (about a second in every process).

`import monai` loads every module of `monai.networks.nets`, and `transchex` among them imports
`transformers`' BERT model whenever that package is installed. It is installed here: PEFT, which
msrl's LoRA adapters use (`--model.lora_rank`), requires it. The cost is paid in every process that
imports MONAI: each `msrl` call, each DDP worker, each subprocess of the test suite
(docs/studies.md#monai-import). torchmetrics imports `transformers` itself; that stays.
msrl uses no MONAI network that needs `transformers`, so the first import of MONAI in an msrl
process hides `transformers` and then shows it again: PEFT and any user code import `transformers`
normally afterwards; only MONAI's `Transchex` (a vision-language network) stays unavailable in that
process, with MONAI's own
"optional import failed" error if called. A process that imported `transformers` or MONAI before
msrl keeps what it has (nothing is hidden then).

Every msrl package imports `datamodules` first (the lowest layer), so this runs before any MONAI
import of msrl's; `tests/datamodules/test_monai_import.py` checks that BERT is not imported and
PEFT still works.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["HIDDEN", "import_monai"]

HIDDEN = "transformers"  # the package hidden while MONAI imports (only MONAI's Transchex needs it)


def import_monai() -> None:
    """Import MONAI once, with `transformers` hidden from it; a no-op when either is already imported."""
    if "monai" in sys.modules or HIDDEN in sys.modules:
        return
    sys.modules[HIDDEN] = None  # type: ignore[assignment]  # `import transformers` now raises ImportError
    try:
        importlib.import_module("monai")
    finally:
        if sys.modules.get(HIDDEN, "") is None:
            del sys.modules[HIDDEN]
