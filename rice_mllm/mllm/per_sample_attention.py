"""`sdpa_per_sample`: the LLM's attention over each sample of a packed row alone, on any device, without flash-attn.

A packed row (data.packing) holds several samples and no attention_mask; its `position_ids` restart at 0 for each
sample. transformers' SDPA path then attends over the whole row under a block-diagonal mask: the cost grows with the
row's width squared and most of the work is masked away. flash-attn's varlen kernel does what this module does, on
CUDA only. Here each sample (a span where positions count up by one, the rule transformers uses to find packed
sequences) runs causal SDPA alone, so no cross-sample attention is computed. A right-padded training batch runs
causal SDPA without a mask too; anything else (left padding, a cached decoding step) goes through transformers' SDPA
unchanged.

Importing the module registers the name with transformers' attention and mask interfaces, so a transformers model's
`set_attn_implementation("sdpa_per_sample")` selects it (the kit's model: `set_llm_attn_implementation`).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PER_SAMPLE_SDPA = "sdpa_per_sample"


def sample_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of `position_ids` [B, T], the (start, end) of each sample: a new one wherever a position does not
    follow its predecessor by one. Only the starts reach Python (a few per row, not T per row, once per layer)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    rows, begins = (index.tolist() for index in starts.nonzero(as_tuple=True))
    spans: list[list[tuple[int, int]]] = [[] for _ in range(position_ids.shape[0])]
    for i, (row, begin) in enumerate(zip(rows, begins, strict=True)):
        same_row_next = i + 1 < len(rows) and rows[i + 1] == row
        spans[row].append((begin, begins[i + 1] if same_row_next else position_ids.shape[1]))
    return spans


def per_sample_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, T, D], key/value [B, H_kv, T, D] ->
    ([B, T, H, D], None)."""
    packed = attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
    spans = sample_spans(position_ids.expand(query.shape[0], -1)) if packed else []
    if not packed or all(len(row) == 1 for row in spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b, row_spans in enumerate(spans):
        samples = [
            sdpa_attention_forward(
                module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], None, **kwargs
            )[0]
            for s, e in row_spans
        ]
        rows.append(torch.cat(samples, dim=1))
    return torch.cat(rows), None


def _padding_trails_every_row(attention_mask: torch.Tensor, **mask_args) -> bool:
    """A plain causal mask over a right-padded batch with no KV cache (a training batch): every row's real tokens come
    first, so causal attention alone never lets a real token read a pad. The pads' own outputs change, and carry no
    label."""
    plain_causal = mask_args.get("allow_is_causal_skip", True) and mask_args.get("local_size") is None
    no_cache = mask_args.get("q_offset", 0) == 0 and mask_args.get("q_length") == mask_args.get("kv_length")
    if not (plain_causal and no_cache and attention_mask.dim() == 2):
        return False
    real = attention_mask.int()
    return bool((real[:, 1:] <= real[:, :-1]).all())


def per_sample_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask where causal attention alone is exact: a packed row (the attention reads sample boundaries itself) or a
    right-padded training batch, where SDPA's mask would cost the whole square of the row, the half a causal kernel
    skips included; SDPA's mask otherwise (left padding, decoding with a cache)."""
    if attention_mask is None or (not args and _padding_trails_every_row(attention_mask, **kwargs)):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PER_SAMPLE_SDPA, per_sample_sdpa_attention)
AttentionMaskInterface.register(PER_SAMPLE_SDPA, per_sample_sdpa_mask)
