"""The evaluate job: zero-shot top-1/top-5 of a trained splat encoder on labeled splat shards, the
RGB model on the source images when given, their ratio, and compression figures.
Results go to stdout (a table), a JSON file and MLflow (metrics, and the JSON as an artifact)."""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import tempfile
from pathlib import Path

import numpy as np
import torch

from splatclip.models.model_file import load_model, model_from_payload, read_payload
from splatclip.pipelines.job import Job
from splatclip.pipelines.layout import fit_recipe, settings_changes, view_of
from splatclip.pipelines.samples import readable
from splatclip.pipelines.scoring import LabeledSet, zero_shot
from splatclip.platform import storage
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import EvalSpec
from splatclip.platform.tracking import Tracker

log = logging.getLogger(__name__)


def compression(spec: EvalSpec) -> dict:
    """Bytes per image of the splats against raw 8-bit pixels and the source files (from each
    sample's fit record)."""
    shards, _ = storage.list_shards(spec.data, spec.storage)
    records = []
    for url in shards:
        for sample in readable(read_samples(url, spec.storage, spec.limits, ("json",)), url):
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


def fit_differences(trained: dict | None, evaluated: dict | None) -> list[str]:
    """'prefilter: 0.018 in training, 0.0 here' for each fit setting of the evaluation splats that is
    not the encoder's training splats' (none when either is unknown), each logged as a warning: an
    encoder reads splats best fitted as it was trained (README, 'Serve the encoder')."""
    if not trained or not evaluated:
        return []
    differences = settings_changes(trained, evaluated, sides=("in training", "here"))
    for line in differences:
        log.warning("the evaluation splats were fitted otherwise than the encoder's training splats: fit.%s", line)
    return differences


class EvalJob(Job):
    name = "evaluate"
    inputs = ("data", "rgb_data")

    def check(self) -> list[str]:
        spec, problems = self.spec, []
        self.shard_list = self.shards(spec.data, "evaluation", problems)[0]
        for field, url in (("checkpoint", spec.checkpoint), ("rgb_checkpoint", spec.rgb_checkpoint)):
            if url and not storage.exists(url, spec.storage):
                problems.append(f"{field} {url}: no such model file (a train run writes model.pt in its directory)")
        return problems

    def body(self, tracker: Tracker) -> int:
        spec = self.spec
        device = "cuda" if torch.cuda.is_available() else "cpu"
        splats = LabeledSet(spec.data, spec.classes, spec.templates, spec.storage, spec.limits)
        payload = read_payload(spec.checkpoint, spec.storage, device)
        results = {"splat": zero_shot(model_from_payload(payload, spec.checkpoint, spec.storage, device), splats,
                                      spec.batch_size, device)}
        fitted = fit_recipe(self.shard_list, spec.storage)
        results["fit_differences"] = fit_differences(payload.get("fit"), fitted)
        if spec.rgb_checkpoint and spec.rgb_data:
            rgb = load_model(spec.rgb_checkpoint, spec.storage, device)
            # the RGB model reads the source images framed, grounded, cleared and stroked as their splats were
            images = dataclasses.replace(splats, data=spec.rgb_data, view=view_of(fitted))
            results["rgb"] = zero_shot(rgb, images, spec.batch_size, device)
            results["ratio_top1"] = results["splat"]["top1"] / max(results["rgb"]["top1"], 1e-9)
        results["compression"] = compression(spec)
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
        return 0


def run(spec: EvalSpec) -> int:
    return EvalJob(spec).run()


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
    for line in results.get("fit_differences", []):
        print(f"fitted otherwise than the encoder's training splats: {line}")
