"""`splatclip`: the one-machine command line (specs, fitting images, rendering splat files)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import get_args

import yaml

from splatclip.platform.loader import SpecError, load_spec
from splatclip.platform.serialize import public_dict
from splatclip.platform.specs import SPECS, FitParams

log = logging.getLogger("splatclip")
INITS = get_args(FitParams.model_fields["init"].annotation)  # the fitter's initializations, for --init
FRAMES = get_args(FitParams.model_fields["frame"].annotation)  # how a non-square image is made square, for --frame
GROUNDS = get_args(FitParams.model_fields["ground"].annotation)  # what becomes of an image's ground, for --ground
CLUTTERS = get_args(FitParams.model_fields["clutter"].annotation)  # what becomes of ink apart from the digit, for --clutter
STROKES = get_args(FitParams.model_fields["stroke"].annotation)  # what becomes of a heavy pen's strokes, for --stroke


def spec_reference(schema) -> str:
    """A markdown table of every field of a spec: dotted name, type, default, description."""
    from pydantic import BaseModel

    rows = []

    def walk(model, prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = next((a for a in getattr(annotation, "__args__", (annotation,))
                           if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if nested is not None and not str(annotation).startswith("list"):
                walk(nested, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else (
                "(environment)" if field.default_factory is not None and "Secret" in str(annotation)
                else repr(field.get_default(call_default_factory=True)))
            type_name = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append(f"| `{prefix}{name}` | `{type_name}` | `{default}` | {field.description or ''} |")

    walk(schema, "")
    return "| field | type | default | meaning |\n| --- | --- | --- | --- |\n" + "\n".join(rows)


def cmd_spec(args) -> int:
    schema = SPECS[args.job]
    if args.schema:
        print(json.dumps(schema.model_json_schema(), indent=2))
        return 0
    if args.markdown:
        print(spec_reference(schema))
        return 0
    try:
        spec = load_spec(schema, args.file, args.overrides)
    except SpecError as err:
        for line in err.problems:
            print(f"splatclip spec: {line}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(public_dict(spec), sort_keys=False), end="")
    return 0


def _batches(items: list, size: int):
    for s in range(0, len(items), size):
        yield items[s : s + size]


def load_images(command: str, paths: list[str], cfg: FitParams) -> list[tuple]:
    """(path, image [3, size, size], source bytes) of each image that loads, made square and given its
    ground as `cfg` says; each that does not is named on stderr."""
    from splatclip.fitting.images import ImageError, load_file
    from splatclip.pipelines.layout import view_of

    loaded = []
    for path in paths:
        try:
            image, nbytes = load_file(path, cfg.size, **view_of(cfg))
        except (ImageError, OSError) as err:
            print(f"splatclip {command}: {path}: {err}", file=sys.stderr)
            continue
        loaded.append((Path(path), image, nbytes))
    return loaded


def cmd_fit(args) -> int:
    import torch

    from splatclip import splats
    from splatclip.fitting.fitter import fit_batch
    from splatclip.pipelines.layout import view_of

    try:
        cfg = FitParams(
            gaussians=args.gaussians,
            iterations=args.iterations,
            size=args.size,
            prune_tau=args.prune_tau,
            target_psnr=args.target_psnr,
            target_snr=args.target_snr,
            prefilter=args.prefilter,
            coarse=args.coarse,
            backend=args.backend,
            init=args.init,
            frame=args.frame,
            ground=args.ground,
            clutter=args.clutter,
            stroke=args.stroke,
            compile=not args.no_compile,
        )
    except Exception as err:  # pydantic names the field
        print(f"splatclip fit: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_images("fit", args.images, cfg)
    failed = len(args.images) - len(loaded)
    rows = []
    for batch in _batches(loaded, args.batch_size):
        images = torch.stack([b[1] for b in batch])
        result = fit_batch(images, cfg, [b[2] for b in batch], progress=True)
        for i, (path, _, _) in enumerate(batch):
            target = out_dir / (path.stem + splats.SUFFIX)
            meta = {"source": str(path), **view_of(cfg), **result.metrics[i]}
            splats.save(target, result.splats.encode(i), meta)
            rows.append((path.name, result.metrics[i], target))
    if rows:
        width = max([24, *(len(name) for name, _, _ in rows)])  # the name column: each name whole
        print(f"{'image':<{width}} {'PSNR':>9} {'SSIM':>6} {'live':>6} {'bytes':>7} {'x raw':>6} {'x src':>6} {'s/img':>6}")
        for name, m, _ in rows:
            print(
                f"{name:<{width}} {m['psnr']:6.2f} dB {m['ssim']:6.3f} {m['gaussians']:6d} {m['bytes']:7d} "
                f"{m['ratio_raw']:6.1f} {m['ratio_source']:6.1f} {m['seconds']:6.2f}"
            )
    print(f"{len(rows)} fitted, {failed} failed; splat files in {out_dir}")
    return 1 if failed else 0


def cmd_render(args) -> int:
    import torch
    from PIL import Image

    from splatclip import pictures, splats
    from splatclip.cuda import render
    from splatclip.fitting.images import ImageError, clip_crop, decode
    from splatclip.pipelines.layout import view_of

    try:
        arr, meta = splats.load(args.file)
    except (splats.SplatFormatError, OSError) as err:
        print(f"splatclip render: {err}", file=sys.stderr)
        return 1
    h, w = meta.get("height", 224), meta.get("width", 224)
    if args.size:
        scale = args.size / min(h, w)
        h, w = round(h * scale), round(w * scale)
    batch = splats.Splats.from_arrays([arr], h, w)
    with torch.no_grad():
        image = render(batch.params, h, w, batch.mask, args.backend)[0]
    if args.compare:
        try:
            original = clip_crop(decode(Path(args.compare).read_bytes()), min(h, w), **view_of(meta))
        except (ImageError, OSError) as err:
            print(f"splatclip render: {args.compare}: {err}", file=sys.stderr)
            return 1
        if original.shape[-2:] != image.shape[-2:]:
            print(f"splatclip render: --compare needs a square splat image, got {h}x{w}", file=sys.stderr)
            return 1
        picture = pictures.comparison(original, image)
    else:
        picture = pictures.to_uint8(image)
    Image.fromarray(picture).save(args.output)
    print(f"{args.file}: {len(arr)} Gaussians rendered at {h}x{w} -> {args.output}")
    return 0


QUICK_FIT = {"gaussians": 49, "size": 28, "iterations": 40}  # send's fit when the service names none
SEND_OPTIONS = ("gaussians", "size", "iterations", "init", "prefilter", "target_psnr", "target_snr", "frame", "ground",
                "clutter", "stroke")


def describe_fit(cfg: FitParams) -> str:
    targets = [f"{v:g} dB {what}" for v, what in ((cfg.target_psnr, "PSNR"), (cfg.target_snr, "of signal")) if v]
    view = [w for w, on in (("padded square", cfg.frame == "pad"), ("square around the ink", cfg.frame == "ink"),
                            ("ground to black", cfg.ground == "black"),
                            ("clutter dropped", cfg.clutter == "drop"), ("heavy pens thinned", cfg.stroke == "thin")) if on]
    view = f" ({', '.join(view)})" if view else ""
    return (f"{cfg.gaussians} Gaussians at {cfg.size}x{cfg.size}{view}, init {cfg.init}, prefilter {cfg.prefilter:g}, "
            f"{'up to ' if targets else ''}{cfg.iterations} iterations{' to ' + ' and '.join(targets) if targets else ''}")


def send_fit(args) -> tuple[FitParams, str]:
    """The fit settings `send` fits with, and where they came from: the service's (a GET of --url names
    how its encoder's training splats were fitted), or QUICK_FIT where it names none; each option given
    replaces its setting. ConnectionError when the service cannot be asked, ValueError for a bad option."""
    from pydantic import ValidationError

    from splatclip.pipelines.layout import SPEED_ONLY
    from splatclip.serve.client import recipe

    def usable(settings: dict) -> dict:  # this version's fit settings, less how fast they run
        return {k: v for k, v in settings.items() if k in FitParams.model_fields and k not in SPEED_ONLY}

    try:
        status, answer = recipe(args.url, timeout=args.timeout)
    except OSError as err:  # refused, unreachable, timed out
        raise ConnectionError(f"{args.url}: {err}") from None
    if status == 401:
        raise ConnectionError(f"{args.url}: HTTP 401: {answer.get('error', answer)}")
    fit = answer.get("fit") if status == 200 and isinstance(answer, dict) else None
    base, source = QUICK_FIT, f"a quick fit: the service names no fit settings (HTTP {status})"
    if isinstance(fit, dict):
        try:
            base = FitParams.model_validate(usable(fit)).model_dump(exclude=SPEED_ONLY)
            source = "as the encoder's training splats were fitted"
        except ValidationError as err:
            source = f"a quick fit: the service's fit settings are not this version's ({str(err).splitlines()[0]})"
    given = {k: getattr(args, k) for k in SEND_OPTIONS if getattr(args, k) is not None}
    try:
        cfg = FitParams.model_validate({**base, **given, "compile": not args.no_compile})
    except ValidationError as err:  # pydantic names the field
        raise ValueError(str(err)) from None
    return cfg, source + (f"; {', '.join(sorted(given))} as given" if given else "")


def cmd_send(args) -> int:
    """Fit the images on this machine (in batches) as the service says its encoder's training splats
    were fitted, POST each splat file to the serve application, print the answer and the bytes sent
    against the image's PNG and JPEG."""
    import torch

    from splatclip import splats
    from splatclip.fitting.fitter import fit_batch

    try:
        cfg, how = send_fit(args)
    except (ConnectionError, ValueError) as err:
        print(f"splatclip send: {err}", file=sys.stderr)
        return 1 if isinstance(err, ConnectionError) else 2
    print(f"fitting {describe_fit(cfg)}: {how}")
    loaded = load_images("send", args.images, cfg)
    failed = len(args.images) - len(loaded)
    width = max([24, *(len(path.name) for path, _, _ in loaded)])  # the name column: each name whole
    print(f"{'image':<{width}} {'PSNR':>9} {'sent':>7} {'PNG':>7} {'JPEG':>7} {'source':>8}  answer")
    for batch in _batches(loaded, args.batch_size):
        result = fit_batch(torch.stack([b[1] for b in batch]), cfg)  # each image stops on its own
        failed += sum(send_one(args, path, image, source, splats.to_bytes(result.splats.encode(i)), result.metrics[i],
                               width)
                      for i, (path, image, source) in enumerate(batch))
    return 1 if failed else 0


