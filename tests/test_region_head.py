"""Region transformer: hand-computed token visibility, a per-region float64 reference on transformers' MLCD, one
encoder pass for all regions, empty regions."""

import math

import torch
import torch.nn.functional as F
from transformers import MLCDVisionConfig, MLCDVisionModel

from rice_mllm.presets import load_preset
from rice_mllm.pretrain.region_head import (
    RegionTransformer,
    box_patch_masks,
    encode_for_regions,
    mean_region_features,
    region_attention,
)
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel


def test_masks_hand_computed():
    # 3x4 grid of 10 px patches: patch centres at x in {5, 15, 25, 35}, y in {5, 15, 25}.
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 40.0, 30.0],  # covers the image
                [10.0, 0.0, 20.0, 20.0],  # x in [10, 20] -> col 1; y in [0, 20] -> rows 0, 1
                [5.0, 5.0, 5.0, 5.0],  # degenerate box on a centre: closed box contains (5, 5)
                [21.0, 21.0, 24.0, 24.0],  # smaller than a patch, no centre inside: the patch of its centre (2, 2)
                [14.0, 4.0, 36.0, 6.0],  # y contains 5 only -> row 0; x contains 15, 25, 35
                [100.0, 100.0, 120.0, 120.0],  # outside the grid: clamped centre patch (2, 3)
                [30.0, 20.0, 50.0, 40.0],  # across the bottom-right border: only centre (35, 25) inside
                [-8.0, -8.0, 4.0, 4.0],  # across the top-left border, no centre inside: clamped to (0, 0)
            ]
        ]
    )
    expected = torch.zeros(8, 3, 4, dtype=torch.bool)
    expected[0] = True
    expected[1, 0:2, 1] = True
    expected[2, 0, 0] = True
    expected[3, 2, 2] = True
    expected[4, 0, 1:4] = True
    expected[5, 2, 3] = True
    expected[6, 2, 3] = True
    expected[7, 0, 0] = True
    assert torch.equal(box_patch_masks(boxes, (3, 4), 10)[0], expected.flatten(1))


def test_mean_region_features_with_and_without_cls():
    patches = torch.arange(24, dtype=torch.float64).view(1, 6, 4)  # 2x3 grid, D = 4
    masks = torch.tensor([[[True, False, True, False, False, False], [False] * 6]])
    expected = torch.stack([(patches[0, 0] + patches[0, 2]) / 2, torch.zeros(4, dtype=torch.float64)])
    torch.testing.assert_close(mean_region_features(patches, masks)[0], expected)
    with_cls = torch.cat([torch.full((1, 1, 4), 99.0, dtype=torch.float64), patches], dim=1)
    torch.testing.assert_close(mean_region_features(with_cls, masks)[0], expected)


