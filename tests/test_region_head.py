"""Region head: hand-computed patch masks, pooling vs a per-region loop, one encoder pass for all regions."""

import math

import torch

from rice_mllm.presets import load_preset
from rice_mllm.pretrain.region_head import RegionHead, box_patch_masks, masked_attention_pool, region_features
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel


def test_masks_hand_computed():
    # 3x4 grid of 10 px patches: patch centres at x in {5, 15, 25, 35}, y in {5, 15, 25}.
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 40.0, 30.0],  # whole image
                [10.0, 0.0, 20.0, 20.0],  # x in [10, 20] -> col 1; y in [0, 20] -> rows 0, 1
                [5.0, 5.0, 5.0, 5.0],  # degenerate box on a centre: closed box contains (5, 5)
                [21.0, 21.0, 24.0, 24.0],  # no centre inside: falls back to patch of its centre (22.5) -> (2, 2)
                [14.0, 4.0, 36.0, 6.0],  # y contains 5 only -> row 0; x contains 15, 25, 35
                [100.0, 100.0, 120.0, 120.0],  # outside the grid: clamped centre patch (2, 3)
            ]
        ]
    )
    expected = torch.zeros(6, 3, 4, dtype=torch.bool)
    expected[0] = True
    expected[1, 0:2, 1] = True
    expected[2, 0, 0] = True
    expected[3, 2, 2] = True
    expected[4, 0, 1:4] = True
    expected[5, 2, 3] = True
    assert torch.equal(box_patch_masks(boxes, (3, 4), 10)[0], expected.flatten(1))


def test_pooling_equals_per_region_loop():
    b, n, hw, d = 2, 5, 12, 16
    hidden = torch.randn(b, 1 + hw, d, dtype=torch.float64)
    masks = torch.rand(b, n, hw) < 0.4
    masks[..., 0] = True
    out = masked_attention_pool(hidden, masks)
    for i in range(b):
        q = hidden[i, 0]
        for r in range(n):
            idx = masks[i, r].nonzero().flatten()
            tokens = hidden[i, 1 + idx]  # [k, D]
            weights = torch.softmax(tokens @ q / math.sqrt(d), dim=0)
            torch.testing.assert_close(out[i, r], weights @ tokens)


def test_single_encoder_pass_serves_every_region():
    encoder = RiceVisionModel(RiceVisionConfig(**load_preset("rice-vit-tiny"))).eval()  # 56 px, patch 14, D 32
    head = RegionHead(32, 8)
    pixels = torch.randn(2, 3, 56, 56)
    boxes = torch.tensor([[[0, 0, 28, 28], [14, 14, 56, 56], [30, 2, 40, 50]]] * 2, dtype=torch.float32)
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    hidden = encoder(pixels).last_hidden_state  # [2, 17, 32]
    emb = head(hidden, boxes, (4, 4), 14)
    assert emb.shape == (2, 3, 8) and len(calls) == 1
    # Same embedding as pooling each region separately from its own encoder call.
    for r in range(3):
        alone = head(encoder(pixels).last_hidden_state, boxes[:, r : r + 1], (4, 4), 14)
        torch.testing.assert_close(alone[:, 0], emb[:, r])
    # The projection sits after pooling: region_features + Linear.
    torch.testing.assert_close(emb, head.projection(region_features(hidden, boxes, (4, 4), 14)))
    # A region's embedding depends only on the patches it covers (plus the CLS query).
    masks = box_patch_masks(boxes, (4, 4), 14)
    hidden2 = hidden.clone()
    hidden2[0, 1:][~masks[0, 0]] += 5.0
    torch.testing.assert_close(head(hidden2, boxes, (4, 4), 14)[0, 0], emb[0, 0])