def send_one(args, path: Path, image, source: int, data: bytes, metrics: dict, width: int) -> bool:
    """POST one image's splat file and print its line (the name in a column `width` wide); True when it
    failed (named on stderr)."""
    from splatclip.serve.client import describe, encoded_sizes, post

    try:
        status, answer = post(args.url, data, timeout=args.timeout)
    except OSError as err:  # refused, unreachable, timed out
        print(f"splatclip send: {path}: {args.url}: {err}", file=sys.stderr)
        return True
    if status != 200:
        print(f"splatclip send: {path}: HTTP {status}: {answer.get('error', answer)}", file=sys.stderr)
        return True
    sizes = encoded_sizes(image)
    print(f"{path.name:<{width}} {metrics['psnr']:6.2f} dB {len(data):7d} {sizes['PNG']:7d} {sizes['JPEG']:7d} "
          f"{source:8d}  {describe(answer)}", flush=True)
    return False


def cmd_cluster(args) -> int:
    from splatclip.platform import local_cluster

    if args.action == "down":
        print(f"local cluster in {args.dir}: {local_cluster.down(args.dir)} processes ended")
        return 0
    try:
        cluster = local_cluster.up(args.config, args.dir, args.idle_minutes) if args.action == "up" \
            else local_cluster.load(args.dir)
    except (OSError, RuntimeError, KeyError) as err:
        print(f"splatclip cluster {args.action}: {err}", file=sys.stderr)
        return 1
    for key, value in cluster.env.items():
        print(f"export {key}={value}")
    print(f"# dashboard {cluster.dashboard}; jobs: ray job submit -- python $PWD/jobs/fit.py SPEC")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splatclip", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spec", help="validate a job spec, or print its JSON schema")
    p.add_argument("job", choices=sorted(SPECS))
    p.add_argument("file", nargs="?")
    p.add_argument("--schema", action="store_true", help="print the JSON schema")
    p.add_argument("--markdown", action="store_true", help="print the field reference as a markdown table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("fit", help="fit images into splat files")
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output", required=True, help="directory for NAME.splats.npy + NAME.json")
    p.add_argument("--gaussians", type=int, default=400)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--init", choices=INITS, default=FitParams.model_fields["init"].default,
                   help="ink: the grid over the box of an image's ink on black (digits, drawings)")
    p.add_argument("--prefilter", type=float, default=FitParams.model_fields["prefilter"].default,
                   help="fit each image blurred by this share of its grid's square (fit.prefilter; the metrics stay "
                   "against the image)")
    p.add_argument("--frame", choices=FRAMES, default=FitParams.model_fields["frame"].default,
                   help="pad: an image that is not square is padded to a square with its ground, not cropped (digits); "
                   "ink: padded, then cut to the square around its ink where the ink is small in a large image")
    p.add_argument("--ground", choices=GROUNDS, default=FitParams.model_fields["ground"].default,
                   help="black: bring the image's ground to black and its ink to light (dark ink on paper is inverted)")
    p.add_argument("--clutter", choices=CLUTTERS, default=FitParams.model_fields["clutter"].default,
                   help="drop: set ink apart from the digit to black (a neighbour's cut fragment at the left or right "
                   "edge, a form's rule or box, specks; light ink on a dark ground: with --ground black, any)")
    p.add_argument("--stroke", choices=STROKES, default=FitParams.model_fields["stroke"].default,
                   help="thin: thin the strokes of a digit drawn with a heavier pen than MNIST's (light ink on a dark "
                   "ground: with --ground black, any)")
    p.add_argument("--prune-tau", type=float, default=0.0)
    p.add_argument("--target-psnr", type=float, help="stop each image at this PSNR (dB); --iterations is a ceiling")
    p.add_argument("--target-snr", type=float, help="stop each image once its error is this many dB under its own "
                   "signal (with --target-psnr: once it reaches both)")
    p.add_argument("--coarse", type=int, default=FitParams.model_fields["coarse"].default, help="iterations at half "
                   "size first, coarse to fine (at most five sixths of --iterations; 0: none)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-compile", action="store_true", help="render eagerly, without the kernels compiled for this machine (slower steps)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("send", help="fit images here and send their splats to the serve application")
    p.add_argument("images", nargs="+")
    p.add_argument("--url", required=True, help="the application's URL (jobs/serve.py prints it); a bearer token "
                   "is read from $SPLATCLIP_SERVE_TOKEN")
    fitting = p.add_argument_group("fit settings", "by default those the service names (a GET of --url: how its "
                                   "encoder's training splats were fitted), else 49 Gaussians at 28x28 in 40 "
                                   "iterations; each option given replaces its setting")
    fitting.add_argument("--gaussians", type=int)
    fitting.add_argument("--size", type=int)
    fitting.add_argument("--iterations", type=int)
    fitting.add_argument("--target-psnr", type=float, help="stop fitting at this PSNR (dB); --iterations is a ceiling")
    fitting.add_argument("--target-snr", type=float, help="stop fitting once the error is this many dB under the "
                         "image's own signal (with --target-psnr: once it reaches both)")
    fitting.add_argument("--init", choices=INITS)
    fitting.add_argument("--prefilter", type=float, help="fit each image blurred by this share of its grid's square")
    fitting.add_argument("--frame", choices=FRAMES, help="pad: an image that is not square is padded to a square "
                         "with its ground, not cropped; ink: padded, then cut to the square around its ink where the "
                         "ink is small in a large image")
    fitting.add_argument("--ground", choices=GROUNDS, help="black: bring the image's ground to black and its ink to "
                         "light (dark ink on paper is inverted)")
    fitting.add_argument("--clutter", choices=CLUTTERS, help="drop: set ink apart from the digit to black (a "
                         "neighbour's cut fragment at the left or right edge, a form's rule or box, specks)")
    fitting.add_argument("--stroke", choices=STROKES, help="thin: thin the strokes of a digit drawn with a heavier "
                         "pen than MNIST's (light ink on a dark ground: with --ground black, any)")
    p.add_argument("--batch-size", type=int, default=64, help="images fitted together in one optimizer step")
    p.add_argument("--no-compile", action="store_true", help="render eagerly, without the kernels compiled for this "
                   "machine (slower steps)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("render", help="render a splat file to PNG")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--size", type=int, help="short side in pixels (default: the fitted size)")
    p.add_argument("--compare", metavar="IMAGE", help="write original | render | error heat map (the original made "
                   "square, grounded, cleared and stroked as the splat file's fit did: cropped, padded with --frame pad "
                   "(and cut to its ink with --frame ink); "
                   "with --ground black, its ground at black; with --clutter drop, ink apart from the digit dropped; "
                   "with --stroke thin, a heavy pen thinned)")
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("cluster", help="run cluster.yaml's node types on this machine (Ray's fake multi-node "
                       "autoscaler); `up` and `env` print the exports that point Ray at it")
    p.add_argument("action", choices=["up", "env", "down"])
    p.add_argument("--config", default="cluster.yaml", help="the cluster launcher config whose node types to run")
    p.add_argument("--dir", default=".cluster", help="the local cluster's directory (state, logs, token)")
    p.add_argument("--idle-minutes", type=float, default=0.1, help="a worker node idle this long is removed")
    p.set_defaults(func=cmd_cluster)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
