"""The chunked (fused linear + cross-entropy) LM loss: the loss and every gradient of the plain cross-entropy over full
logits, through the function, transformers' Qwen2ForCausalLM and the whole multimodal model (padded and packed)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from rice_mllm.constants import IGNORE_INDEX
from rice_mllm.data.collate import PaddingCollator
from rice_mllm.data.packing import PackingCollator
from rice_mllm.mllm.assembly import TINY_TOKENIZER, assemble_model, build_processor
from rice_mllm.mllm.lm_loss import (
    ChunkedLossLmHead,
    chunk_tokens_for,
    fused_linear_cross_entropy,
    install_chunked_loss_head,
)
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from tests.fixtures import TINY_TEXT, noise_image, tiny_mllm_config

B, T, D, V = 3, 11, 16, 97  # 33 tokens: chunks of 4, 5 and 7 leave a ragged last chunk


def assert_relative(got: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float = 1e-5) -> None:
    """max |got - expected| <= rtol * max |expected| (relative to the tensor's scale, so tiny entries do not count)."""
    assert got.shape == expected.shape, name
    error, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def _labels(generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    labels[2, 5] = IGNORE_INDEX
    return labels


def _plain_loss(hidden, weight, labels, num_items_in_batch=None):
    """The independent reference: full fp32 logits, shifted labels, torch cross-entropy."""
    logits = (hidden @ weight.T).float().reshape(-1, weight.shape[0])
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1).reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


def _loss_and_grads(compute, parameters: dict[str, torch.Tensor]):
    for p in parameters.values():
        p.grad = None
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in parameters.items() if p.grad is not None}


def _assert_same(result, reference, rtol: float = 1e-5) -> None:
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert_relative(loss, ref_loss, "loss", rtol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_relative(grads[name], grad, name, rtol)


@pytest.mark.parametrize("chunk", [1, 4, 5, 7, None])
@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_loss_and_gradients_equal_plain_cross_entropy(chunk, num_items_in_batch):
    g = torch.Generator().manual_seed(0)
    # an upstream layer, so the gradient also has to flow correctly past the hidden states
    upstream = nn.Linear(D, D)
    x = torch.randn(B, T, D, generator=g)
    weight = nn.Parameter(torch.randn(V, D, generator=g))
    labels = _labels(g)
    params = {"weight": weight, **dict(upstream.named_parameters())}

    def fused():
        return fused_linear_cross_entropy(
            upstream(x), weight, labels, num_items_in_batch=num_items_in_batch, chunk_tokens=chunk
        )

    reference = _loss_and_grads(lambda: _plain_loss(upstream(x), weight, labels, num_items_in_batch), params)
    _assert_same(_loss_and_grads(fused, params), reference)


def test_shift_labels_are_taken_as_given_and_backward_scales_by_the_incoming_gradient():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = _labels(g)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    params = {"hidden": hidden, "weight": weight}
    reference = _loss_and_grads(lambda: 3 * _plain_loss(hidden, weight, labels), params)
    result = _loss_and_grads(lambda: 3 * fused_linear_cross_entropy(hidden, weight, shift_labels=shifted), params)
    _assert_same(result, reference)


def test_frozen_weight_gets_no_gradient_and_the_hidden_states_the_plain_one():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g)  # stage 1: the LLM is frozen
    labels = _labels(g)
    reference = _loss_and_grads(lambda: _plain_loss(hidden, weight, labels), {"hidden": hidden, "weight": weight})
    result = _loss_and_grads(
        lambda: fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4), {"hidden": hidden, "weight": weight}
    )
    _assert_same(result, reference)
    assert weight.grad is None


def test_no_supervised_token_gives_nan_and_zero_gradients_as_torch():
    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.full((B, T), IGNORE_INDEX)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(_plain_loss(hidden, weight, labels))
    assert not hidden.grad.any() and not weight.grad.any()


def test_chunks_are_bounded_by_the_byte_budget():
    assert chunk_tokens_for(151_936) == 441  # Qwen2.5's embedding rows: 441 x 151,936 x 4 bytes <= 256 MiB
    assert chunk_tokens_for(151_936, budget_bytes=1) == 1


