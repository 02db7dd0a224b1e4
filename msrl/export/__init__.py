"""`msrl export`: a generator or ControlNet checkpoint → a MONAI bundle (configs, plain weights, sampler, card)."""

from msrl.export.bundle import LORA_KEY, export_bundle, read_generator
from msrl.export.configs import Sampler, first_stage_network, inference_config, mask_inference_config, unet_arguments
from msrl.export.controlnet import controlnet_contents
from msrl.export.provenance import provenance
from msrl.export.writer import BundleContents, write_bundle

__all__ = ["LORA_KEY", "BundleContents", "Sampler", "controlnet_contents", "export_bundle", "first_stage_network",
           "inference_config", "mask_inference_config", "provenance", "read_generator", "unet_arguments",
           "write_bundle"]
