"""RICE-ViT against transformers' MLCDVisionModel (the released checkpoint's reference implementation)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MLCDVisionConfig, MLCDVisionModel

from rice_mllm.loading import CheckpointMismatchError
from rice_mllm.presets import list_presets, load_preset
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel
from rice_mllm.vision.rice_vit import RiceMLP

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28)
SIZES = [(28, 28), (42, 70), (84, 28)]  # square, wide, tall


def _assert_same_outputs(reference, kit, size):
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        actual = kit(pixels, output_hidden_states=True)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.hidden_states[-2], expected.hidden_states[-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)
    assert len(actual.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1


@pytest.mark.parametrize("size", SIZES)
def test_transformers_checkpoint_loads_into_kit_with_equal_outputs(tmp_path, size):
    reference = MLCDVisionModel(MLCDVisionConfig(**TINY)).eval()
    reference.save_pretrained(tmp_path)
    kit = RiceVisionModel.from_pretrained(tmp_path).eval()
    _assert_same_outputs(reference, kit, size)


@pytest.mark.parametrize("size", SIZES)
def test_kit_checkpoint_loads_into_transformers_with_equal_outputs(tmp_path, size):
    kit = RiceVisionModel(RiceVisionConfig(**TINY)).eval()
    kit.save_pretrained(tmp_path)
    assert all(key.startswith("vision_model.") for key in load_file(tmp_path / "model.safetensors"))
    reference, info = MLCDVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_outputs(reference.eval(), kit, size)


def test_large_560_has_the_released_keys_and_shapes():
    config = load_preset("rice-vit-l14-560")
    with torch.device("meta"):
        kit = RiceVisionModel(RiceVisionConfig(**config))
        reference = MLCDVisionModel(MLCDVisionConfig(**config))
    kit_shapes = {key: tuple(value.shape) for key, value in kit.state_dict().items()}
    reference_shapes = {f"vision_model.{key}": tuple(value.shape) for key, value in reference.state_dict().items()}
    assert kit_shapes == reference_shapes
    assert len(kit_shapes) == 391
    assert kit_shapes["vision_model.class_pos_emb"] == (1, 32)  # head_dim 64 -> 32 learned CLS angles
    assert "vision_model.embeddings.patch_embedding.bias" not in kit_shapes


def test_rope_is_fp32_and_patch_grid_follows_height_then_width():
    """A 2x3 grid image must differ from its 3x2 transpose unless the encoder is symmetric in H and W."""
    kit = RiceVisionModel(RiceVisionConfig(**TINY)).eval()
    pixels = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        out = kit(pixels).last_hidden_state
        transposed = kit(pixels.transpose(-1, -2)).last_hidden_state
    assert out.shape == (1, 1 + 2 * 3, 32)
    assert not torch.allclose(out[:, 1:].reshape(2, 3, 32).transpose(0, 1).reshape(6, 32), transposed[0, 1:])


def _corrupt(tmp_path, edit):
    kit = RiceVisionModel(RiceVisionConfig(**TINY))
    kit.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, names",
    [
        (lambda w: w.pop("vision_model.post_layernorm.bias"), ["missing", "vision_model.post_layernorm.bias"]),
        (lambda w: w.update({"vision_model.head.weight": torch.zeros(2)}), ["unexpected", "vision_model.head.weight"]),
        (
            lambda w: w.update({"vision_model.class_pos_emb": torch.zeros(1, 9)}),
            ["wrong shape", "vision_model.class_pos_emb", "[1, 9]", "[1, 4]"],
        ),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_bad_checkpoint_raises_naming_the_keys(tmp_path, edit, names):
    _corrupt(tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as error:
        RiceVisionModel.from_pretrained(tmp_path)
    for name in names:
        assert name in str(error.value)


def test_missing_weights_file_is_named(tmp_path):
    RiceVisionConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        RiceVisionModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        RiceVisionModel.from_pretrained(tmp_path / "nowhere")


def test_size_not_divisible_by_patch_is_rejected():
    kit = RiceVisionModel(RiceVisionConfig(**TINY))
    with pytest.raises(ValueError, match="30x28"):
        kit(torch.randn(1, 3, 30, 28))


def test_gradient_checkpointing_gives_equal_outputs_and_gradients(monkeypatch):
    kit = RiceVisionModel(RiceVisionConfig(**TINY)).train()
    mlp_calls = []
    original_mlp_forward = RiceMLP.forward
    monkeypatch.setattr(RiceMLP, "forward", lambda self, x: mlp_calls.append(1) or original_mlp_forward(self, x))
    pixels = torch.randn(2, 3, 28, 42)

    def run():
        kit.zero_grad()
        out = kit(pixels, output_hidden_states=True)
        (out.hidden_states[-2].square().mean() + out.pooler_output.sum()).backward()
        return out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in kit.named_parameters()}

    plain_out, plain_grads = run()
    assert len(mlp_calls) == TINY["num_hidden_layers"]
    kit.activation_checkpointing_enable()
    ckpt_out, ckpt_grads = run()
    assert len(mlp_calls) == 3 * TINY["num_hidden_layers"]  # forward, then recomputed in backward
    torch.testing.assert_close(ckpt_out, plain_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


@pytest.mark.parametrize("preset", [name for name in list_presets() if name.startswith("rice-vit-tiny")])
def test_tiny_presets_train(preset):
    config = RiceVisionConfig(**load_preset(preset))
    kit = RiceVisionModel(config)
    side = config.image_size
    out = kit(torch.randn(2, 3, side, side), output_hidden_states=True)
    assert torch.isfinite(out.last_hidden_state).all()
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    no_grad = [n for n, p in kit.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
