"""Margin-based cluster discrimination losses of RICE stage 0 (DESIGN.md section 4) with PartialFC negative sampling.

Invariant: with centres sharded over ranks, loss and gradients equal the single-process loss of the global batch, and
so do the initial centres and the sampled negatives: neither depends on how the classes or the batch are split.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    return _world()[1]


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes [start, end) held by `rank`: contiguous, sizes differ by at most one."""
    return num_classes * rank // world_size, num_classes * (rank + 1) // world_size


INIT_BLOCK_ROWS = 4096  # a multiple of 16: blocks of rows draw the normal stream exactly as one call does
INIT_STD = 0.01  # centres are normalised at use, so only their direction matters


def init_centre_rows(start: int, end: int, num_rows: int, embed_dim: int) -> torch.Tensor:
    """Rows [start, end) of `torch.randn(num_rows, embed_dim) * INIT_STD` drawn from the global RNG.

    Every rank streams the whole draw in blocks and keeps its own rows, so any sharding gets the rows one process
    gets, and the global RNG advances as in one process (the draws after it, too, are the same on every rank).
    """
    kept = []
    for block_start in range(0, num_rows, INIT_BLOCK_ROWS):
        block = torch.randn(min(INIT_BLOCK_ROWS, num_rows - block_start), embed_dim)
        lo, hi = max(start, block_start), min(end, block_start + block.shape[0])
        if lo < hi:
            kept.append(block[lo - block_start : hi - block_start])
    return torch.cat(kept).mul_(INIT_STD) if kept else torch.empty(0, embed_dim)


def labels_generator(labels: torch.Tensor) -> torch.Generator:
    """A generator seeded by an order-free hash of a batch's label rows (the sum of one mixed hash per row).

    Seeding negatives from the global batch itself makes them the same on every rank, for any split of the batch
    over ranks, and on a resumed run, with no RNG state to keep; other batches (new region draws each epoch) get
    other negatives.
    """
    powers = torch.full((labels.shape[1],), 1_000_003, dtype=torch.int64, device=labels.device).cumprod(0)
    rows = ((labels.long() + 2) * powers).sum(dim=1)  # int64 arithmetic wraps: hashes, not values
    rows = (rows ^ (rows >> 31)) * 6364136223846793005
    seed = (rows ^ (rows >> 29)).sum() & (2**62 - 1)
    return torch.Generator(device=labels.device).manual_seed(int(seed))


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by `factor` on the way back."""
    return _ScaleGradient.apply(x, factor)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of rows (sizes may differ per rank); backward sums the gradients of all ranks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
        sizes = [int(s.item()) for s in sizes]
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.start, ctx.end = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every row through its own class shard: sum those partials.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.end]


def gather_rows(local: torch.Tensor, differentiable: bool = True) -> torch.Tensor:
    """Concatenate the rows of `local` from all ranks in rank order ([M_r, ...] -> [sum M_r, ...])."""
    _, world = _world()
    if world == 1:
        return local
    if differentiable:
        return _GatherWithGrad.apply(local)
    with torch.no_grad():
        return _GatherWithGrad.apply(local)


def _global(local: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Value reduced over ranks, gradient of the local part only: exact gradients of the global loss,
    because every other rank back-propagates its own local part."""
    _, world = _world()
    if world == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, op=op)
    return total + (local - local.detach())