def _reference_region_features(
    mlcd: MLCDVisionModel, pixels: torch.Tensor, masks: torch.Tensor, origin: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Written from DESIGN.md section 4 on transformers' MLCD, one image, head and region at a time: post_layernorm
    on every token; CLS as the query; MLCD's own rotary cos/sin on the patch keys and values, at patch positions
    counted from `origin`; softmax over the region's patches; heads concatenated."""
    config = mlcd.config
    heads, width = config.num_attention_heads, config.hidden_size
    head_dim = width // heads
    rows, cols = pixels.shape[-2] // config.patch_size, pixels.shape[-1] // config.patch_size
    positions = torch.tensor([[origin[0] + r, origin[1] + c] for r in range(rows) for c in range(cols)])
    cos, sin = mlcd.vision_rotary_embedding(pixels, positions)  # [HW, head_dim] each
    norm = mlcd.post_layernorm
    out = torch.zeros(pixels.shape[0], masks.shape[1], width, dtype=torch.float64)
    for b in range(pixels.shape[0]):
        hidden = mlcd(pixels[b : b + 1]).last_hidden_state[0]  # [1+HW, D]
        tokens = F.layer_norm(hidden, (width,), norm.weight, norm.bias, norm.eps)
        for h in range(heads):
            part = slice(h * head_dim, (h + 1) * head_dim)
            keys = tokens[1:, part]
            half = head_dim // 2
            rotated = keys * cos + torch.cat([-keys[:, half:], keys[:, :half]], dim=1) * sin  # [HW, d]
            for r in range(masks.shape[1]):
                seen = masks[b, r].nonzero().flatten()
                weights = torch.softmax(rotated[seen] @ tokens[0, part] / math.sqrt(head_dim), dim=0)
                out[b, r, part] = weights @ rotated[seen]
    return out


def test_region_transformer_equals_a_per_region_loop_on_a_non_square_grid():
    config = RiceVisionConfig(**load_preset("rice-vit-tiny"))  # patch 14, D 32, 4 heads
    torch.manual_seed(0)
    encoder = RiceVisionModel(config).double().eval()
    with torch.no_grad():  # post_layernorm starts as the identity: make it count
        encoder.vision_model.post_layernorm.weight.normal_(1.0, 0.3)
        encoder.vision_model.post_layernorm.bias.normal_(0.0, 0.3)
    mlcd = MLCDVisionModel(MLCDVisionConfig(**config.to_dict())).double().eval()
    mlcd.load_state_dict({k.removeprefix("vision_model."): v for k, v in encoder.state_dict().items()})
    pixels = torch.randn(2, 3, 42, 70, dtype=torch.float64)  # 3x5 patches
    boxes = torch.tensor([[[0, 0, 70, 42], [14, 0, 42, 28], [60, 30, 62, 33]]] * 2, dtype=torch.float64)
    masks = box_patch_masks(boxes, (3, 5), 14)
    for origin in [(0, 0), (2, 5)]:  # (2, 5): the region head's RoPE moved, as stage 0's jitter does
        with torch.no_grad():
            tokens, angles = encode_for_regions(encoder, pixels, origin)
            got = region_attention(tokens, masks, angles, config.num_attention_heads)
            expected = _reference_region_features(mlcd, pixels, masks, origin)
        # Both sides rotate in fp32, as the released encoder does: agreement to fp32 precision, not fp64.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    tokens, angles = encode_for_regions(encoder, pixels)
    assert not torch.allclose(got, region_attention(tokens, masks, angles, config.num_attention_heads))


def test_one_encoder_pass_serves_every_region_and_a_region_sees_only_its_tokens():
    encoder = RiceVisionModel(RiceVisionConfig(**load_preset("rice-vit-tiny"))).eval()  # 56 px: 4x4 patches
    head = RegionTransformer(32, 4, 8)
    pixels = torch.randn(2, 3, 56, 56)
    boxes = torch.tensor([[[0, 0, 28, 28], [14, 14, 56, 56], [30, 2, 40, 50]]] * 2, dtype=torch.float32)
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    tokens, angles = encode_for_regions(encoder, pixels)  # [2, 17, 32]
    masks = box_patch_masks(boxes, (4, 4), 14)
    emb = head(tokens, masks, angles)
    assert emb.shape == (2, 3, 8) and len(calls) == 1
    for r in range(3):  # the same embedding as each region alone
        torch.testing.assert_close(head(tokens, masks[:, r : r + 1], angles)[:, 0], emb[:, r])
    moved = tokens.clone()
    moved[0, 1:][~masks[0, 0]] += 5.0  # tokens outside region 0 change: its embedding does not
    torch.testing.assert_close(head(moved, masks, angles)[0, 0], emb[0, 0])


def test_an_empty_region_gives_zeros_and_finite_gradients():
    tokens = torch.randn(1, 1 + 6, 8, requires_grad=True)
    masks = torch.tensor([[[True, True, False, False, False, False], [False] * 6]])
    out = region_attention(tokens, masks, torch.zeros(6, 2), num_heads=2)  # head_dim 4: 2 angles
    assert torch.equal(out[0, 1], torch.zeros(8)) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(tokens.grad).all()
