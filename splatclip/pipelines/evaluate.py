"""The evaluate job: zero-shot top-1/top-5 of a trained splat encoder on labeled splat shards, the
RGB model on the source images when given, their ratio, and compression figures.
Results go to stdout (a table), a JSON file and MLflow (metrics, and the JSON as an artifact)."""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
from pathlib import Path

import numpy as np
import torch

from splatclip.models.backbone import input_size
from splatclip.models.zeroshot import class_embeddings, load_classes, load_templates, topk_correct
from splatclip.pipelines.samples import Skipped, collate, readable, stream
from splatclip.platform import storage
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import DEFAULT_LIMITS, EvalSpec, ShardLimits, StorageSpec
from splatclip.platform.tracking import Tracker

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(model, data: str, n_classes: int, batch_size: int, spec: StorageSpec | None, device="cpu",
          limits: ShardLimits = DEFAULT_LIMITS):
    """(embeddings [M, D], labels [M], skipped) of every usable labeled sample of the shards."""
    shards, _ = storage.list_shards(data, spec)
    if not shards:
        raise FileNotFoundError(f"no shards match {data}")
    size = input_size(model.clip)
    skipped, feats, labels, pending = Skipped(), [], [], []

    def flush():
        batch = collate(pending, None, size)
        if model.kind == "splat":
            feats.append(model.encode_splats(batch["params"].to(device), batch["mask"].to(device)).cpu())
        else:
            feats.append(model.encode_image(batch["images"].to(device)).cpu())
        labels.append(batch["labels"])
        pending.clear()

    for sample in stream(shards, 0, 1, 0, 0, model.kind, size, spec, skipped, need_text=False, classes=n_classes,
                         limits=limits):
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not feats:
        raise RuntimeError(f"no usable labeled samples in {data} ({dict(skipped.reasons)})")
    return torch.cat(feats), torch.cat(labels), skipped


def zero_shot(model, data, classes_src, templates_src, batch_size, spec=None, device="cpu",
              limits: ShardLimits = DEFAULT_LIMITS) -> dict:
    classes = load_classes(classes_src, spec)
    templates = load_templates(templates_src, spec)
    text = class_embeddings(model.encode_text, model.tokenizer, classes, templates, device).cpu()
    feats, labels, skipped = embed(model, data, len(classes), batch_size, spec, device, limits)
    hits = topk_correct(feats, text, labels, ks=(1, 5))
    n = len(labels)
    return {"top1": hits[1] / n, "top5": hits[5] / n, "images": n, "skipped": dict(skipped.reasons)}


def compression(data: str, spec: StorageSpec | None) -> dict:
    """Bytes per image of the splats against raw 8-bit pixels and the source files (from each
    sample's fit record)."""
    shards, _ = storage.list_shards(data, spec)
    records = []
    for url in shards:
        for sample in readable(read_samples(url, spec, wanted=("json",)), url):
            try:
                records.append(json.loads(sample["json"]))
            except (KeyError, ValueError, RecursionError):
                continue
    if not records:
        return {}
    mean = lambda k: float(np.mean([r[k] for r in records if k in r]))  # noqa: E731
    return {"splat_bytes": mean("bytes"), "raw_bytes": mean("raw_bytes"), "source_bytes": mean("source_bytes"),
            "ratio_raw": mean("raw_bytes") / mean("bytes"), "ratio_source": mean("source_bytes") / mean("bytes"),
            "psnr": mean("psnr"), "gaussians": mean("gaussians")}


def run(spec: EvalSpec) -> int:
    from splatclip.pipelines.train import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not storage.input_shards(spec.data, spec.storage, "evaluation")[0]:
        return 2
    for field, url in (("checkpoint", spec.checkpoint), ("rgb_checkpoint", spec.rgb_checkpoint)):
        if url and not storage.exists(url, spec.storage):
            log.error("%s %s: no such model file (a train run writes model.pt in its directory)", field, url)
            return 2
    tracker = Tracker(spec.tracking, "evaluate")
    tracker.start(spec, system_metrics=True)
    with tracker.failed_on_error():
        results = {"splat": zero_shot(load_model(spec.checkpoint, spec.storage, device), spec.data, spec.classes,
                                      spec.templates, spec.batch_size, spec.storage, device, spec.limits)}
        if spec.rgb_checkpoint and spec.rgb_data:
            rgb = load_model(spec.rgb_checkpoint, spec.storage, device)
            results["rgb"] = zero_shot(rgb, spec.rgb_data, spec.classes, spec.templates, spec.batch_size,
                                       spec.storage, device, spec.limits)
            results["ratio_top1"] = results["splat"]["top1"] / max(results["rgb"]["top1"], 1e-9)
        results["compression"] = compression(spec.data, spec.storage)
        storage.write_json(spec.output, results, spec.storage)
    print_table(results)
    flat = {f"splat_{k}": v for k, v in results["splat"].items() if isinstance(v, (int, float))}
    if "rgb" in results:
        flat.update({f"rgb_{k}": v for k, v in results["rgb"].items() if isinstance(v, (int, float))})
        flat["ratio_top1"] = results["ratio_top1"]
    flat.update({f"compression_{k}": v for k, v in results["compression"].items()})
    tracker.log_metrics(flat)
    if tracker.active:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / posixpath.basename(spec.output)
            path.write_text(json.dumps(results, indent=2, sort_keys=True))
            tracker.log_artifact(path)
    tracker.end()
    return 0


def print_table(results: dict) -> None:
    print(f"{'encoder':<8} {'top-1':>7} {'top-5':>7} {'images':>7}")
    for name in ("rgb", "splat"):
        if name in results:
            r = results[name]
            print(f"{name:<8} {r['top1']:>7.3f} {r['top5']:>7.3f} {r['images']:>7d}")
    if "ratio_top1" in results:
        print(f"splat / rgb top-1: {results['ratio_top1']:.3f}")
    c = results.get("compression")
    if c:
        print(f"bytes per image: splats {c['splat_bytes']:.0f}, raw pixels {c['raw_bytes']:.0f} "
              f"({c['ratio_raw']:.1f}x), source files {c['source_bytes']:.0f} ({c['ratio_source']:.1f}x); "
              f"PSNR {c['psnr']:.2f} dB")
