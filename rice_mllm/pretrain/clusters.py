"""Stage-0 labels (DESIGN.md section 4): k-means centres over a teacher's region features, nearest-centre "cluster" ids
on objects, the LLM tokenizer's ids on OCR regions. Faiss k-means as in the paper: flat below 1e5 centres, two-level
(hierarchical) from there; the kit's torch k-means serves machines without faiss, at small K.
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from rice_mllm.data.shards import is_shards
from rice_mllm.pretrain.kmeans import BACKENDS, HIERARCHICAL_FROM, NPROBE, cluster_features
from rice_mllm.pretrain.region_data import (
    RegionDataError,
    RegionIssue,
    check_region_file,
    read_region_jsonl,
    resolve_image,
)
from rice_mllm.pretrain.teacher import encoder_region_features, load_teacher

logger = logging.getLogger(__name__)

LABEL_HASH_TEACHER = "label-hash"


def default_backend(teacher: str | None = None) -> str:
    """The k-means backend: torch for the label-hash teacher (its features are exact duplicates per label: k-means++
    never seeds a duplicate of a chosen centre, so K = #labels recovers the labels exactly, where faiss's random
    seeding may not), else faiss when it is installed, else torch."""
    if teacher == LABEL_HASH_TEACHER or importlib.util.find_spec("faiss") is None:
        return "torch"
    return "faiss"


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


def _checked_records(
    data_file: str, teacher: str, num_clusters: int, tokenizer_dir: str | Path | None
) -> tuple[list[tuple[int, dict]], list[dict], int]:
    """(records, object regions, number of OCR regions) of a valid file; else RegionDataError with every issue."""
    issues = check_region_file(data_file, check_images=teacher != LABEL_HASH_TEACHER)
    records = read_region_jsonl(data_file) if not issues else []
    objects = [(line, i, o) for line, r in records for i, o in enumerate(r.get("objects", []))]
    if teacher == LABEL_HASH_TEACHER:
        issues += [
            RegionIssue(data_file, line, f"objects[{i}].label", "the label-hash teacher needs a label")
            for line, i, o in objects
            if "label" not in o
        ]
    if 0 < len(objects) < num_clusters:
        issues.append(RegionIssue(data_file, 0, "objects", f"{len(objects)} objects, fewer than K={num_clusters}"))
    num_ocr = sum(len(r.get("ocr", [])) for _, r in records)
    if num_ocr and tokenizer_dir is None:
        issues.append(RegionIssue(data_file, 0, "ocr", f"{num_ocr} OCR regions need a tokenizer (--tokenizer)"))
    if issues:
        raise RegionDataError(issues)
    return records, [o for _, _, o in objects], num_ocr


def _write_records(records: list[tuple[int, dict]], data_file: str, out_file: str | Path) -> None:
    out_dir = Path(out_file).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for _, record in records:
        # Relative image paths are relative to the data file: re-anchor them to the output's folder.
        if not Path(record["image"]).is_absolute():
            record["image"] = os.path.relpath(resolve_image(data_file, record["image"]).resolve(), out_dir)
    with open(out_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for _, record in records)


def label_region_file(
    data_file: str | Path,
    out_file: str | Path,
    teacher: str,
    num_clusters: int,
    *,
    tokenizer_dir: str | Path | None = None,
    backend: str | None = None,
    iters: int = 25,
    seed: int = 0,
    hierarchical_from: int = HIERARCHICAL_FROM,
    nprobe: int = NPROBE,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, int]:
    """Write `out_file`: `data_file` with "cluster" on every object and "tokens" on every OCR region.

    Args:
        teacher: a vision encoder dir (`load_teacher`), or LABEL_HASH_TEACHER (tiny world; needs every object's
            "label").
        num_clusters: K of k-means over the objects' teacher features.
        tokenizer_dir: the LLM tokenizer; required when the data has OCR regions.
        backend: one of BACKENDS; None: `default_backend(teacher)`.
        iters, seed, hierarchical_from, nprobe: k-means settings (`cluster_features`).
        batch_size, device: teacher forward settings (device also runs the torch k-means).

    Returns:
        Counts: images, objects, clusters (used), ocr.

    Raises:
        RegionDataError: every bad record (checked first, nothing is written then).
        ValueError: `data_file` is shards: label the JSONL they were written from, then write the labelled file's.
    """
    if is_shards(data_file):
        raise ValueError(
            f"{data_file}: labelling reads a region JSONL, not shards: label the JSONL they were written from, then "
            "write the labelled file's shards (`python -m rice_mllm.pretrain.region_data to-shards`)"
        )
    data_file = str(data_file)
    records, objects, num_ocr = _checked_records(data_file, teacher, num_clusters, tokenizer_dir)
    if objects:
        if teacher == LABEL_HASH_TEACHER:
            features = label_hash_features([o["label"] for o in objects])
        else:
            features = encoder_region_features(load_teacher(teacher, device), data_file, records, batch_size)
            # On the unit sphere, as the losses compare embeddings with centres: a few large channels of CLIP-like
            # tokens must not decide the clusters on their own.
            features = torch.nn.functional.normalize(features, dim=-1)
        backend = backend or default_backend(teacher)
        _, labels = cluster_features(features.to(device), num_clusters, backend, iters, seed, hierarchical_from, nprobe)
        for region, cluster in zip(objects, labels.tolist(), strict=True):
            region["cluster"] = cluster
    if num_ocr:
        for (_, record), ids in zip(records, _ocr_tokens(tokenizer_dir, data_file, records), strict=True):
            for region, region_ids in zip(record.get("ocr", []), ids, strict=True):
                region["tokens"] = region_ids
    _write_records(records, data_file, out_file)
    clusters = len({o["cluster"] for o in objects})
    return {"images": len(records), "objects": len(objects), "clusters": clusters, "ocr": num_ocr}


def main(argv: list[str] | None = None) -> int:
    """CLI over `label_region_file`."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.pretrain.clusters", description=__doc__)
    parser.add_argument("--data", dest="data_file", required=True, help="region JSONL to label")
    parser.add_argument("--out", dest="out_file", required=True, help="labelled JSONL (may equal --data)")
    parser.add_argument("--teacher", required=True, help=f"vision encoder dir, or {LABEL_HASH_TEACHER!r} (tiny world)")
    parser.add_argument("--num-clusters", type=int, required=True, help="K")
    parser.add_argument(
        "--tokenizer", dest="tokenizer_dir", help="LLM tokenizer dir (needed when the data has OCR regions)"
    )
    parser.add_argument("--backend", choices=BACKENDS, help="k-means backend (default: faiss when installed)")
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hierarchical-from", type=int, default=HIERARCHICAL_FROM, help="K from which faiss is two-level"
    )
    parser.add_argument("--nprobe", type=int, default=NPROBE, help="coarse cells searched per region (two-level)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per teacher forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    counts = label_region_file(**vars(args))
    print(f"wrote {args.out_file}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
