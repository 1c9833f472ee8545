"""Padding-free packing: packed rows give the loss, gradients and logits of the same samples run one by one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rice_mllm.constants import IGNORE_INDEX
from rice_mllm.data.collate import PaddingCollator
from rice_mllm.data.packing import (
    LengthGroupedSampler,
    PackedBatchSampler,
    PackingCollator,
    SampleTooLongError,
    first_fit_rows,
)
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.per_sample_attention import PER_SAMPLE_SDPA, sample_spans
from tests.fixtures import tiny_mllm_config

CONVERSATIONS = [
    ([{"role": "user", "content": "<image>\n<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}], 2),
    ([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there, friend"}], 0),
    ([{"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "three"}], 1),
    (
        [
            {"role": "user", "content": "Name a shape."},
            {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "square"},
        ],
        0,
    ),
    ([{"role": "user", "content": "<image>\nWhere?"}, {"role": "assistant", "content": "left"}], 1),
]
SIZES = [(70, 40), (30, 120), (50, 50), (28, 90)]


@pytest.fixture(scope="module")
def processor():
    return build_processor(TINY_TOKENIZER, tile_size=28)


@pytest.fixture(scope="module")
def samples(processor):
    rng = np.random.default_rng(0)
    sizes = iter(SIZES)
    out = []
    for messages, num_images in CONVERSATIONS:
        images = []
        for _ in range(num_images):
            h, w = next(sizes)
            images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        out.append(processor(messages, images))
    return out


@pytest.fixture(scope="module", params=["sdpa", PER_SAMPLE_SDPA])
def model(processor, request):
    """The tiny model with transformers' SDPA (a packed row attends as a whole, under a mask) or per-sample SDPA."""
    config = tiny_mllm_config(image_token_id=processor.image_token_id)
    config.text_config.vocab_size = len(processor.tokenizer)
    torch.manual_seed(0)
    model = RiceMllmForConditionalGeneration(config).train()
    model.set_llm_attn_implementation(request.param)
    return model


def _frozen_vision(model):
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in set(model.unused_parameter_names()))


def _loss_and_grads(model, compute_loss):
    model.zero_grad()
    loss = compute_loss()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _alone_logits(model, sample) -> torch.Tensor:
    """One sample's logits, run alone (batch of 1, no padding)."""
    return model(
        input_ids=sample["input_ids"][None], pixel_values=sample["pixel_values"], image_sizes=sample["image_sizes"]
    ).logits[0]


def _reference_loss(model, samples):
    """Each sample alone (batch of 1, no padding); summed token cross-entropy over all supervised tokens, by hand."""
    total, count = 0.0, 0
    for sample in samples:
        logits = _alone_logits(model, sample)
        targets = sample["labels"][1:]
        total = total + F.cross_entropy(logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def _assert_same(result, reference):
    loss, grads = result
    ref_loss, ref_grads = reference
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("max_tokens", [10_000, 150])
def test_packed_loss_and_gradients_equal_samples_run_alone(model, samples, processor, max_tokens):
    _frozen_vision(model)
    packed = PackingCollator(max_tokens, processor.pad_token_id)(samples)
    assert packed["input_ids"].shape[0] == (1 if max_tokens == 10_000 else 2)
    reference = _loss_and_grads(model, lambda: _reference_loss(model, samples))
    _assert_same(_loss_and_grads(model, lambda: model(**packed).loss), reference)


def test_padded_batch_gives_the_same_per_token_mean(model, samples, processor):
    padded = PaddingCollator(processor.pad_token_id)(samples)
    reference = _loss_and_grads(model, lambda: _reference_loss(model, samples))
    _assert_same(_loss_and_grads(model, lambda: model(**padded).loss), reference)


def test_attention_stays_inside_each_sample(model, samples, processor):
    packed = PackingCollator(10_000, processor.pad_token_id)(samples)
    restarts = torch.cat([torch.arange(len(sample["input_ids"])) for sample in samples])
    assert torch.equal(packed["position_ids"], restarts[None])
    with torch.no_grad():
        logits = model.eval()(**packed).logits[0]
        start = 0
        for sample in samples:  # one row, so samples sit in input order
            alone = _alone_logits(model, sample)
            torch.testing.assert_close(logits[start : start + len(alone)], alone, rtol=1e-4, atol=1e-5)
            start += len(alone)
    model.train()


def _llm_sdpa_calls(model, batch, monkeypatch, **llm_inputs) -> list[tuple[int, torch.Tensor | None]]:
    """(key width, attention mask; None: causal only) of each SDPA call in the LLM's forward pass over `batch`."""
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append((key.shape[2], attn_mask))
        return real_sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model.language_model(inputs_embeds=embeds, use_cache=False, **llm_inputs)
    monkeypatch.undo()
    return calls


def test_per_sample_attention_computes_no_cross_sample_scores(model, samples, processor, monkeypatch):
    """Per-sample SDPA calls attention once per sample of a packed row; transformers' SDPA once over the whole row."""
    packed = PackingCollator(10_000, processor.pad_token_id)(samples)
    calls = _llm_sdpa_calls(model, packed, monkeypatch, position_ids=packed["position_ids"])
    widths = [width for width, _ in calls]
    layers = model.config.text_config.num_hidden_layers
    if model.config.text_config._attn_implementation == PER_SAMPLE_SDPA:
        assert sorted(widths) == sorted(len(sample["input_ids"]) for sample in samples for _ in range(layers))
    else:
        assert widths == [packed["input_ids"].shape[1]] * layers


def test_right_padding_needs_no_mask_left_padding_keeps_it(model, samples, processor, monkeypatch):
    """Per-sample SDPA runs a right-padded training batch causal, without the mask (its loss and gradients are the
    samples' alone: test_padded_batch_gives_the_same_per_token_mean); a left-padded one keeps the mask, and its real
    tokens' logits stay those of each sample alone."""
    padded = PaddingCollator(processor.pad_token_id)(samples)
    per_sample = model.config.text_config._attn_implementation == PER_SAMPLE_SDPA
    right = [mask for _, mask in _llm_sdpa_calls(model, padded, monkeypatch, attention_mask=padded["attention_mask"])]
    assert len(right) == model.config.text_config.num_hidden_layers
    assert all((mask is None) == per_sample for mask in right)
    width = padded["input_ids"].shape[1]
    shifts = [int(width - n) for n in padded["attention_mask"].sum(1)]
    left = dict(padded)
    for key in ("input_ids", "attention_mask"):
        left[key] = torch.stack([row.roll(shift) for row, shift in zip(padded[key], shifts, strict=True)])
    del left["labels"]
    left_calls = _llm_sdpa_calls(model, left, monkeypatch, attention_mask=left["attention_mask"])
    assert all(mask is not None for _, mask in left_calls)
    with torch.no_grad():
        logits = model.eval()(**left).logits
        for row, sample in enumerate(samples):
            alone = _alone_logits(model, sample)
            torch.testing.assert_close(logits[row, width - len(alone) :], alone, rtol=1e-4, atol=1e-5)
    model.train()


def test_sample_spans_by_hand():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert sample_spans(position_ids) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 9)]]
    assert sample_spans(torch.tensor([[4, 5, 6]])) == [[(0, 3)]]  # a continuation (cached decoding) is one span