def _qwen(tie: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**dict(TINY_TEXT, vocab_size=V, tie_word_embeddings=tie))).train()


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_qwen2_loss_and_every_gradient_match(tie):
    """The kit's path (base model + head with labels) against transformers' own Qwen2ForCausalLM(labels=...)."""
    plain = _qwen(tie)
    kit = copy.deepcopy(plain)
    install_chunked_loss_head(kit)
    head = kit.get_output_embeddings()
    assert isinstance(head, ChunkedLossLmHead)
    assert (head.weight is kit.model.embed_tokens.weight) == tie
    head.chunk_tokens = 5
    g = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(0, V, (B, T), generator=g), _labels(g)
    reference = _loss_and_grads(lambda: plain(input_ids=ids, labels=labels).loss, dict(plain.named_parameters()))
    result = _loss_and_grads(
        lambda: head(kit.model(input_ids=ids).last_hidden_state, labels), dict(kit.named_parameters())
    )
    _assert_same(result, reference)
    with torch.no_grad():  # without labels the head is the plain projection
        hidden = kit.model(input_ids=ids).last_hidden_state
        assert torch.equal(head(hidden), plain.lm_head(hidden))


def test_bf16_autocast_tracks_transformers_under_autocast():
    """The trainer's one-process bf16 (TorchEngine autocasts): matmuls in bf16, the loss in fp32, as transformers."""
    plain = _qwen(tie=True)
    kit = copy.deepcopy(plain)
    install_chunked_loss_head(kit)
    kit.lm_head.chunk_tokens = 5
    g = torch.Generator().manual_seed(4)
    ids, labels = torch.randint(0, V, (B, T), generator=g), _labels(g)

    def autocast(compute):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return compute()

        return run

    reference = _loss_and_grads(
        autocast(lambda: plain(input_ids=ids, labels=labels).loss), dict(plain.named_parameters())
    )
    result = _loss_and_grads(
        autocast(lambda: kit.lm_head(kit.model(input_ids=ids).last_hidden_state, labels)), dict(kit.named_parameters())
    )
    assert result[0].dtype == torch.float32
    _assert_same(result, reference, rtol=2e-2)  # bf16 matmuls on both sides, in different orders


# --- through the multimodal model ---

