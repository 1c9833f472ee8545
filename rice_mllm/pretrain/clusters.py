"""Stage-0 labels: k-means centres over a teacher's region features, nearest-centre "cluster" ids, OCR "tokens".

Plain torch k-means (k-means++ init, batched matmul assignment, Lloyd updates), no faiss: at the kit's scale
(up to ~1e6 regions and ~1e5 centres, on CPU or one GPU) it is fast enough; the paper's 1M centres need faiss-gpu.
"""

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from rice_mllm.pretrain.region_data import (
    RegionDataError,
    RegionIssue,
    check_region_file,
    load_image_square,
    read_region_jsonl,
    resolve_image,
)
from rice_mllm.pretrain.region_head import region_features
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel

logger = logging.getLogger(__name__)

LABEL_HASH_TEACHER = "label-hash"


def assign_clusters(features: torch.Tensor, centres: torch.Tensor, batch_size: int = 16384) -> torch.Tensor:
    """Index of the nearest centre (Euclidean) of each row: [M, E], [K, E] -> [M] long, batched over M."""
    centre_sq = (centres * centres).sum(dim=1)  # [K]
    out = []
    for chunk in features.split(batch_size):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
        out.append((centre_sq - 2 * chunk @ centres.T).argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=features.device)


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
    if features.dim() != 2 or features.shape[0] < num_clusters or num_clusters < 1:
        raise ValueError(
            f"kmeans needs features [M, E] with M >= K >= 1, got {tuple(features.shape)}, K={num_clusters}"
        )
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


def label_hash_features(labels: list[str], dim: int = 64) -> torch.Tensor:
    """Stand-in teacher for the tiny synthetic world only: each label string ("red circle") -> a fixed random unit
    vector seeded by its hash, so equal labels coincide and distinct labels are nearly orthogonal; k-means with
    K = #labels then recovers the shape + colour classes. Real data needs a real encoder teacher.

    Returns:
        [M, dim] float32.
    """
    vectors = {}
    for label in dict.fromkeys(labels):
        seed = int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little") >> 1
        vectors[label] = torch.nn.functional.normalize(
            torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0
        )
    return torch.stack([vectors[label] for label in labels]) if labels else torch.zeros(0, dim)