def test_packed_batch_refuses_a_kv_cache(model, samples, processor):
    packed = PackingCollator(10_000, processor.pad_token_id)(samples[:2])
    with pytest.raises(ValueError, match="packed batch"):
        model(**packed, use_cache=True)


def test_rows_reorder_images_with_their_samples(samples, processor):
    lengths = [len(sample["input_ids"]) for sample in samples]
    max_tokens = max(lengths) + 1
    packed = PackingCollator(max_tokens, processor.pad_token_id, pad_to_multiple_of=8)(samples)
    assert packed["input_ids"].shape[1] % 8 == 0
    rows = first_fit_rows(lengths, max_tokens)
    order = [i for row in rows for i in row]
    assert torch.equal(packed["image_sizes"], torch.cat([samples[i]["image_sizes"] for i in order]))
    assert torch.equal(packed["pixel_values"], torch.cat([samples[i]["pixel_values"] for i in order]))
    for r, row in enumerate(rows):  # positions restart per sample, then once more for the padding segment
        used = sum(lengths[i] for i in row)
        expected = [torch.arange(lengths[i]) for i in row] + [torch.arange(packed["input_ids"].shape[1] - used)]
        assert torch.equal(packed["position_ids"][r], torch.cat(expected))
    supervised = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == supervised


def test_first_fit_by_hand():
    # 5 opens row 0, 3 fills it, 4 opens row 1, 2 joins it; then 3 and 3 share, each 4 needs its own row.
    assert first_fit_rows([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert first_fit_rows([3, 3, 4, 4], 7) == [[0, 1], [2], [3]]
    assert first_fit_rows([4, 6, 3, 1], 7) == [[0, 2], [1, 3]]


def test_packed_batch_sampler_fills_rows_and_keeps_every_sample():
    lengths = [int(x) for x in np.random.default_rng(4).integers(10, 1000, size=97)]
    sampler = PackedBatchSampler(lengths, max_tokens=1024, rows_per_batch=3, lookahead=16, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(97))
    for batch in batches:  # what the collator will build from these indices fits the planned rows
        assert len(first_fit_rows([lengths[i] for i in batch], 1024)) <= 3
    fill = sum(lengths) / (3 * 1024 * len(batches))
    assert fill > 0.85, fill
    assert batches == list(PackedBatchSampler(lengths, 1024, 3, 16, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_sample_longer_than_a_row_is_refused_by_index():
    with pytest.raises(SampleTooLongError, match="sample 1 has 9 tokens > max_tokens 8"):
        first_fit_rows([3, 9], 8)
    with pytest.raises(SampleTooLongError, match="sample 2 has 10 tokens > max_tokens 8"):
        PackedBatchSampler([3, 4, 10], max_tokens=8, rows_per_batch=2)


def test_length_grouped_sampler_pads_less_and_covers_every_index_once():
    lengths = [int(x) for x in np.random.default_rng(1).integers(20, 2000, size=203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, group_batches=5, seed=3)

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    batches = sampler.batches()
    assert sorted(list(sampler)) == list(range(len(lengths)))
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 203 % 8
    order = np.random.default_rng(2).permutation(len(lengths)).tolist()
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padded_tokens(batches) < 0.8 * padded_tokens(random_batches)
    assert list(sampler) == list(LengthGroupedSampler(lengths, 8, 5, seed=3))
    sampler.set_epoch(1)
    assert sampler.batches() != batches
