"""The fitting actor of the fit job: a whole batch of decoded images per optimizer step on its
device (a failing batch is split and retried), the optional teacher's embeddings, then the batch
written as parts and the shards it completes committed (`fit_parts`)."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import torch

from splatclip import splats
from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.resilient import Failure, fit_images, split_on_failure
from splatclip.fit import parts
from splatclip.pipelines import layout
from splatclip.platform import storage
from splatclip.platform.specs import FitSpec

log = logging.getLogger(__name__)


class FitActor:
    """Holds the (optional) teacher model and fits whole batches on its device."""

    def __init__(self, spec: FitSpec):
        self.spec = spec
        want_gpu = spec.ray.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")
        self.teacher = None
        if spec.teacher is not None:
            from splatclip.models.backbone import create

            self.teacher, _ = create(spec.teacher.model, spec.teacher.pretrained, spec.storage, self.device)
        self._warm_up()

    def _warm_up(self) -> None:
        """One step on a blank image while the first shards are still being read: torch loads its
        optimizer machinery (~1 s) and the device its kernels on first use, not on the first batch."""
        size = self.spec.fit.size
        fit_batch(torch.zeros(1, 3, size, size, device=self.device), self.spec.fit.model_copy(update={"iterations": 1}))

    def __call__(self, batch: dict) -> dict:
        """Fit a batch, write it as one part per shard it touches, commit the shards it completes.
        Returns one row per part: shard, images, fitted, committed, refitted (the batch was claimed
        before: fitted twice), and why a part was refused (a link where it would be written) or ""."""
        n = len(batch["key"])
        by_shard = {s: [i for i in range(n) if batch["shard"][i] == s] for s in dict.fromkeys(batch["shard"])}
        refitted = {s: self._claim(s, [int(batch["index"][i]) for i in mine]) for s, mine in by_shard.items()}
        records = [{"index": int(batch["index"][i]), "total": int(batch["total"][i]), "key": batch["key"][i],
                    "error": batch["error"][i], "detail": batch["detail"][i], "notes": json.loads(batch["notes"][i]),
                    "meta": None} for i in range(n)]
        samples: list[dict | None] = [None] * n
        ok = [i for i in range(n) if not records[i]["error"]]
        if ok:
            images = torch.from_numpy(np.stack([batch["pixels"][i] for i in ok])).to(self.device)
            images = images.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, S, S]
            fitted = fit_images(images, self.spec.fit, [int(batch["src_bytes"][i]) for i in ok])
            embeddings = self._teacher(images, fitted)
            for j, i in enumerate(ok):
                result, rec = fitted[j], records[i]
                if isinstance(result, Failure):
                    rec["error"], rec["detail"] = result.reason, result.detail
                    continue
                if embeddings[j] is None and self.teacher is not None:
                    rec["error"], rec["detail"] = "teacher_failed", "the teacher gave no finite embedding"
                    continue
                arr, metrics = result
                rec["meta"] = {**metrics, "source_width": int(batch["src_w"][i]),
                               "source_height": int(batch["src_h"][i]),
                               "source": json.loads(batch["source"][i]) if batch["source"][i] else None}
                # the sample holds what it is; how long it took stays in the record (`_stats`), so a
                # rerun writes the same bytes
                sample = {"__key__": rec["key"], "splats.npy": splats.to_bytes(arr),
                          "json": json.dumps({k: v for k, v in rec["meta"].items() if k != "seconds"},
                                             sort_keys=True).encode()}
                for ext in ("txt", "cls"):
                    if batch[ext][i]:
                        sample[ext] = batch[ext][i]
                if embeddings[j] is not None:
                    buf = io.BytesIO()
                    np.save(buf, embeddings[j], allow_pickle=False)
                    sample["teacher.npy"] = buf.getvalue()
                samples[i] = sample
        out = {"shard": [], "images": [], "fitted": [], "committed": [], "refitted": [], "refused": []}
        for shard, mine in by_shard.items():
            committed, refused = False, ""
            try:
                parts.write_part(self.spec, shard, [records[i] for i in mine],
                                 [samples[i] for i in mine if samples[i] is not None])
                committed = parts.commit_if_complete(self.spec, shard, records[mine[0]]["total"]) is not None
            except storage.LinkError as err:  # planted after the job checked its output: nothing followed
                log.error("part of %s not written: %s", layout.shard_name(shard), err)
                refused = str(err)
            out["shard"].append(shard)
            out["images"].append(len(mine))
            out["fitted"].append(0 if refused else sum(samples[i] is not None for i in mine))
            out["committed"].append(committed)
            out["refitted"].append(refitted[shard])
            out["refused"].append(refused)
        return {"shard": np.array(out["shard"], dtype=object), "images": np.array(out["images"], np.int64),
                "fitted": np.array(out["fitted"], np.int64), "committed": np.array(out["committed"], bool),
                "refitted": np.array(out["refitted"], bool), "refused": np.array(out["refused"], dtype=object)}

    def _claim(self, shard: str, indices: list[int]) -> bool:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None  # None: called outside Ray
        holder = {"node": node, "pid": os.getpid()}
        try:
            return parts.claim(self.spec, shard, [{"index": i} for i in indices], holder)
        except storage.LinkError:  # refused where the part would be written, below
            return False

    def _teacher(self, images: torch.Tensor, fitted: list) -> list[np.ndarray | None]:
        """The teacher's float16 embedding of each fitted image (None where there is none or it is not
        finite); a failing batch is split like a fitting batch."""
        out: list[np.ndarray | None] = [None] * len(images)
        if self.teacher is None:
            return out
        from splatclip.models.backbone import embed_images

        def run(idx: list[int]) -> None:
            emb = embed_images(self.teacher, images[idx]).cpu().numpy().astype(np.float16)  # [b, D]
            for j, i in enumerate(idx):
                out[i] = emb[j] if np.isfinite(emb[j]).all() else None

        todo = [i for i, f in enumerate(fitted) if not isinstance(f, Failure)]
        if todo:
            split_on_failure(run, todo, lambda i, err: log.warning("teacher failed on one image: %s", err))
        return out
