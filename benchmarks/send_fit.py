"""What the device's fit settings cost the cloud's encoder: the demo's 49-Gaussian encoder reading the
same digits fitted as its training splats were (the settings its model file names, which the serve
application hands `splatclip send`) and fitted with send's quick fit (a grid over the frame, 40
iterations, no prefilter: what send did before it asked, and what it does when a service names none).

    make demo && python benchmarks/send_fit.py              # outputs/demo's encoder
    python benchmarks/send_fit.py --root outputs/demo --limit 250

Sets: the demo's held-out digits, scikit-learn's digits and the typeset digits (its data shards), and
the held-out digits under each shift at severity 3 (`splatclip.shifted`), `--limit` of each. Each
digit is fitted both ways in batches of 256 (each image stops on its own; alone, three digits' fits
came out within 0.03 dB of their batched ones) and read zero-shot against the ten digit names, as
the serve application ranks them.

The last line: `send: the encoder's fit X.XXX top-1, the quick fit Y.YYY (Z.ZZx), N digits in K sets`.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from splatclip.cli import QUICK_FIT, describe_fit
from splatclip.datasets import DIGIT_CLASSES
from splatclip.fitting.fitter import fit_batch
from splatclip.fitting.images import clip_crop, decode
from splatclip.models.model_file import model_from_payload, read_payload
from splatclip.models.zeroshot import load_templates
from splatclip.pipelines.layout import view_of
from splatclip.platform.shards import read_samples
from splatclip.platform.specs import FitParams
from splatclip.serve.encoder import Encoder
from splatclip.shifted import SHIFTS, shifted_digits

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
DEMO_SETS = {"test": "held-out digits", "sklearn": "sklearn 8x8 digits", "printed": "printed digits (fonts)"}


def demo_set(root: Path, split: str, limit: int) -> list[dict]:
    samples = [s for p in sorted((root / "data").glob(f"{split}-*.tar")) for s in read_samples(str(p))]
    return samples[:limit]


def as_images(samples: list[dict], cfg: FitParams) -> tuple[torch.Tensor, list[int]]:
    """[B, 3, size, size] in [0, 1] as `send` loads an image file for `cfg`, the labels."""
    images = [clip_crop(decode(s["png"]), cfg.size, **view_of(cfg)) for s in samples]
    return torch.stack(images), [int(s["cls"]) for s in samples]


def read(encoder: Encoder, images: torch.Tensor, labels: list[int], cfg: FitParams) -> tuple[float, float, float]:
    """(top-1 of the encoder on the digits fitted with `cfg`, their mean PSNR, seconds of fitting)."""
    hits, psnr, seconds = 0, [], 0.0
    for start in range(0, len(labels), BATCH):
        began = time.perf_counter()
        result = fit_batch(images[start:start + BATCH], cfg)
        seconds += time.perf_counter() - began
        arrays = [result.splats.encode(i) for i in range(len(result.metrics))]
        answers = encoder.answer(arrays, top_k=1)
        hits += sum(a.classes[0][0] == DIGIT_CLASSES[y] for a, y in zip(answers, labels[start:start + BATCH]))
        psnr += [m["psnr"] for m in result.metrics]
    return hits / len(labels), float(np.mean(psnr)), seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT / "outputs" / "demo"), help="where `make demo` ran")
    ap.add_argument("--limit", type=int, default=500, help="digits of each set at most")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    model_file = root / "runs" / "splat-encoder-g49" / "model.pt"
    if not model_file.exists():
        raise SystemExit(f"{root}: no demo encoder (run `make demo` first)")
    payload = read_payload(str(model_file))
    if not payload.get("fit"):
        raise SystemExit(f"{model_file}: the model names no fit settings (trained by an earlier version: run "
                         "`make demo` again)")
    encoder = Encoder(model_from_payload(payload, str(model_file)), DIGIT_CLASSES, load_templates("digits"))
    trained = FitParams.model_validate(payload["fit"])
    quick = FitParams.model_validate(QUICK_FIT)
    sets = {label: demo_set(root, split, args.limit) for split, label in DEMO_SETS.items()}
    sets.update({f"held-out, {kind}-3": shifted_digits(kind, 3, limit=args.limit) for kind in SHIFTS})
    print(f"the demo's encoder ({model_file}) reading digits fitted two ways, zero-shot top-1")
    print(f"  encoder's fit: {describe_fit(trained)}")
    print(f"  quick fit:     {describe_fit(quick)}")
    print(f"{'test set':<28} {'images':>6} {'encoder fit':>11} {'dB':>6} {'quick fit':>9} {'dB':>6} {'quick/enc':>9}")
    totals = {"trained": 0.0, "quick": 0.0, "n": 0, "s_trained": 0.0, "s_quick": 0.0}
    for label, samples in sets.items():
        top_t, db_t, s_t = read(encoder, *as_images(samples, trained), trained)
        top_q, db_q, s_q = read(encoder, *as_images(samples, quick), quick)
        n = len(samples)
        print(f"{label:<28} {n:>6} {top_t:>11.3f} {db_t:>6.2f} {top_q:>9.3f} {db_q:>6.2f} "
              f"{top_q / top_t:>9.3f}", flush=True)
        totals["trained"] += top_t * n
        totals["quick"] += top_q * n
        totals["n"] += n
        totals["s_trained"] += s_t
        totals["s_quick"] += s_q
    n = totals["n"]
    print(f"fitting time: encoder's fit {totals['s_trained']:.0f} s, quick fit {totals['s_quick']:.0f} s "
          f"({1000 * totals['s_trained'] / n:.1f} and {1000 * totals['s_quick'] / n:.1f} ms a digit, batches of {BATCH})")
    print(f"send: the encoder's fit {totals['trained'] / n:.3f} top-1, the quick fit {totals['quick'] / n:.3f} "
          f"({totals['quick'] / totals['trained']:.2f}x), {n} digits in {len(sets)} sets")


if __name__ == "__main__":
    main()
