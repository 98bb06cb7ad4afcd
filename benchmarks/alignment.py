"""Shift robustness of the demo's recipe: the RGB teacher and the splat encoders at both compression
points on digits from elsewhere, over several seeds.

    python benchmarks/alignment.py                   # 3 seeds, the demo's full size (about 30 min on 2 cores)
    python benchmarks/alignment.py --seeds 1 --small # a quick look

Each seed trains the demo's recipe (examples/demo: teacher, fits, students) in ROOT/seedS, with the
teacher and the students seeded S; the data and the fits do not depend on the seed, so seed 0's are
copied to the others, and the fit jobs find them committed. Every test set is fitted and evaluated
at both points: the held-out digits, scikit-learn's, the typeset ones (`splatclip.shifted.printed_digits`)
and the held-out digits under each of `splatclip.shifted`'s shifts at severities 1-3 (among them
`combined`, a pen, a size, a rotation and a shift at once, and `bent`, an elastic distortion of the
shape, as another writer's hand). The table gives
mean +- sd of zero-shot top-1 over the seeds; ROOT/alignment.png plots accuracy against severity for
each shift (RGB and both points). The worst shifted set is the one where the teacher's mean is
lowest (everything but the held-out digits is a shifted set). Last line:
`worst shifted set: RGB X.XXX +- s, splats Y.YYY +- s (Z.ZZx)` (splats at the first point).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "demo"))

import demo  # noqa: E402  (the demo's recipe, from its directory)
from splatclip import shifted  # noqa: E402

SETS = ["test", "sklearn", "printed", *(f"{k}-{s}" for k in shifted.SHIFTS for s in (1, 2, 3))]


def run_seed(root: Path, size: str, seed: int, first: Path | None) -> dict:
    """The recipe with seed `seed` in ROOT: {(set, point): top-1 of the splat encoder, and "rgb"}."""
    root.mkdir(parents=True, exist_ok=True)
    if first is not None:
        for part in ("data", "splats"):
            if not (root / part).exists():
                shutil.copytree(first / part, root / part)
    os.chdir(root)
    recipe = demo.Demo(root, size, seed, SETS, {n: SETS for n in demo.POINTS})
    began = time.perf_counter()
    for step in (recipe.data, recipe.teacher, recipe.fit, recipe.students):
        step()
    results = recipe.evaluate()
    ray.shutdown()  # the next seed's Ray starts in its own directory, where its specs' paths point
    top1 = {(split, n): r["splat"]["top1"] for (split, n), r in results.items()}
    top1.update({(split, "rgb"): results[(split, demo.POINTS[0])]["rgb"]["top1"] for split in SETS})
    print(f"seed {seed}: {time.perf_counter() - began:.0f} s, {recipe.samples['test']} held-out digits, "
          f"{recipe.samples['printed']} per other set", flush=True)
    return top1


def table(runs: list[dict], say=print) -> None:
    """Mean +- sd over the seeds for each set; then the worst shifted set's line."""
    def stat(split, column) -> tuple[float, float]:
        values = np.array([r[(split, column)] for r in runs])
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    first, second = demo.POINTS
    say(f"\nshift robustness: the demo's recipe, {len(runs)} seed(s), zero-shot top-1 (mean +- sd)")
    say(f"{'test set':<14} {'RGB':>15} {f'splats {first}':>15} {'/RGB':>6} {f'splats {second}':>15} {'/RGB':>6}")
    for split in SETS:
        rgb = stat(split, "rgb")
        row = f"{split:<14} {rgb[0]:>7.3f} +- {rgb[1]:.3f}"
        for n in (first, second):
            s = stat(split, n)
            row += f" {s[0]:>7.3f} +- {s[1]:.3f} {s[0] / max(rgb[0], 1e-9):>6.2f}"
        say(row)
    worst = min(SETS[1:], key=lambda split: stat(split, "rgb")[0])
    (rgb, rgb_sd), (spl, spl_sd) = stat(worst, "rgb"), stat(worst, first)
    ratios = {split: stat(split, first)[0] / max(stat(split, "rgb")[0], 1e-9) for split in SETS[1:]}
    low = min(ratios, key=ratios.get)
    say(f"lowest splats/RGB at {first} Gaussians: {ratios[low]:.3f} ({low}); worst set for the teacher: {worst}")
    say(f"worst shifted set: RGB {rgb:.3f} +- {rgb_sd:.3f}, splats {spl:.3f} +- {spl_sd:.3f} ({spl / max(rgb, 1e-9):.2f}x)")


def picture(runs: list[dict], path: Path) -> None:
    """Top-1 against severity (0: the held-out digits as they are), one panel per shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2
    fig, axes = plt.subplots(rows, -(-len(shifted.SHIFTS) // rows), figsize=(14, 6), sharey=True, squeeze=False)
    for ax in axes.flat[len(shifted.SHIFTS):]:
        ax.axis("off")
    for ax, kind in zip(axes.flat, shifted.SHIFTS):
        sets = ["test", *(f"{kind}-{s}" for s in (1, 2, 3))]
        for column, label in (("rgb", "RGB teacher"), *((n, f"splats, {n} Gaussians") for n in demo.POINTS)):
            values = np.array([[r[(split, column)] for split in sets] for r in runs])  # [seeds, 4]
            ax.errorbar(range(4), values.mean(0), yerr=values.std(0), marker="o", capsize=3, label=label)
        ax.set_title(kind)
        ax.set_xticks(range(4))
        ax.set_xlabel("severity")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("zero-shot top-1")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Accuracy against shift severity (mean and sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="outputs/alignment")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the demo's reduced size")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    root = Path(args.root).resolve()
    demo.quiet_ray()
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(root / f"seed{seed}", "small" if args.small else "full", seed,
                             root / "seed0" if seed else None))
        (root / "top1.json").write_text(json.dumps([{f"{k[0]}@{k[1]}": v for k, v in r.items()} for r in runs]))
    picture(runs, root / "alignment.png")
    print(f"picture: {root / 'alignment.png'}")
    table(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
