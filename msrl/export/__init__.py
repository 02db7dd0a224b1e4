"""`msrl export`: a generator checkpoint → a MONAI bundle (configs, plain weights, sampler script, model card)."""

from msrl.export.bundle import LORA_KEY, export_bundle, read_generator
from msrl.export.configs import Sampler, first_stage_network, inference_config, unet_arguments
from msrl.export.provenance import provenance

__all__ = ["LORA_KEY", "Sampler", "export_bundle", "first_stage_network", "inference_config", "provenance",
           "read_generator", "unet_arguments"]
