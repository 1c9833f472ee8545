"""Cluster discrimination losses against a naive per-region reference, PartialFC sampling, and 2-rank sharding."""

import itertools
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rice_mllm.pretrain.losses import ClusterMarginLoss, MultiLabelClusterLoss, sample_classes, shard_range


def reference_loss(emb, centres, labels, scale, margin, classes=None):
    """The paper's Eq. 3 / Eq. 4, written from the equations, one region at a time:
    L = log(1 + sum_p exp(-s (c_p - m))) + log(1 + sum_n exp(s c_n)), p over the region's distinct positives,
    n over every scored class that is not one of them; the mean over regions with a positive."""
    classes = range(centres.shape[0]) if classes is None else [int(c) for c in classes]
    total, count = 0.0, 0
    for i in range(emb.shape[0]):
        pos = {int(t) for t in labels[i] if t >= 0}
        if not pos:
            continue
        e = emb[i] / emb[i].norm()
        cos = {j: torch.dot(e, centres[j] / centres[j].norm()) for j in set(classes) | pos}
        term = torch.log(1 + sum(torch.exp(-scale * (cos[j] - margin)) for j in pos))
        term = term + torch.log(1 + sum(torch.exp(scale * cos[j]) for j in classes if j not in pos))
        total, count = total + term, count + 1
    return total / count


def _inputs(m=12, k=23, e=8, p=5, dtype=torch.float64):
    emb = torch.randn(m, e, dtype=dtype)
    centres = torch.randn(k, e, dtype=dtype)
    labels = torch.randint(0, k, (m, p))
    labels[torch.rand(m, p) < 0.3] = -1
    labels[0] = -1  # an ignored region
    labels[1] = torch.tensor([4, 4, 7, -1, 4])  # a repeated token id is one positive
    return emb, centres, labels


