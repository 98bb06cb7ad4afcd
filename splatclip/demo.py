"""`make demo`: validate the example job specs and say what each job would do."""

from __future__ import annotations

import sys
from pathlib import Path

from splatclip.platform.specs import KINDS, EvalSpec, FitSpec, SpecError, TrainSpec, load_spec

SPECS = Path(__file__).resolve().parents[1] / "jobs" / "specs"


def describe(spec) -> str:
    if isinstance(spec, FitSpec):
        f = spec.fit
        return (f"fit {spec.input} -> {spec.output}: {f.gaussians} Gaussians x {f.iterations} iterations at "
                f"{f.size}px, batches of {spec.batch_size} on {spec.ray.actors} actor(s), backend {f.backend}")
    if isinstance(spec, TrainSpec):
        stages = ", ".join(f"{s.kind} {s.epochs:g} ep" for s in spec.stages)
        return (f"train {spec.model.encoder} encoder on {spec.model.name} from {spec.data} "
                f"({stages}) on {spec.ray.actors} worker(s), checkpoints in {spec.storage_path}/{spec.name}")
    assert isinstance(spec, EvalSpec)
    return f"evaluate {spec.checkpoint} zero-shot on {spec.data} -> {spec.output}"


def main() -> int:
    failed = 0
    for path in sorted(SPECS.glob("*.yaml")):
        try:
            spec = load_spec(KINDS[path.name.split(".")[0]], path)
        except SpecError as err:
            failed += 1
            print(f"{path.name}: INVALID\n  " + "\n  ".join(err.problems))
            continue
        print(f"{path.name}: {describe(spec)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
