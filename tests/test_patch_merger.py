"""LLaVA-OneVision-1.5's patch merger as the projector: equal to transformers' merger, a quarter of the image tokens
counted alike by processor and model, trained, saved and reloaded, and refused by export."""

import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision1_5.configuration_llava_onevision1_5 import LlavaOnevision15VisionConfig
from transformers.models.llava_onevision1_5.modeling_llava_onevision1_5 import LlavaOnevision15VisionPatchMerger

from rice_mllm.export import choose_target
from rice_mllm.inference import answer, load_for_inference
from rice_mllm.mllm.anyres import AnyresGeometry, num_image_tokens
from rice_mllm.mllm.assembly import TINY_TOKENIZER, assemble_model, build_processor
from rice_mllm.mllm.projector import PatchMergerProjector
from rice_mllm.train.trainer import main as train_main
from tests.fixtures import tiny_mllm_config
from tests.test_region_tokens import BOX_A, _stage2_arguments


def _merge_order(tiles: int, side: int) -> list[int]:
    """Row-major patch indices in Qwen2-VL's merge order: 2x2 blocks row by row, each block's patches row by row."""
    order = []
    for tile in range(tiles):
        for block_row in range(side // 2):
            for block_col in range(side // 2):
                for row in range(2):
                    for col in range(2):
                        order.append(tile * side * side + (2 * block_row + row) * side + 2 * block_col + col)
    return order


def test_the_patch_merger_equals_transformers_llava_onevision_1_5_merger():
    torch.manual_seed(0)
    ours = PatchMergerProjector(vision_hidden_size=16, text_hidden_size=24, layer_norm_eps=1e-5)
    for parameter in ours.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    config = LlavaOnevision15VisionConfig(hidden_size=16, out_hidden_size=24, spatial_merge_size=2, num_heads=2)
    reference = LlavaOnevision15VisionPatchMerger(config)
    reference.load_state_dict(ours.state_dict())
    features = torch.randn(3, 36, 16)  # 3 tiles of 6x6 patches, row-major
    expected = reference(features.reshape(-1, 16)[_merge_order(3, 6)]).reshape(3, 9, 24)
    torch.testing.assert_close(ours(features), expected, rtol=1e-5, atol=1e-6)
    regions = torch.randn(5, 16)  # a region enters as a block of four equal patches
    torch.testing.assert_close(
        ours.project_regions(regions), reference(regions.repeat_interleave(4, dim=0)), rtol=1e-5, atol=1e-6
    )


def test_a_merged_image_takes_a_quarter_of_the_tokens_by_hand():
    """56 px tiles of 14 px patches: 4x4 patches, 2x2 merged tokens. A 56 x 112 image on a 1x2 grid: the base tile's
    4 tokens, then the grid's 2 rows of 4 tokens, each with its newline: 4 + 2 * 5 = 14 (unmerged: 16 + 4 * 9 = 52)."""
    merged = AnyresGeometry(56, 14, [(56, 112)], spatial_merge_size=2)
    assert num_image_tokens((56, 112), merged) == 14
    assert num_image_tokens((56, 112), AnyresGeometry(56, 14, [(56, 112)])) == 52
    assert num_image_tokens((56, 112), merged, tiled=False) == 4 + 1
    with pytest.raises(ValueError, match="spatial_merge_size 3"):
        AnyresGeometry(56, 14, [(56, 56)], spatial_merge_size=3)


def test_processor_and_model_count_merged_tokens_alike():
    processor = build_processor(TINY_TOKENIZER, tile_size=56, max_tiles=4, projector_type="patch_merger")
    model = assemble_model("rice-vit-tiny", "qwen2.5-tiny", processor, "patch_merger").eval()
    images = [Image.new("RGB", (130, 40), "red"), Image.new("RGB", (50, 90), "blue")]
    messages = [{"role": "user", "content": "<image>\n<image>\nSame colour?"}]
    batch = processor(messages, images)
    image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == sum(processor.num_image_tokens(image.size[::-1], 2) for image in images)
    features = model.image_features(batch["pixel_values"], batch["image_sizes"], batch.get("batch_num_images"))
    assert features.shape[0] == image_tokens
    with pytest.raises(ValueError, match="processor counts tokens for 1"):
        assemble_model("rice-vit-tiny", "qwen2.5-tiny", build_processor(TINY_TOKENIZER, tile_size=56), "patch_merger")


def test_a_patch_merger_model_with_region_tokens_trains_reloads_answers_and_is_not_exported(tmp_path):
    args = [*_stage2_arguments(tmp_path), "model.projector=patch_merger"]
    train_main(args)
    model, processor = load_for_inference(tmp_path / "run", device="cpu")
    assert model.config.projector_type == "patch_merger"
    assert processor.image_processor.geometry.spatial_merge_size == 2
    assert isinstance(model.projector, PatchMergerProjector)
    messages = [{"role": "user", "content": f"<image>\nWhat colour is the shape at {BOX_A}?"}]
    assert isinstance(answer(model, processor, messages, [Image.open(tmp_path / "0.png")], max_new_tokens=3), str)
    with pytest.raises(ValueError, match=r"model\.projector'\] set, but model\.init_from.*fixes them"):
        train_main([*args, f"model.init_from={tmp_path / 'run'}", f"output_dir={tmp_path / 'again'}"])
    with pytest.raises(ValueError, match="patch_merger"):
        choose_target(model.config)


def test_the_default_projector_is_llavas_mlp2x_gelu():
    config = tiny_mllm_config()
    assert config.projector_type == "mlp2x_gelu"
    assert config.anyres_geometry().spatial_merge_size == 1
