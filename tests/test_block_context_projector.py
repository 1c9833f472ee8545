"""`mlp2x_gelu_block`: mlp2x_gelu per patch plus a term over the patch's 2x2 block, checked against loops written
from its definition; it starts as mlp2x_gelu, trains, reloads with its block term, and is not exported."""

import pytest
import torch
from torch.nn import functional as F

from rice_mllm.export import choose_target
from rice_mllm.inference import load_for_inference
from rice_mllm.mllm.projector import BlockContextProjector, MultiModalProjector, build_projector
from rice_mllm.train.trainer import main as train_main
from tests.test_region_tokens import _stage2_arguments

VISION, TEXT, SIDE = 6, 5, 4


def _random_projector() -> BlockContextProjector:
    torch.manual_seed(0)
    projector = BlockContextProjector(VISION, TEXT)
    for parameter in projector.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return projector


def _per_patch(projector: BlockContextProjector, feature: torch.Tensor) -> torch.Tensor:
    return projector.linear_2(F.gelu(projector.linear_1(feature)))


def _block_outputs(projector: BlockContextProjector, block: list[torch.Tensor]) -> list[torch.Tensor]:
    """The block term for four patches given in row-major order (the merger's MLP, times 0.25): one output per
    patch, in the same order."""
    hidden = 0.25 * projector.block_fc2(F.gelu(projector.block_fc1(torch.cat(block))))
    return list(hidden.split(TEXT))


def test_each_token_is_its_patch_through_mlp2x_gelu_plus_its_place_in_its_blocks_term():
    projector = _random_projector()
    features = torch.randn(2, SIDE * SIDE, VISION)
    expected = torch.empty(2, SIDE * SIDE, TEXT)
    for tile in range(2):
        for row in range(SIDE):
            for col in range(SIDE):
                top, left = row - row % 2, col - col % 2
                block = [features[tile, (top + r) * SIDE + left + c] for r in range(2) for c in range(2)]
                place = (row % 2) * 2 + col % 2
                own = _per_patch(projector, features[tile, row * SIDE + col])
                expected[tile, row * SIDE + col] = own + _block_outputs(projector, block)[place]
    torch.testing.assert_close(projector(features), expected, rtol=1e-5, atol=1e-5)


def test_a_region_feature_enters_the_block_term_as_four_equal_patches():
    projector = _random_projector()
    regions = torch.randn(3, VISION)
    expected = torch.stack(
        [
            _per_patch(projector, region) + torch.stack(_block_outputs(projector, [region] * 4)).mean(0)
            for region in regions
        ]
    )
    torch.testing.assert_close(projector.project_regions(regions), expected, rtol=1e-5, atol=1e-5)


def test_a_new_block_projector_computes_mlp2x_gelu():
    new = BlockContextProjector(VISION, TEXT)
    plain = MultiModalProjector(VISION, TEXT)
    plain.load_state_dict({name: value for name, value in new.state_dict().items() if name.startswith("linear_")})
    features, regions = torch.randn(2, SIDE * SIDE, VISION), torch.randn(3, VISION)
    torch.testing.assert_close(new(features), plain(features))
    torch.testing.assert_close(new.project_regions(regions), plain(regions))


def test_tiles_of_an_odd_number_of_patches_a_side_are_refused_by_name():
    """378 px tiles of 14 px patches (rice-vit-l14-378) are 27 patches a side: no 2x2 blocks."""
    with pytest.raises(ValueError, match="mlp2x_gelu_block.*have 27"):
        build_projector("mlp2x_gelu_block", VISION, TEXT, "gelu", 1e-5, patches_per_side=27)
    assert isinstance(build_projector("mlp2x_gelu_block", VISION, TEXT, "gelu", 1e-5, 28), BlockContextProjector)


def test_a_block_projector_model_trains_reloads_its_block_term_and_is_not_exported(tmp_path):
    train_main([*_stage2_arguments(tmp_path), "model.projector=mlp2x_gelu_block"])
    model, processor = load_for_inference(tmp_path / "run", device="cpu")
    assert model.config.projector_type == "mlp2x_gelu_block"
    assert processor.image_processor.geometry.spatial_merge_size == 1
    assert isinstance(model.projector, BlockContextProjector)
    assert model.projector.block_fc2.weight.abs().sum() > 0  # trained away from its zero start, and saved
    with pytest.raises(ValueError, match="mlp2x_gelu_block"):
        choose_target(model.config)