CONVERSATIONS = [
    ([{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red and blue"}], 1),
    ([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there, friend"}], 0),
    ([{"role": "user", "content": "<image>\n<image>\nHow many?"}, {"role": "assistant", "content": "three"}], 2),
]


@pytest.fixture(scope="module")
def processor():
    return build_processor(TINY_TOKENIZER, tile_size=28)


@pytest.fixture(scope="module")
def samples(processor):
    return [
        processor(messages, [noise_image(40, 70, seed=10 * i + j) for j in range(num_images)])
        for i, (messages, num_images) in enumerate(CONVERSATIONS)
    ]


def _kit_and_plain(processor, tie: bool = True):
    """The kit model with a small chunk, and a copy whose head is a plain nn.Linear (transformers' loss path)."""
    config = tiny_mllm_config(image_token_id=processor.image_token_id)
    config.text_config.vocab_size = len(processor.tokenizer)
    config.text_config.tie_word_embeddings = tie
    torch.manual_seed(0)
    kit = RiceMllmForConditionalGeneration(config).train()
    for name, parameter in kit.named_parameters():
        parameter.requires_grad_(name not in set(kit.unused_parameter_names()))
    kit.language_model.lm_head.chunk_tokens = 7
    plain = copy.deepcopy(kit)
    head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
    head.weight = plain.language_model.lm_head.weight
    plain.language_model.set_output_embeddings(head)
    return kit, plain


@pytest.mark.parametrize("collate", ["padded", "packed", "padded, num_items_in_batch"])
def test_multimodal_padded_and_packed_batches_match_transformers_loss(processor, samples, collate):
    kit, plain = _kit_and_plain(processor)
    if collate.startswith("padded"):
        batch = PaddingCollator(processor.pad_token_id)(samples)
    else:
        batch = PackingCollator(80, processor.pad_token_id)(samples)
        assert "position_ids" in batch and batch["input_ids"].shape[0] > 1
    supervised = int((batch["labels"] != IGNORE_INDEX).sum())
    assert supervised > 7 and supervised % 7  # several chunks, a ragged last one
    if "num_items_in_batch" in collate:  # what a trainer passes for gradient accumulation: sum / this count
        batch["num_items_in_batch"] = torch.tensor(supervised + 5)
    reference = _loss_and_grads(lambda: plain(**batch).loss, dict(plain.named_parameters()))
    result = _loss_and_grads(lambda: kit(**batch).loss, dict(kit.named_parameters()))
    _assert_same(result, reference)
    assert {n.split(".")[0] for n in result[1]} == {"vision_tower", "projector", "image_newline", "language_model"}


def test_frozen_llm_trains_the_projector_as_transformers_loss_does(processor, samples):
    """Stage 1: the LLM (and its tied head) frozen; the projector's gradients flow back through the fused loss."""
    kit, plain = _kit_and_plain(processor)
    for model in (kit, plain):
        model.language_model.requires_grad_(False)
    batch = PaddingCollator(processor.pad_token_id)(samples)
    reference = _loss_and_grads(lambda: plain(**batch).loss, dict(plain.named_parameters()))
    result = _loss_and_grads(lambda: kit(**batch).loss, dict(kit.named_parameters()))
    _assert_same(result, reference)
    assert not any(name.startswith("language_model") for name in result[1])


def test_logits_without_labels_or_in_eval_mode_and_none_when_training(processor, samples):
    kit, plain = _kit_and_plain(processor)
    batch = PaddingCollator(processor.pad_token_id)(samples)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = kit(**unlabelled).logits
        assert logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
        assert torch.equal(logits, plain(**unlabelled).logits)
        trained = kit(**batch)
        assert trained.logits is None and torch.isfinite(trained.loss)
        assert plain(**batch).logits is not None  # any other head keeps transformers' path
        evaluated = kit.eval()(**batch)  # eval with labels: transformers' outputs, logits included
        assert torch.equal(evaluated.logits, logits)
        assert_relative(evaluated.loss, trained.loss)


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_keys_are_unchanged_and_reload_with_the_chunked_head(tmp_path, processor, tie):
    kit, plain = _kit_and_plain(processor, tie)
    kit.save_pretrained(tmp_path / "kit")
    plain.save_pretrained(tmp_path / "plain")
    saved = load_file(tmp_path / "kit" / "model.safetensors")
    assert saved.keys() == load_file(tmp_path / "plain" / "model.safetensors").keys()
    assert ("language_model.lm_head.weight" in saved) != tie  # a tied head is saved once, as transformers does
    loaded = RiceMllmForConditionalGeneration.from_pretrained(tmp_path / "plain")
    head = loaded.language_model.get_output_embeddings()
    assert isinstance(head, ChunkedLossLmHead)
    assert (head.weight is loaded.language_model.get_input_embeddings().weight) == tie
    torch.testing.assert_close(head.weight, kit.language_model.lm_head.weight, rtol=0, atol=0)


def test_assembly_keeps_the_chunked_head_when_it_resizes_an_untied_llm(tmp_path, processor):
    """transformers' resize_token_embeddings builds a new plain nn.Linear head for untied LLMs."""
    small = Qwen2ForCausalLM(Qwen2Config(**dict(TINY_TEXT, vocab_size=600, tie_word_embeddings=False)))
    small.save_pretrained(tmp_path / "llm")
    model = assemble_model("rice-vit-tiny", str(tmp_path / "llm"), build_processor(TINY_TOKENIZER, tile_size=56))
    head = model.language_model.get_output_embeddings()
    assert isinstance(head, ChunkedLossLmHead) and head.weight.shape[0] == len(processor.tokenizer)
