"""k-means for stage-0 labels: the kit's torch k-means (k-means++ init) and Faiss k-means as in the paper, flat
below 1e5 centres and two-level (hierarchical) from there, with nearest-centre assignment.
"""

import logging
import math

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "torch")
HIERARCHICAL_FROM = 100_000  # K from which faiss k-means is two-level, as the paper's hierarchical k-means (K = 1M)
NPROBE = 8  # coarse cells searched per point by the hierarchical assignment (see _assign_by_cells)


def _check_kmeans_input(features: torch.Tensor, num_clusters: int) -> None:
    if features.dim() != 2 or features.shape[0] < num_clusters or num_clusters < 1:
        raise ValueError(
            f"kmeans needs features [M, E] with M >= K >= 1, got {tuple(features.shape)}, K={num_clusters}"
        )


def _nearest(
    features: torch.Tensor, centres: torch.Tensor, k: int = 1, batch_size: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, its k nearest centres (Euclidean), nearest first: (||x - c||^2 - ||x||^2 [M, k], indices [M, k])."""
    centre_sq = (centres * centres).sum(dim=1)  # [K]
    rows = max(1, min(batch_size, 2**26 // len(centres)))  # a [rows, K] score block of at most 256 MB, even at K = 1e5
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every centre and changes no ranking.
    nearest = [(centre_sq - 2 * chunk @ centres.T).topk(k, largest=False) for chunk in features.split(rows)]
    return torch.cat([n.values for n in nearest]), torch.cat([n.indices for n in nearest])


def assign_clusters(features: torch.Tensor, centres: torch.Tensor, batch_size: int = 16384) -> torch.Tensor:
    """Index of the nearest centre (Euclidean) of each row: [M, E], [K, E] -> [M] long, batched over M."""
    return _nearest(features, centres, batch_size=batch_size)[1][:, 0]


def _kmeans_plus_plus(features: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(features.shape[0], (1,), generator=generator).item()
    centres = [features[first]]
    nearest_sq = ((features - features[first]) ** 2).sum(dim=1)  # [M]
    for _ in range(1, num_clusters):
        # D^2 sampling: points far from every chosen centre are likely picks (Arthur & Vassilvitskii 2007).
        weights = nearest_sq.clamp(min=0).cpu().double()
        pick = torch.multinomial(weights / weights.sum(), 1, generator=generator).item() if weights.sum() > 0 else 0
        centres.append(features[pick])
        nearest_sq = torch.minimum(nearest_sq, ((features - features[pick]) ** 2).sum(dim=1))
    return torch.stack(centres)


def kmeans(
    features: torch.Tensor, num_clusters: int, iters: int = 25, seed: int = 0, batch_size: int = 16384
) -> torch.Tensor:
    """k-means centres of the rows of `features`.

    k-means++ init, then Lloyd iterations until no assignment changes (or `iters`). An emptied cluster is re-seeded
    with the point farthest from its current centre, so all K centres stay in use. The init makes K passes over the
    data (O(K*M*E)): beyond ~1e4 centres use faiss.

    Args:
        features: [M, E] float; M >= num_clusters.
        num_clusters: K.
        iters: maximum Lloyd iterations.
        seed: seed of the init (CPU generator).
        batch_size: rows per assignment matmul.

    Returns:
        [K, E] centres (same dtype and device as `features`).
    """
    _check_kmeans_input(features, num_clusters)
    generator = torch.Generator().manual_seed(seed)
    centres = _kmeans_plus_plus(features, num_clusters, generator)
    labels = None
    for step in range(iters):
        new_labels = assign_clusters(features, centres, batch_size)
        if labels is not None and torch.equal(new_labels, labels):
            logger.info("k-means converged after %d iterations", step)
            break
        labels = new_labels
        sums = torch.zeros_like(centres).index_add_(0, labels, features)
        counts = torch.bincount(labels, minlength=num_clusters)
        centres = sums / counts.clamp(min=1)[:, None].to(features.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            distance = ((features - centres[labels]) ** 2).sum(dim=1)
            centres[empty] = features[distance.topk(empty.numel()).indices]
    return centres


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "the faiss clustering backend needs faiss: pip install faiss-cpu (or the kit's extra: "
            "pip install 'rice_mllm[cluster]'), or choose the torch backend (--backend torch) for small K"
        ) from err
    return faiss


def _group(ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, starts) with ids[order[starts[g] : starts[g + 1]]] == g."""
    order = torch.argsort(ids, stable=True)
    return order, torch.searchsorted(ids[order], torch.arange(num_groups + 1))


def _sub_cluster_counts(sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Sub-clusters per coarse cell, summing to `total` (<= sizes.sum()): in proportion to the cell's size (largest
    remainders), at least 1 in a non-empty cell and at most its size, so every fine k-means is well posed."""
    exact = sizes * total / sizes.sum()  # [C] float
    counts = torch.minimum(exact.floor().clamp(min=1) * (sizes > 0), sizes).long()
    remainder = exact - counts
    while (missing := total - int(counts.sum())) != 0:
        grow = missing > 0
        allowed = counts < sizes if grow else counts > 1
        score = torch.where(allowed, remainder if grow else -remainder, float("-inf"))
        pick = score.topk(min(abs(missing), int(allowed.sum()))).indices
        counts[pick] += 1 if grow else -1
        remainder[pick] -= 1 if grow else -1
    return counts


def _two_level_kmeans(
    features: torch.Tensor, num_clusters: int, iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hierarchical k-means: sqrt(K) coarse faiss k-means clusters, each split by its own faiss k-means into a share
    of the K centres proportional to its size.

    The scheme of faiss.contrib.clustering.two_level_clustering (coarse level trained on at most 2000 points per
    centroid, rebalanced sub-cluster counts), which cannot serve here: it asks faiss for 0 centres in a cell too
    small for its rounded-down share (faiss 1.15 then fails), and discards the coarse level that the hierarchical
    assignment needs.

    Returns:
        centres [K, E], coarse centroids [C, E], the coarse cell of each centre [K] long.
    """
    faiss = _import_faiss()
    dim, num_cells = features.shape[1], math.isqrt(num_clusters)
    # ~10 points per fine centre by design (1M regions, 1e5 centres): without this faiss warns once per cell.
    args = dict(niter=iters, seed=seed, min_points_per_centroid=1)
    coarse = faiss.Kmeans(dim, num_cells, max_points_per_centroid=2000, **args)
    coarse.train(features.numpy())
    coarse_centroids = torch.from_numpy(coarse.centroids)
    cells = assign_clusters(features, coarse_centroids)  # [M]
    counts = _sub_cluster_counts(torch.bincount(cells, minlength=num_cells), num_clusters)
    order, starts = _group(cells, num_cells)
    centres = []
    for cell in range(num_cells):
        if counts[cell]:
            fine = faiss.Kmeans(dim, int(counts[cell]), **args)
            fine.train(features[order[starts[cell] : starts[cell + 1]]].numpy())
            centres.append(torch.from_numpy(fine.centroids))
    return torch.cat(centres), coarse_centroids, torch.arange(num_cells).repeat_interleave(counts)


def _assign_by_cells(
    features: torch.Tensor, centres: torch.Tensor, coarse: torch.Tensor, cell_of_centre: torch.Tensor, nprobe: int
) -> torch.Tensor:
    """Nearest centre of each row among the centres of its `nprobe` nearest coarse cells (an IVF search).

    Exact search of 1M rows against 1e5 centres is ~2e14 flops; this is ~M (1 + nprobe) sqrt(K) E, and exact when
    nprobe covers every cell. Rows are grouped by probed cell so that each cell is one matmul: faiss's IndexIVFFlat
    scans query by query, ~10x slower per flop on 2 CPU cores (measured). A row whose probed cells hold no centre
    falls back to exact search.

    Args:
        features: [M, E]; centres: [K, E]; coarse: [C, E] cell centroids; cell_of_centre: [K] long.
        nprobe: cells searched per row.

    Returns:
        [M] long centre indices.
    """
    num_cells = len(coarse)
    probes = _nearest(features, coarse, k=min(nprobe, num_cells))[1]  # [M, nprobe]
    centre_order, centre_starts = _group(cell_of_centre, num_cells)
    probe_order, probe_starts = _group(probes.flatten(), num_cells)
    best = torch.full((len(features),), float("inf"))
    labels = torch.zeros(len(features), dtype=torch.long)
    for cell in range(num_cells):
        members = centre_order[centre_starts[cell] : centre_starts[cell + 1]]
        rows = probe_order[probe_starts[cell] : probe_starts[cell + 1]] // probes.shape[1]
        if len(members) and len(rows):
            distance, nearest = (t[:, 0] for t in _nearest(features[rows], centres[members]))
            better = distance < best[rows]
            best[rows[better]] = distance[better]
            labels[rows[better]] = members[nearest[better]]
    unresolved = best.isinf().nonzero().flatten()
    labels[unresolved] = assign_clusters(features[unresolved], centres)
    return labels


def faiss_kmeans(
    features: torch.Tensor,
    num_clusters: int,
    iters: int = 25,
    seed: int = 0,
    hierarchical_from: int = HIERARCHICAL_FROM,
    nprobe: int = NPROBE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Faiss k-means centres and nearest-centre labels of the rows of `features`.

    Below `hierarchical_from` centres: faiss.Kmeans and exact assignment. From there, the paper's hierarchical
    k-means (`_two_level_kmeans`) and the matching assignment: coarse cell, then nearest centre (`_assign_by_cells`).

    Args:
        features: [M, E] float; M >= K.
        num_clusters: K.
        iters: Lloyd iterations (of every level).
        seed: faiss's sampling seed.
        hierarchical_from: the K from which the two-level path is taken.
        nprobe: coarse cells searched per row by the two-level assignment.

    Returns:
        centres [K, E] float32, labels [M] long, on CPU.
    """
    faiss = _import_faiss()
    _check_kmeans_input(features, num_clusters)
    x = features.detach().float().cpu().contiguous()  # faiss reads it as numpy without a copy
    if num_clusters >= hierarchical_from:
        centres, coarse, cell_of_centre = _two_level_kmeans(x, num_clusters, iters, seed)
        return centres, _assign_by_cells(x, centres, coarse, cell_of_centre, nprobe)
    flat = faiss.Kmeans(x.shape[1], num_clusters, niter=iters, seed=seed, min_points_per_centroid=1)
    flat.train(x.numpy())
    centres = torch.from_numpy(flat.centroids)
    return centres, assign_clusters(x, centres)


def cluster_features(
    features: torch.Tensor,
    num_clusters: int,
    backend: str = "faiss",
    iters: int = 25,
    seed: int = 0,
    hierarchical_from: int = HIERARCHICAL_FROM,
    nprobe: int = NPROBE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means centres [K, E] and nearest-centre labels [M] of `features` [M, E] with one of BACKENDS.

    "faiss": `faiss_kmeans` (all arguments). "torch": `kmeans` + `assign_clusters` on the features' device (iters,
    seed; its k-means++ init makes K passes over the data, so keep K small).
    """
    if backend == "faiss":
        return faiss_kmeans(features, num_clusters, iters, seed, hierarchical_from, nprobe)
    if backend == "torch":
        centres = kmeans(features, num_clusters, iters=iters, seed=seed)
        return centres, assign_clusters(features, centres)
    raise ValueError(f"unknown clustering backend {backend!r}; valid: {', '.join(BACKENDS)}")
