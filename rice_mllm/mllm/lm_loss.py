"""Causal-LM loss that never holds full-vocabulary logits: a fused linear + cross-entropy over chunks of tokens.

Semantics are transformers' `ForCausalLMLoss` (labels shifted left, -100 ignored, fp32 cross-entropy, mean over the
supervised tokens, or their sum / `num_items_in_batch` when given), and so are the gradients. As Liger-Kernel's fused
linear cross-entropy does, the forward computes, chunk by chunk, the chunk's logits, its loss terms and at once the
gradients of the hidden states and of the head weight; backward only scales them by the incoming gradient. No matmul is
recomputed, and no [tokens, vocab] tensor outlives its chunk.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..constants import IGNORE_INDEX

# Bytes of one chunk's fp32 logits. The fused step holds one such block (softmax and its gradient are computed in
# place) plus its compute-dtype copy under bf16: at Qwen2.5's 151,936 rows 256 MiB is 441 tokens a chunk, against
# ~10 GB for the logits of 8 x 2048 tokens. Chunks of a few hundred rows keep the matmuls efficient on CPU and GPU.
LOGITS_CHUNK_BYTES = 256 * 2**20

# Keyword arguments of transformers' causal-LM loss that `ChunkedLossLmHead` accepts too.
LOSS_OPTIONS = ("num_items_in_batch", "shift_labels", "ignore_index")


def chunk_tokens_for(vocab_size: int, budget_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's fp32 logits [tokens, vocab_size] take at most `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // (4 * vocab_size))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over supervised rows of CE(rows @ weight^T, targets) / denominator; gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, denominator, chunk, need_hidden, need_weight, compute_dtype):
        # hidden [N, D]; rows [n] indices of the supervised tokens; targets [n] their next-token ids
        w = weight.to(compute_dtype)  # a copy only under autocast, which would cast it for the matmul anyway
        h = hidden.index_select(0, rows).to(compute_dtype)  # [n, D]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h) if need_hidden else None
        # fp32 accumulator: summing per-chunk bf16 partials in bf16 would lose precision the single matmul keeps
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, h.shape[0], chunk):
            h_c, y_c = h[start : start + chunk], targets[start : start + chunk]
            z = (h_c @ w.T).float()  # [C, V]: the upcast logits, as ForCausalLMLoss
            lse = torch.logsumexp(z, dim=-1)  # [C]
            loss_sum += (lse - z.gather(1, y_c[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight):
                continue
            # d loss / d logits = (softmax - onehot) / denominator, built in place over z
            z.sub_(lse[:, None]).exp_()
            z[torch.arange(len(y_c), device=z.device), y_c] -= 1
            g = z.div_(denominator).to(compute_dtype)
            if need_hidden:
                torch.mm(g, w, out=grad_h[start : start + chunk])
            if need_weight:
                if compute_dtype == torch.float32:
                    grad_w.addmm_(g.T, h_c)
                else:
                    grad_w += g.T @ h_c
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        ctx.rows, ctx.grad_h, ctx.grad_w = rows, grad_h, grad_w
        return loss_sum / denominator

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.rows is None:
            raise RuntimeError("the fused loss's gradients were already consumed: backward twice is not supported")
        grad_hidden = grad_weight = None
        if ctx.grad_h is not None:
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=ctx.grad_h.device)
            grad_hidden.index_copy_(0, ctx.rows, ctx.grad_h.mul_(grad_output).to(ctx.hidden_dtype))
        if ctx.grad_w is not None:
            grad_weight = ctx.grad_w.mul_(grad_output).to(ctx.weight_dtype)
        ctx.rows = ctx.grad_h = ctx.grad_w = None  # free them now, not when the graph goes
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(hidden @ weight^T, labels)`, without building the logits.

    Args:
        hidden: [B, T, D] final hidden states (after the LLM's last norm).
        weight: [V, D] the output projection.
        labels: [B, T] token ids, `ignore_index` where not supervised; shifted here (position t predicts t + 1).
        shift_labels: [B, T] targets already shifted (instead of `labels`).
        num_items_in_batch: if given, the loss is the sum over supervised tokens divided by it, else their mean.
        chunk_tokens: supervised tokens per chunk; default `chunk_tokens_for(V)`.

    Returns:
        The scalar fp32 loss; NaN when no token is supervised and `num_items_in_batch` is None (as transformers).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("fused_linear_cross_entropy needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    if targets.shape[0] != flat.shape[0]:
        raise ValueError(f"{targets.shape[0]} labels for {flat.shape[0]} hidden states")
    # Unsupervised tokens (prompts, images, padding) have zero gradient in the plain loss too: skip their logits.
    rows = (targets != ignore_index).nonzero().squeeze(1)
    denominator = rows.numel() if num_items_in_batch is None else num_items_in_batch
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device)
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    grad = torch.is_grad_enabled()
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(
            flat,
            weight,
            rows,
            targets[rows],
            denominator,
            chunk_tokens or chunk_tokens_for(weight.shape[0]),
            grad and hidden.requires_grad,
            grad and weight.requires_grad,
            compute_dtype,
        )


class ChunkedLossLmHead(nn.Linear):
    """The LLM's output projection, an `nn.Linear` with the same `weight` (checkpoint keys and export unchanged).

    `head(hidden)` returns logits as usual (generation); `head(hidden, labels)` returns the causal-LM loss through
    `fused_linear_cross_entropy`. The loss lives in the head's own forward because under DeepSpeed ZeRO-3 a parameter
    is gathered only while its owning module runs.
    """

    chunk_tokens: int | None = None  # tokens per chunk; None: `chunk_tokens_for(vocab)`

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, **loss_options: object) -> torch.Tensor:
        if labels is None and loss_options.get("shift_labels") is None:
            return super().forward(hidden)
        unknown = set(loss_options) - set(LOSS_OPTIONS)
        if unknown:
            raise TypeError(f"unknown loss options {sorted(unknown)}; accepted: {list(LOSS_OPTIONS)}")
        return fused_linear_cross_entropy(hidden, self.weight, labels, chunk_tokens=self.chunk_tokens, **loss_options)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> ChunkedLossLmHead:
        """A head sharing `linear`'s weight Parameter (ties survive); nothing is allocated."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        head.weight = linear.weight
        return head


def install_chunked_loss_head(language_model: nn.Module) -> None:
    """Make a transformers causal LM's output projection a `ChunkedLossLmHead` (a plain bias-free nn.Linear only;
    anything else, e.g. a LoRA-wrapped head, is left as is and the caller keeps transformers' loss)."""
    head = language_model.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None:
        language_model.set_output_embeddings(ChunkedLossLmHead.from_linear(head))
