"""RiceVisionConfig: the RICE-ViT architecture, in transformers' MLCD schema.

The released RICE checkpoints ship an MLCD `config.json` (`model_type: mlcd_vision_model`). Subclassing
`MLCDVisionConfig` keeps one schema, so a kit directory loads in transformers and a released one loads here
with no field renaming.
"""

from transformers import MLCDVisionConfig


class RiceVisionConfig(MLCDVisionConfig):
    """Configuration of a RICE-ViT encoder (fields and defaults of `transformers.MLCDVisionConfig`).

    The fields the encoder reads: `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    `num_attention_heads`, `num_channels`, `image_size` (the pretraining/tile size; inputs may be any size
    divisible by `patch_size`), `patch_size`, `hidden_act`, `layer_norm_eps`, `rope_parameters["rope_theta"]`,
    `initializer_range`. Named presets live in `rice_mllm/presets/rice-vit-*.json`.
    """