def sample_classes(
    positives: torch.Tensor, num_classes: int, sample_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """PartialFC class sampling on one shard: all positives plus uniformly drawn negatives.

    Args:
        positives: [P] local class ids (0 <= id < num_classes) that must be scored; repeats allowed.
        num_classes: classes in the shard.
        sample_ratio: fraction of the shard to score; 1 keeps every class.
        generator: RNG for the negatives (on the device of `positives`).

    Returns:
        [S] sorted unique class ids, S = max(ceil(ratio * num_classes), #unique positives).
    """
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
    device = positives.device
    num_sample = min(num_classes, math.ceil(sample_ratio * num_classes))
    if num_sample == num_classes:
        return torch.arange(num_classes, device=device)
    # Random scores in [0, 1) for all classes, 2 for positives: the top-S are the positives then random negatives.
    scores = torch.rand(num_classes, device=device, generator=generator)
    scores[positives] = 2.0
    num_sample = max(num_sample, int(torch.unique(positives).numel()))
    return torch.topk(scores, num_sample, sorted=False).indices.sort().values


def _log1p_sum_exp(local_lse: torch.Tensor) -> torch.Tensor:
    """log(1 + sum over ranks of exp(local_lse)) per row, exact across shards: a shared shift keeps exp in range.

    Args:
        local_lse: [M] log-sum-exp of this shard's terms per row (about finfo.min where the shard has none).
    """
    shift = _global(local_lse.detach().clamp(min=0.0), op=dist.ReduceOp.MAX)  # [M]
    return shift + torch.log(torch.exp(-shift) + _global(torch.exp(local_lse - shift)))


class _ClusterDiscriminationLoss(nn.Module):
    """Shared maths of both losses (the paper's Eq. 3 and 4); labels are [M, P] positive class ids padded with -1.

    Per region i with positive classes P_i (distinct) and scored negatives N_i (cosines c of L2-normalised vectors):
    L_i = log(1 + sum_{p in P_i} exp(-s (c_ip - m))) + log(1 + sum_{n in N_i} exp(s c_in)), averaged over valid
    regions. With one positive the first term is Eq. 3's log(1 + exp(-s (c_y - m))). The value on every rank is the
    loss of the global batch; backward gives each rank the exact gradient of it for its own embeddings and centre
    rows. So DDP's averaging divides the encoder's gradient by the world size, and the centres must stay out of
    DDP/ZeRO averaging (their rows differ per rank).
    """

    def __init__(
        self, num_classes: int, embed_dim: int, scale: float = 64.0, margin: float = 0.3, sample_ratio: float = 1.0
    ) -> None:
        super().__init__()
        rank, world = _world()
        self.num_classes, self.scale, self.margin, self.sample_ratio = num_classes, scale, margin, sample_ratio
        self.class_start, self.class_end = shard_range(num_classes, rank, world)
        # This rank's rows of the [K, E] centre matrix, as one process draws it.
        self.weight = nn.Parameter(init_centre_rows(self.class_start, self.class_end, num_classes, embed_dim))

    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} label rows")
        bad = (labels < -1) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(f"labels must be -1 or in [0, {self.num_classes}); got {labels[bad][:8].tolist()}")

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        self._check(embeddings, labels)
        dtype = torch.promote_types(embeddings.dtype, torch.float32)  # exp(64) needs fp32 range
        embeddings = F.normalize(gather_rows(embeddings).to(dtype), dim=-1)  # [M, E]
        labels = gather_rows(labels, differentiable=False)  # [M, P]
        valid = (labels >= 0).any(dim=1)  # [M]
        num_valid = int(valid.sum())
        if num_valid == 0:
            # Keep every parameter in the graph so DDP / ZeRO see a gradient (zero) on every rank.
            return (embeddings.sum() + self.weight.sum()) * 0.0
        # The scored classes, drawn over all K on every rank alike (every positive is scored), then this shard's.
        if generator is None and self.sample_ratio < 1.0:
            generator = labels_generator(labels)
        scored = sample_classes(labels[labels >= 0], self.num_classes, self.sample_ratio, generator)
        index = scored[(scored >= self.class_start) & (scored < self.class_end)] - self.class_start  # [S]
        local = labels - self.class_start
        in_shard = (labels >= 0) & (local >= 0) & (local < self.weight.shape[0])
        centres = F.normalize(self.weight[index].to(dtype), dim=-1)  # [S, E]
        cosine = embeddings @ centres.T  # [M, S]
        slot = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=labels.device)
        slot[index] = torch.arange(index.numel(), device=labels.device)
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[in_shard]
        positive = torch.zeros_like(cosine, dtype=torch.bool)  # [M, S]; a repeated id is one positive
        positive[rows, slot[local[in_shard]]] = True
        # A finite floor, not -inf, for the excluded slots: a row with no term here must not give NaN gradients.
        floor = torch.finfo(dtype).min
        positive_lse = torch.logsumexp(torch.where(positive, -self.scale * (cosine - self.margin), floor), dim=1)
        negative_lse = torch.logsumexp(torch.where(positive, floor, self.scale * cosine), dim=1)  # [M]
        per_region = _log1p_sum_exp(positive_lse) + _log1p_sum_exp(negative_lse)  # [M]
        return (per_region * valid).sum() / num_valid


class ClusterMarginLoss(_ClusterDiscriminationLoss):
    """Single-label cluster discrimination for object regions (one positive centre per region).

    Args:
        num_classes: K cluster centres (all ranks together; each rank holds K / world rows in `weight`).
        embed_dim: E, the region embedding size.
        scale: s. margin: m, subtracted from the positive cosine.
        sample_ratio: rho, fraction of each shard's classes scored per step (PartialFC); 1 = all.
    """

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Loss of the global batch.

        Args:
            embeddings: [M, E] this rank's region embeddings (M may differ per rank).
            labels: [M] cluster ids; -1 marks a region to ignore.
            generator: RNG for negative sampling.

        Returns:
            Scalar: mean over valid regions of all ranks.
        """
        if labels.dim() != 1:
            raise ValueError(f"ClusterMarginLoss takes labels [M], got shape {tuple(labels.shape)}")
        return self._loss(embeddings, labels[:, None], generator)


class MultiLabelClusterLoss(_ClusterDiscriminationLoss):
    """Multi-label cluster discrimination for OCR regions: every token id of the text is a positive class.

    Args: as `ClusterMarginLoss`, with `num_classes` = the tokenizer's vocabulary size.
    """

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Loss of the global batch.

        Args:
            embeddings: [M, E] this rank's region embeddings.
            labels: [M, P] token ids padded with -1 (repeats count once); rows of only -1 are ignored.
            generator: RNG for negative sampling.

        Returns:
            Scalar: mean over valid regions of all ranks.
        """
        if labels.dim() != 2:
            raise ValueError(f"MultiLabelClusterLoss takes labels [M, P], got shape {tuple(labels.shape)}")
        return self._loss(embeddings, labels, generator)
