"""`msrl export`: a generator or ControlNet checkpoint → a MONAI bundle (configs, plain weights, sampler, card)."""

from msrl.export.bundle import export_bundle
from msrl.export.configs import Sampler, first_stage_network, inference_config, mask_inference_config, unet_arguments
from msrl.export.controlnet import controlnet_contents
from msrl.export.generator import LORA_KEY, generator_contents, read_generator
from msrl.export.mask_finetuned import mask_finetuned_contents
from msrl.export.provenance import provenance
from msrl.export.writer import BundleContents, write_bundle

__all__ = ["LORA_KEY", "BundleContents", "Sampler", "controlnet_contents", "export_bundle", "first_stage_network",
           "generator_contents", "inference_config", "mask_finetuned_contents", "mask_inference_config", "provenance",
           "read_generator", "unet_arguments", "write_bundle"]
