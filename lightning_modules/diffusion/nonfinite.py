"""The non-finite-loss guard of the diffusion training steps (pretraining, ControlNet): skip, count, stop."""

from __future__ import annotations

import lightning as L
import torch


def skip_nonfinite_loss(module: L.LightningModule, loss: torch.Tensor) -> bool:
    """Whether this step must be skipped because its loss is non-finite on some rank.

    A skipped step returns None on every rank (so DDP's collectives stay matched), adds one to the
    module's `skipped_steps` buffer (saved: it survives resume, logged as train/skipped_steps), and
    after `hparams.max_nonfinite_steps` in a row raises FloatingPointError naming the likely causes.
    The module holds `skipped_steps` (a long buffer) and `_skips_in_a_row` (an int).
    """
    bad = module.trainer.strategy.reduce(torch.tensor(float(not torch.isfinite(loss)), device=module.device),
                                         reduce_op="sum")
    if bad == 0:
        module._skips_in_a_row = 0
        return False
    module.skipped_steps += 1
    module._skips_in_a_row += 1
    module.log("train/skipped_steps", module.skipped_steps.float(), on_step=True, batch_size=1)
    if module._skips_in_a_row >= module.hparams.max_nonfinite_steps:
        raise FloatingPointError(
            f"train/loss was non-finite in {module._skips_in_a_row} steps in a row (the last at step "
            f"{module.global_step}); likely causes: a learning rate too high (lr={module.hparams.lr}), fp16 "
            "overflow (use bf16-mixed or 32-true), or non-finite input volumes (run msrl data check)")
    return True
