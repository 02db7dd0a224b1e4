"""Generated volumes on disk: drawn from a model (`msrl sample`), or from lesion masks by a ControlNet.

`folder`: the sample folder `msrl sample` writes and `msrl evaluate`/`report` read back. `mask_files`:
NIfTI masks checked against a model and volumes written beside them (also an exported ControlNet bundle's
`scripts/masks.py`). `from_masks`: drawing from masks with a ControlNet checkpoint, and a data set's masks.
"""

from msrl.samples.folder import draw_volumes, load_checkpoint, read_samples, write_samples
from msrl.samples.from_masks import (
    MaskDraw,
    MaskFinetuned,
    SplitMask,
    check_label,
    check_split_masks,
    controlnet_record,
    draw_batches,
    generator_kind,
    load_controlnet,
    load_mask_generator,
    mask_rules,
    plan_draws,
    recorded_controlnet,
    split_masks,
    write_beside,
    write_split_masks,
)
from msrl.samples.mask_files import Mask, MaskRules, auto_label, mask_paths, sample_path

__all__ = ["Mask", "MaskDraw", "MaskFinetuned", "MaskRules", "SplitMask", "auto_label", "check_label",
           "check_split_masks", "controlnet_record", "draw_batches", "draw_volumes", "generator_kind",
           "load_checkpoint", "load_controlnet", "load_mask_generator", "mask_paths", "mask_rules", "plan_draws",
           "recorded_controlnet", "read_samples", "sample_path", "split_masks", "write_beside", "write_samples",
           "write_split_masks"]
