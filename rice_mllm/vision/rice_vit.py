"""RICE-ViT: a pre-LN ViT with 2D rotary position embeddings (Xie et al., "Region-based Cluster Discrimination", 2025).

Invariant: parameter names and maths match the released `DeepGlint-AI/rice-vit-*` checkpoints, which transformers
loads as `MLCDVisionModel`; a state dict moves between the two with no renaming (keys under `vision_model.`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..checkpoint_layout import resolve_checkpoint_dir
from ..loading import verify_checkpoint_dir
from .configuration import RiceVisionConfig

logger = logging.getLogger(__name__)

try:  # optional GPU extra; SDPA is the default everywhere else
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def axial_rope_angles(
    num_rows: int,
    num_cols: int,
    head_dim: int,
    theta: float,
    class_angles: torch.Tensor,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Rotation angles of every token for 2D RoPE, CLS first.

    Half of each head's rotated pairs encode the patch row, the other half the column, each with
    head_dim/4 frequencies. The CLS token has no grid position: its angles are the learned `class_pos_emb`.

    Args:
        num_rows, num_cols: patch grid (H/patch, W/patch), rows first as transformers orders them.
        head_dim: per-head width.
        theta: RoPE base.
        class_angles: [1, head_dim/2] learned CLS angles.
        origin: (row, column) position of the top-left patch: (0, 0) as released; stage 0's RoPE jitter moves it.

    Returns:
        [1 + rows*cols, head_dim/2] angles in fp32.
    """
    device = class_angles.device
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(quarter, device=device, dtype=torch.float32) * 4 / head_dim)
    rows = torch.arange(num_rows, device=device, dtype=torch.float32) + origin[0]
    cols = torch.arange(num_cols, device=device, dtype=torch.float32) + origin[1]
    row_angles, col_angles = rows[:, None] * inv_freq, cols[:, None] * inv_freq  # [H, q], [W, q]
    grid = torch.cat(
        [row_angles[:, None, :].expand(-1, num_cols, -1), col_angles[None, :, :].expand(num_rows, -1, -1)], dim=-1
    ).reshape(num_rows * num_cols, 2 * quarter)  # [H*W, head_dim/2]
    return torch.cat([class_angles.float(), grid], dim=0)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head, in fp32. x: [B, T, heads, head_dim]; angles: [T, head_dim/2]."""
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]  # [1, T, 1, head_dim]
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * angles.cos() + rotated * angles.sin()).to(x.dtype)


class RiceVisionEmbeddings(nn.Module):
    """Patchify (Conv2d without bias, as released) and prepend the learned CLS token. No absolute positions."""

    def __init__(self, config: RiceVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + H*W/p^2, D]."""
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {self.patch_size}")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(weight.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1)


class RiceAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE on queries and keys; SDPA, or flash-attn on CUDA half precision."""

    def __init__(self, config: RiceVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        query = apply_rotary(self.q_proj(hidden_states).view(shape), angles)
        key = apply_rotary(self.k_proj(hidden_states).view(shape), angles)
        value = self.v_proj(hidden_states).view(shape)
        if flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
            context = flash_attn_func(query, key, value)  # takes and returns [B, T, heads, head_dim]
        else:
            context = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            ).transpose(1, 2)
        return self.out_proj(context.reshape(batch, tokens, width))


class RiceMLP(nn.Module):
    def __init__(self, config: RiceVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class RiceEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: RiceVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = RiceAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = RiceMLP(config)

    def forward(self, hidden_states: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), angles)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class RiceEncoder(nn.Module):
    def __init__(self, config: RiceVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(RiceEncoderLayer(config) for _ in range(config.num_hidden_layers))


class RiceVisionTransformer(nn.Module):
    """The encoder body, named as in the release: `pre_layrnorm` (sic, the checkpoint's spelling) normalises
    [CLS; patches] before block 0; `post_layernorm` normalises the pooled CLS only."""

    def __init__(self, config: RiceVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = RiceVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = RiceEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.class_pos_emb = nn.Parameter(torch.zeros(1, head_dim // 2))


@dataclass
class RiceVisionOutput(ModelOutput):
    """`last_hidden_state` [B, 1+N, D] is the raw last-block output (no final norm); `pooler_output` [B, D] is
    post_layernorm(CLS); `hidden_states` holds L+1 tensors: the input of block 0, then every block's output."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RiceVisionModel(PreTrainedModel):
    """The RICE-ViT encoder. Any input size divisible by the patch size; all hidden states on request.

    Example:
        >>> model = RiceVisionModel.from_pretrained("DeepGlint-AI/rice-vit-large-patch14-560")
        >>> features = model(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # LLaVA's choice
    """

    config_class = RiceVisionConfig
    config: RiceVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RiceEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: RiceVisionConfig):
        super().__init__(config)
        self.vision_model = RiceVisionTransformer(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs) -> RiceVisionModel:
        """Load a local directory or hub id in the released MLCD layout (keys with or without `vision_model.`).

        Raises:
            FileNotFoundError: no such directory, or no safetensors weights in it.
            CheckpointMismatchError: missing, unexpected or wrongly shaped keys, all named.
        """
        checkpoint_dir = resolve_checkpoint_dir(name_or_path)
        config = kwargs.get("config") or cls.config_class.from_pretrained(checkpoint_dir)
        verify_checkpoint_dir(cls, config, checkpoint_dir, prefix=cls.base_model_prefix + ".")
        return super().from_pretrained(checkpoint_dir, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal linear/conv weights (ViT practice); CLS vectors scaled to unit-ish norm."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RiceVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.class_embedding.shape[0] ** -0.5)
        elif isinstance(module, RiceVisionTransformer):
            init.normal_(module.class_pos_emb, std=module.class_pos_emb.shape[-1] ** -0.5)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        num_layers: int | None = None,
        **unused_kwargs,
    ) -> RiceVisionOutput:
        """Encode images.

        Args:
            pixel_values: [B, 3, H, W], H and W divisible by `patch_size`, CLIP-normalised.
            output_hidden_states: also return the input of block 0 and every block's output.
            num_layers: run only the first `num_layers` blocks (LLaVA reads layer -2: the last block is wasted work).

        Returns:
            RiceVisionOutput with `last_hidden_state` [B, 1 + H*W/p^2, D] and `pooler_output` [B, D].
        """
        body = self.vision_model
        patch = self.config.patch_size
        hidden_states = body.pre_layrnorm(body.embeddings(pixel_values))  # [B, 1+N, D]
        angles = axial_rope_angles(
            pixel_values.shape[-2] // patch,
            pixel_values.shape[-1] // patch,
            self.config.hidden_size // self.config.num_attention_heads,
            float(self.config.rope_parameters["rope_theta"]),
            body.class_pos_emb,
        )
        all_states = [hidden_states] if output_hidden_states else None
        for layer in body.encoder.layers[:num_layers]:
            hidden_states = layer(hidden_states, angles)
            if all_states is not None:
                all_states.append(hidden_states)
        return RiceVisionOutput(
            last_hidden_state=hidden_states,
            pooler_output=body.post_layernorm(hidden_states[:, 0]),
            hidden_states=tuple(all_states) if all_states is not None else None,
        )