def load_teacher(path: str | Path) -> torch.nn.Module:
    """A vision encoder dir whose output has CLS first: a kit / MLCD / released RICE checkpoint (strictly loaded as
    RiceVisionModel) or any other transformers vision model (AutoModel, e.g. CLIPVisionModel)."""
    from transformers import AutoConfig, AutoModel  # heavy import, only for encoder teachers

    if AutoConfig.from_pretrained(path).model_type == RiceVisionConfig.model_type:
        return RiceVisionModel.from_pretrained(path).eval()
    return AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def encoder_region_features(
    teacher: torch.nn.Module, data_file: str | Path, records: list[tuple[int, dict]], batch_size: int = 16
) -> torch.Tensor:
    """Unprojected region features (region_head.region_features) of every object region, in record order.

    Returns:
        [num_objects, D] float32 on CPU.
    """
    config = teacher.config
    size, patch = config.image_size, config.patch_size
    device = next(teacher.parameters()).device
    features = []
    for start in range(0, len(records), batch_size):
        chunk = [r for _, r in records[start : start + batch_size]]
        pixels, boxes = [], []
        for record in chunk:
            image, (width, height) = load_image_square(resolve_image(data_file, record["image"]), size)
            pixels.append(image)
            scale = torch.tensor([size / width, size / height] * 2)
            boxes.append([torch.tensor(o["box"], dtype=torch.float32) * scale for o in record.get("objects", [])])
        hidden = teacher(pixel_values=torch.stack(pixels).to(device)).last_hidden_state  # [b, 1+HW, D]
        grid = (size // patch, size // patch)
        if hidden.shape[1] != 1 + grid[0] * grid[1]:
            raise ValueError(f"teacher gives {hidden.shape[1]} tokens, expected CLS + {grid[0]}x{grid[1]} patches")
        for i, image_boxes in enumerate(boxes):
            if image_boxes:
                pooled = region_features(hidden[i : i + 1], torch.stack(image_boxes)[None].to(device), grid, patch)
                features.append(pooled[0].float().cpu())  # [n_i, D]
    return torch.cat(features) if features else torch.zeros(0, 1)


def _ocr_tokens(tokenizer_dir: str | Path, data_file: str, records: list[tuple[int, dict]]) -> list[list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for line, record in records:
        ids = [tokenizer(o["text"], add_special_tokens=False)["input_ids"] for o in record.get("ocr", [])]
        for i, tokens in enumerate(ids):
            if not tokens:
                raise RegionDataError([RegionIssue(data_file, line, f"ocr[{i}].text", "tokenizes to nothing")])
        out.append(ids)
    return out


def label_region_file(
    data_file: str | Path,
    out_file: str | Path,
    teacher: str,
    num_clusters: int,
    tokenizer_dir: str | Path | None = None,
    iters: int = 25,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, int]:
    """Write `out_file`: `data_file` with "cluster" on every object and "tokens" on every OCR region.

    Args:
        teacher: a vision encoder dir, or LABEL_HASH_TEACHER (tiny world; needs every object's "label").
        num_clusters: K of k-means over the objects' teacher features.
        tokenizer_dir: the LLM tokenizer; required when the data has OCR regions.
        iters, seed: k-means settings. batch_size, device: teacher forward settings.

    Returns:
        Counts: images, objects, clusters (used), ocr.

    Raises:
        RegionDataError: every bad record (checked first, nothing is written then).
    """
    data_file = str(data_file)
    issues = check_region_file(data_file, check_images=teacher != LABEL_HASH_TEACHER)
    records = read_region_jsonl(data_file) if not issues else []
    objects = [(line, i, o) for line, r in records for i, o in enumerate(r.get("objects", []))]
    if teacher == LABEL_HASH_TEACHER:
        issues += [
            RegionIssue(data_file, line, f"objects[{i}].label", "the label-hash teacher needs a label")
            for line, i, o in objects
            if "label" not in o
        ]
    num_ocr = sum(len(r.get("ocr", [])) for _, r in records)
    if num_ocr and tokenizer_dir is None:
        issues.append(RegionIssue(data_file, 0, "ocr", f"{num_ocr} OCR regions need a tokenizer (--tokenizer)"))
    if issues:
        raise RegionDataError(issues)

    if objects:
        if teacher == LABEL_HASH_TEACHER:
            features = label_hash_features([o["label"] for _, _, o in objects])
        else:
            features = encoder_region_features(load_teacher(teacher).to(device), data_file, records, batch_size)
        features = features.to(device)
        labels = assign_clusters(features, kmeans(features, num_clusters, iters=iters, seed=seed)).tolist()
        for (_, _, region), cluster in zip(objects, labels, strict=True):
            region["cluster"] = cluster
    if num_ocr:
        for (_, record), ids in zip(records, _ocr_tokens(tokenizer_dir, data_file, records), strict=True):
            for region, region_ids in zip(record.get("ocr", []), ids, strict=True):
                region["tokens"] = region_ids
    out_dir = Path(out_file).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for _, record in records:
        # Relative image paths are relative to the data file: re-anchor them to the output's folder.
        if not Path(record["image"]).is_absolute():
            record["image"] = os.path.relpath(resolve_image(data_file, record["image"]).resolve(), out_dir)
    with open(out_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for _, record in records)
    clusters = len({o["cluster"] for _, _, o in objects})
    return {"images": len(records), "objects": len(objects), "clusters": clusters, "ocr": num_ocr}


def main(argv: list[str] | None = None) -> int:
    """CLI over `label_region_file`."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.pretrain.clusters", description=__doc__)
    parser.add_argument("--data", required=True, help="region JSONL to label")
    parser.add_argument("--out", required=True, help="labelled JSONL (may equal --data)")
    parser.add_argument("--teacher", required=True, help=f"vision encoder dir, or {LABEL_HASH_TEACHER!r} (tiny world)")
    parser.add_argument("--num-clusters", type=int, required=True, help="K")
    parser.add_argument("--tokenizer", help="LLM tokenizer dir (needed when the data has OCR regions)")
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="images per teacher forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    counts = label_region_file(
        args.data,
        args.out,
        args.teacher,
        args.num_clusters,
        args.tokenizer,
        args.iters,
        args.seed,
        args.batch_size,
        args.device,
    )
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