def test_ocr_loss_puts_every_positive_inside_one_log_hand_computed():
    """e = (1, 0); positives at cosines 1 and 0, the one negative at cosine 0; s = 2, m = 0.5:
    log(1 + e^-1 + e^1) + log(1 + e^0), where one softplus per positive would give log(1 + e^-1) + log(1 + e^1) +
    log 2."""
    loss_fn = MultiLabelClusterLoss(3, 2, scale=2.0, margin=0.5).double()
    with torch.no_grad():
        loss_fn.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    loss = loss_fn(torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0, 1]]))
    expected = math.log(1 + math.exp(-1) + math.exp(1)) + math.log(2)
    assert abs(loss.item() - expected) < 1e-12, (loss.item(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_full_softmax_matches_reference(kind, dtype):
    emb, centres, labels = _inputs(dtype=dtype)
    # scale 8 keeps the naive fp32 reference (no max shift) accurate; the margin still matters.
    cls = ClusterMarginLoss if kind == "single" else MultiLabelClusterLoss
    loss_fn = cls(23, 8, scale=8.0, margin=0.3, sample_ratio=1.0).to(dtype)
    with torch.no_grad():
        loss_fn.weight.copy_(centres)
    lab = labels[:, 0] if kind == "single" else labels
    emb_a = emb.clone().requires_grad_()
    loss = loss_fn(emb_a, lab)
    loss.backward()
    emb_b, cen_b = emb.clone().requires_grad_(), centres.clone().requires_grad_()
    ref = reference_loss(emb_b, cen_b, lab[:, None] if kind == "single" else lab, 8.0, 0.3)
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(emb_a.grad, emb_b.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(loss_fn.weight.grad, cen_b.grad, atol=tol, rtol=tol)


def test_scale_64_is_stable_and_matches_fp64_reference():
    emb, centres, labels = _inputs()
    loss_fn = MultiLabelClusterLoss(23, 8, scale=64.0, margin=0.3)
    with torch.no_grad():
        loss_fn.weight.copy_(centres.float())
    loss = loss_fn(emb.float(), labels)
    ref = reference_loss(emb, centres, labels, 64.0, 0.3)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)


def test_sampling_always_keeps_positives():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(5, 300, (1,), generator=gen))
        pos = torch.randint(0, k, (int(torch.randint(0, 20, (1,), generator=gen)),), generator=gen)
        idx = sample_classes(pos, k, 0.1, gen)
        assert set(pos.tolist()) <= set(idx.tolist())
        assert idx.unique().numel() == idx.numel()
        assert idx.numel() == max(math.ceil(0.1 * k), pos.unique().numel())


def test_sampled_loss_scores_exactly_the_sampled_classes():
    """rho < 1: the loss equals the naive formula over the sampled classes, which always hold every positive."""
    for seed in range(20):
        emb, centres, labels = _inputs(k=60)
        loss_fn = MultiLabelClusterLoss(60, 8, scale=8.0, sample_ratio=0.1).double()
        with torch.no_grad():
            loss_fn.weight.copy_(centres)
        loss = loss_fn(emb, labels, torch.Generator().manual_seed(seed))
        scored = sample_classes(labels[labels >= 0], 60, 0.1, torch.Generator().manual_seed(seed))
        assert set(labels[labels >= 0].tolist()) <= set(scored.tolist())
        torch.testing.assert_close(loss, reference_loss(emb, centres, labels, 8.0, 0.3, scored))


def test_bad_labels_raise_with_values():
    loss_fn = ClusterMarginLoss(10, 4)
    with pytest.raises(ValueError, match=r"\[0, 10\).*12"):
        loss_fn(torch.randn(3, 4), torch.tensor([1, 12, -1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SPLITS = [((0, 5), (5, 12)), ((0, 0), (0, 12))]  # rows of 12 per rank: uneven, and one rank with none


def _rank_worker(rank, world, port, emb, centres, single_labels, multi_labels, out_dir):
    torch.set_num_threads(1)  # first, as DataLoader workers do: a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for (name, cls, labels), split in itertools.product(
            [("single", ClusterMarginLoss, single_labels), ("multi", MultiLabelClusterLoss, multi_labels)], SPLITS
        ):
            rows = slice(*split[rank])
            loss_fn = cls(centres.shape[0], emb.shape[1], scale=16.0, margin=0.3).double()
            start, end = shard_range(centres.shape[0], rank, world)
            assert loss_fn.weight.shape[0] == end - start
            with torch.no_grad():
                loss_fn.weight.copy_(centres[start:end])
            local = emb[rows].clone().requires_grad_()
            loss = loss_fn(local, labels[rows])
            loss.backward()
            results[name, split] = (loss.detach(), local.grad, loss_fn.weight.grad)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_two_ranks_with_sharded_centres_equal_one_rank(tmp_path):
    emb, centres, labels = _inputs(m=12, k=23)
    single = labels[:, 0].clone()
    # fork, not spawn: re-importing torch in each child costs seconds on a busy 2-core machine.
    args = (2, _free_port(), emb, centres, single, labels, str(tmp_path))
    mp.start_processes(_rank_worker, args=args, nprocs=2, join=True, start_method="fork")
    out = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, cls, lab in [("single", ClusterMarginLoss, single), ("multi", MultiLabelClusterLoss, labels)]:
        loss_fn = cls(23, 8, scale=16.0, margin=0.3).double()
        with torch.no_grad():
            loss_fn.weight.copy_(centres)
        full = emb.clone().requires_grad_()
        loss = loss_fn(full, lab)
        loss.backward()
        for rank, split in itertools.product(range(2), SPLITS):
            rank_loss, emb_grad, weight_grad = out[rank][name, split]
            torch.testing.assert_close(rank_loss, loss.detach())
            torch.testing.assert_close(emb_grad, full.grad[slice(*split[rank])])
            start, end = shard_range(23, rank, 2)
            torch.testing.assert_close(weight_grad, loss_fn.weight.grad[start:end])
