"""Job specs: the pydantic v2 models of every job, on one page (`loader` reads them from YAML with
`--set a.b=value` overrides; `serialize` turns them into what a tracking run records).

A spec is the whole description of a job. Every model forbids unknown keys, so a typo is an error
naming the dotted field, never a silently ignored setting. Secrets are `SecretStr`: they print as
asterisks and `serialize.public_dict` drops them before anything is logged; credentials inside URLs
are redacted there and in every error line. Non-finite floats and absurd sizes are refused, so what
a job starts with is something it can finish.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

Backend = Literal["auto", "torch", "torch-dense", "triton", "gsplat"]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def _env_secret(*names: str):
    def read() -> SecretStr | None:
        for name in names:
            if os.environ.get(name):
                return SecretStr(os.environ[name])
        return None

    return read


class StorageSpec(Model):
    """How to reach object storage. Empty fields fall back to the usual AWS environment variables."""

    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, moto, R2); empty for AWS itself.",
    )
    region: str | None = Field(default_factory=lambda: os.environ.get("AWS_DEFAULT_REGION"))
    access_key_id: SecretStr | None = Field(default_factory=_env_secret("AWS_ACCESS_KEY_ID"))
    secret_access_key: SecretStr | None = Field(default_factory=_env_secret("AWS_SECRET_ACCESS_KEY"))
    anon: bool = False
    # What a failing request costs before the job stops (README "When storage fails"). botocore
    # retries each request (throttling, 5xx, resets, timeouts) up to `max_attempts` times with
    # exponential backoff; s3fs repeats a whole call up to `call_attempts` times for what botocore
    # cannot see (a response body that ends early). An outage ends a call after at most
    # call_attempts x max_attempts requests, 20-40 s with the defaults.
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore's retry mode; 'adaptive' also slows the client down while S3 throttles "
        "(503 SlowDown), for many actors writing under one prefix.")
    max_attempts: int = Field(5, ge=1, le=20, description="botocore's attempts per request, the first included.")
    call_attempts: int = Field(5, ge=1, le=10, description="s3fs's attempts per call (a read whose body ends early).")
    connect_timeout: float = Field(5.0, gt=0, le=300, description="Seconds to open a connection to storage.")
    read_timeout: float = Field(30.0, gt=0, le=3600, description="Seconds without a byte from storage before a "
                                "request counts as failed (and is retried).")
    shared_filesystem: bool = Field(False, description="Local paths are on a filesystem every Ray node mounts (NFS, "
                                    "EFS); without it a job on a cluster of several nodes refuses local paths.")


# the field `tracking.register` shares its name with ABCMeta.register, which pydantic warns of; a spec
# field is what it is meant to be
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingSpec" shadows', category=UserWarning)


class TrackingSpec(Model):
    enabled: bool = True
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (a server or sqlite:///file).")
    experiment: str = "splatclip"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    parent: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:-]{0,127}$", description="Group the run "
                               "under a parent run of this name in the experiment (the newest one, made when there is "
                               "none), as `make demo` and the local specs group their jobs' runs.")
    register: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Train: log the "
                                 "trained splat encoder as an MLflow model that ranks the spec's `classes`, and "
                                 "register it under this name (a new version each run); `jobs/serve.py` serves "
                                 "models:/NAME/VERSION.")
    system_metrics: float = Field(10.0, ge=0, le=86_400, description="Seconds between samples of CPU, memory and "
                                  "GPU use (MLflow system metrics) where the job computes; 0 turns them off.")


class RaySpec(Model):
    address: str | None = Field(None, description="Cluster to join; RAY_ADDRESS wins when set.")
    num_cpus: int | None = Field(
        None, ge=1, le=65_536, description="Logical CPUs of a local Ray; default the cores, and at least the "
        "actor pool's CPUs plus one so actors cannot starve reads."
    )
    actors: int = Field(1, ge=1, le=10_000, description="Size of the actor pool (fitting actors or training workers).")
    max_actors: int | None = Field(None, ge=1, le=10_000, description="Autoscale the pool up to this size.")
    cpus_per_actor: float = Field(0.5, gt=0, le=1024)
    gpus_per_actor: float = Field(0.0, ge=0, le=64)
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each actor asks for: "
                                        "node markers that keep it on a node type (cluster.yaml); one that no node "
                                        "type offers is dropped, so the spec also runs on a laptop.")
    autoscaler_config: str | None = Field(None, description="The cluster's autoscaler config, whose node types the "
                                          "job's requests are checked against before it starts; default "
                                          "$SPLATCLIP_AUTOSCALER_CONFIG, else ~/ray_bootstrap_config.yaml (what `ray "
                                          "up` writes on the head), else the nodes alive now.")

    @model_validator(mode="after")
    def _resources(self) -> "RaySpec":
        bad = [k for k, v in self.resources.items() if k in ("CPU", "GPU", "memory") or not 0 < v <= 1e6]
        if bad:
            raise ValueError(f"resources: {', '.join(bad)}: custom resources only (cpus_per_actor, gpus_per_actor "
                             "for CPU and GPU), each above 0")
        return self


# A token amount: the marker steers an actor to a node type; GPUs and CPUs decide how many share a node.
MARKER = 0.001


class FitRaySpec(RaySpec):
    resources: dict[str, float] = Field(default_factory=lambda: {"fit_node": MARKER}, description="Custom Ray "
                                        "resources each fitting actor asks for (cluster.yaml's fit_node keeps it "
                                        "on fit_gpu nodes); one no node type offers is dropped.")


class TrainRaySpec(RaySpec):
    resources: dict[str, float] = Field(default_factory=lambda: {"train_node": MARKER}, description="Custom Ray "
                                        "resources each training worker asks for (cluster.yaml's train_node keeps "
                                        "it on train_gpu nodes); one no node type offers is dropped.")


PIL_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb guard (Image.MAX_IMAGE_PIXELS)
ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]


class ShardLimits(Model):
    """What a shard may hold before a member (or the rest of the shard) is refused and recorded.
    Crawled data is untrusted: every size here is checked before the bytes are read or decoded."""

    max_member_bytes: int = Field(64 << 20, ge=1024, le=4 << 30,
                                  description="Largest member read (its declared size, sparse members expanded).")
    max_metadata_bytes: int = Field(1 << 20, ge=64, le=64 << 20, description="Largest .txt, .cls or .json member.")
    max_shard_bytes: int = Field(8 << 30, ge=1 << 16, le=1 << 40,
                                 description="Tar bytes read from one shard (after decompression); the rest is "
                                 "recorded as lost.")
    max_shard_samples: int = Field(100_000, ge=1, le=10_000_000,
                                   description="Samples read from one shard; the rest is recorded as lost.")
    max_image_pixels: int = Field(PIL_MAX_PIXELS, ge=64, le=PIL_MAX_PIXELS,
                                  description="Larger images are refused before decoding (at most PIL's own guard).")
    max_aspect_ratio: float = Field(20.0, ge=1, le=1000, description="Longer side over shorter side; beyond it an "
                                    "image is refused.")
    image_formats: list[ImageFormat] = Field(["JPEG", "PNG", "WEBP"], min_length=1,
                                             description="Image formats decoded (whatever a member's extension says).")
    max_gaussians: int = Field(65_536, ge=1, le=1 << 20, description="Training and evaluation skip splat samples "
                               "with more Gaussians.")


DEFAULT_LIMITS = ShardLimits()


class FitParams(Model):
    """The batched fitter's settings (docs/method.md, 'Fitting')."""

    gaussians: int = Field(400, ge=1, le=1 << 18, description="Gaussians per image, N.")
    iterations: int = Field(2000, ge=0, le=1_000_000)
    size: int = Field(224, ge=16, le=4096, description="Images are made square (`frame`) and resized to size x size; "
                      "at least 16 (SSIM's window).")
    frame: Literal["crop", "pad", "ink"] = Field("crop", description="How an image that is not square is made square: "
                                                 "crop, the center square of its short side (CLIP's framing, for "
                                                 "photos); pad, the whole image centered on a square of its long side "
                                                 "filled with its ground (the median of its border), so a digit cut "
                                                 "out taller than it is wide keeps all its ink; ink, as pad, and then, "
                                                 "where the ink (what departs from the ground) fills under 0.6 of the "
                                                 "square's side and the square is larger than `size`, the square "
                                                 "around the ink that it fills 0.6 of (none smaller than `size`), so "
                                                 "a digit written small on a large page or scan keeps its pixels "
                                                 "through the resize. The RGB model that evaluates or distils from "
                                                 "the source images frames them as their splats were.")
    ground: Literal["keep", "black"] = Field("keep", description="black: after `frame`, bring each image's ground "
                                             "(the median of its border) to black and its ink to light, the ground's "
                                             "own noise (3 robust sd of its border) under black: an image on a light "
                                             "ground (dark ink on paper) is inverted, so digits written on paper read "
                                             "as the light-on-black digits a model trained on MNIST knows, and ink on "
                                             "a clean black ground stays as it is; keep: as it is (photos). The RGB "
                                             "model that evaluates or distils from the source images reads them so "
                                             "too.")
    clutter: Literal["keep", "drop"] = Field("keep", description="drop: after `ground`, ink apart from the digit "
                                             "is set to black (the digit: the piece of ink, 8-connected, with the most "
                                             "ink weighted by nearness to the center): a form's line (a run along a "
                                             "row 0.75 of the side long, at most 2/28 of it thick, reaching past the "
                                             "digit at both ends, even where the digit touches it), a piece that a "
                                             "neighbour's cut left on the left or right edge beside the digit, a box "
                                             "around the digit, and specks (pieces apart from the digit by 0.1 of the "
                                             "side with under 0.15 of its ink). Other ink touching the digit stays. "
                                             "Light ink on a dark ground only (digits on black, or any with ground "
                                             "black). keep: as it is (photos). The RGB model that evaluates or distils "
                                             "from the source images reads them so too.")
    stroke: Literal["keep", "thin"] = Field("keep", description="thin: after `clutter`, an image drawn with a pen "
                                            "heavier than 95% of MNIST's digits (its strokes' mean width, twice its "
                                            "ink over its outline's length, over 3.64/28 of the side) has its strokes "
                                            "thinned toward MNIST's median pen (2.54/28 of the side) by one grey "
                                            "erosion of half the excess a side; other images stay as they are. It "
                                            "thins light ink on a dark ground (digits on black, or any with ground "
                                            "black); an image on a light ground is left as it is. keep: as they are "
                                            "(photos). The RGB model that evaluates or "
                                            "distils from the source images reads them so too.")
    init: Literal["structured", "ink", "random"] = Field("structured", description="structured: a grid of Gaussians "
                                                         "over the frame, colored by its cells; ink: that grid over "
                                                         "the box holding the ink of an image on black (digits, "
                                                         "drawings), so a smaller digit gets as many Gaussians; "
                                                         "random: uniform positions and colors.")
    lr_position: float = Field(0.04, gt=0, le=100, description="Adam learning rate for x, y, in grid cells per step.")
    lr_cholesky: float = Field(0.02, gt=0, le=100, description="Adam learning rate for l11, l21, l22, in grid cells.")
    lr_color: float = Field(0.01, gt=0, le=100)
    color_l1: float = Field(1e-6, ge=0, le=1e3, description="lambda of the L1 penalty on colors.")
    prune_tau: float = Field(0.0, ge=0, le=10, description="Luminance threshold; 0 disables pruning (paper: 0.05).")
    target_psnr: float | None = Field(None, gt=0, le=120, description="Stop an image once it reaches this PSNR (at "
                                      "full size); `iterations` is then a ceiling. A stopped image leaves the batch.")
    target_snr: float | None = Field(None, gt=0, le=120, description="Stop an image once its error is this many dB "
                                     "under its own signal (its mean square over the MSE, at full size): an image with "
                                     "less ink (a digit drawn smaller, thinner or fainter) is then fitted as closely to "
                                     "its ink as one with more, where a PSNR target stops it almost at once. With "
                                     "target_psnr, an image stops once it reaches both.")
    prefilter: float = Field(0.0, ge=0, le=0.5, description="Fit each image blurred by a Gaussian whose sigma is this "
                             "fraction of the side of the square its grid is laid over (the frame; with init: ink, "
                             "the box that holds its ink); 0: as it is. The edges a few Gaussians cannot hold "
                             "(one-bit ink, sharp resampling) are smoothed before fitting, so that a source's edges do "
                             "not change what the splats are. The targets are measured against the blurred image, "
                             "the reported PSNR and SSIM against the image itself (docs/method.md, 'Fitting').")
    coarse: int = Field(300, ge=0, le=1_000_000, description="Iterations rendered at half of `size` before full "
                        "size, coarse to fine (at most five sixths of `iterations`; none where half the size is under "
                        "32 px); 0: every iteration at full size.")
    backend: Backend = "auto"
    compile: bool = Field(True, description="Run the CPU renderer's kernels compiled for the machine (built once into "
                          "$SPLATCLIP_KERNELS, about 30-60 s, then loaded in milliseconds); false: eagerly.")
    seed: int = 0


class TeacherSpec(Model):
    model: str = Field(..., description="open_clip model name, or a path/URL to a model config JSON.")
    pretrained: str | None = Field(None, description="open_clip tag, local checkpoint or s3:// URL.")


class FitSpec(Model):
    input: str = Field(..., min_length=1, description="Source shards: brace pattern of tar URLs (local, s3:// or "
                       "examples://); a URL listed twice is read once.")
    output: str = Field(..., min_length=1, description="Directory URL for the splat shards (local or s3://).")
    fit: FitParams = Field(default_factory=FitParams)
    batch_size: int = Field(16, ge=1, le=65_536, description="Images fitted together in one optimizer step.")
    teacher: TeacherSpec | None = None
    max_failed_fraction: float = Field(0.01, ge=0, le=1, description="Failure budget (images, and shards) before "
                                       "the job exits non-zero.")
    limits: ShardLimits = Field(default_factory=ShardLimits)
    overwrite: bool = Field(False, description="Refit every shard into an output written with other fit settings "
                            "(its shards are deleted first); without it such an output stops the job.")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    ray: FitRaySpec = Field(default_factory=FitRaySpec)


class ModelSpec(Model):
    name: str = Field("ViT-B-16", description="open_clip model name, a config in splatclip/models/configs "
                      "(demo-vit), or a path to a model config JSON.")
    pretrained: str | None = None
    encoder: Literal["splat", "rgb"] = "splat"
    latents: int = Field(196, ge=1, le=4096, description="Perceiver latent tokens fed to the backbone.")
    resampler_layers: int = Field(4, ge=1, le=64)
    resampler_width: int = Field(448, ge=8, le=16_384, description="Width inside the resampler (projected to the ViT's).")
    fourier_bands: int = Field(8, ge=1, le=64)
    canonical_spread: float | None = Field(
        None, gt=0, le=0.5, description="Show the model each image (or splat set) moved and zoomed so that its ink is "
        "centered with this spread (the ink's standard deviation along its major axis, in image sides; 0.21 for "
        "MNIST's digits): for centered objects on a dark ground, such as digits. Exact on splats, from their "
        "moments. None: inputs as they are.")
    canonical_deskew: float = Field(
        0.0, ge=0, le=1, description="With canonical_spread: the share (0-1) of each input's slant to undo (a "
        "shear of x along y, at most 45 degrees, which at 1 makes the ink's x uncorrelated with its y), so that italic "
        "and slanted strokes stand upright. Exact on splats.")
    canonical_level: float | None = Field(
        None, gt=0, le=1, description="Show the model each image (or splat set) with its colors scaled so that its "
        "ink's level (the intensity-weighted mean intensity: the integral of I^2 over that of I) is this one (0.85 for "
        "MNIST's digits; the gain kept within 1/4-4): faint and bold inks alike, for objects on a dark ground. Exact on "
        "splats, from their pairs of Gaussians (O(N^2) per sample). None: colors as they are.")

    @model_validator(mode="after")
    def _deskew_needs_framing(self):
        if self.canonical_deskew and self.canonical_spread is None:
            raise ValueError("model.canonical_deskew is a part of the framing: set model.canonical_spread too")
        return self


class StageSpec(Model):
    kind: str = Field(..., pattern=r"^[a-z][a-z0-9_]{0,63}$", description="The stage's objective, by its registered "
                      "name (`splatclip.models.objectives`): distill or contrastive.")
    epochs: float = Field(1.0, gt=0, le=100_000)
    lr: float = Field(1e-4, gt=0, le=10)
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    unfreeze_blocks: int = Field(0, ge=0, le=1000, description="First k backbone blocks that train in this stage.")
    options: dict[str, Any] = Field(default_factory=dict, description="The objective's own settings, checked "
                                    "against it before the job starts (distill: normalize).")


class TrainSpec(Model):
    data: str = Field(..., min_length=1, description="Splat shards (or image shards for encoder=rgb): brace pattern "
                      "(local, s3:// or examples://).")
    storage_path: str = Field("outputs/train", description="Where Ray Train keeps checkpoints (local or s3://).")
    name: str = Field("splatclip-train", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                      description="Run name (letters, digits, '.', '_', '-'); rerunning with the same name resumes.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    stages: list[StageSpec] = Field(default_factory=lambda: [StageSpec(kind="contrastive")], max_length=100)
    batch_size: int = Field(64, ge=1, le=65_536, description="Per-worker batch size.")
    grad_accum: int = Field(1, ge=1, le=4096)
    weight_decay: float = Field(0.05, ge=0, le=10)
    grad_clip: float = Field(1.0, gt=0, le=1e6)
    positives: Literal["caption", "class"] = Field(
        "caption", description="Contrastive positives: pairs with the same caption, or with the same class id "
        "(.cls; every caption of a class then matches every image of it, as in UniCL); a sample with no class id "
        "falls back to its caption.")
    loader_workers: int = Field(2, ge=0, le=64, description="Loader processes per training worker that decode, check "
                                "and tokenize samples ahead of the step (0: in the training process); the sample "
                                "order is the same for any number.")
    loader_cache_mb: int = Field(1024, ge=0, le=1 << 20, description="MiB of decoded samples a training worker keeps "
                                 "once it has read an epoch whole: a later epoch whose shards it holds is drawn from "
                                 "memory in the same order, with no shard read or decoded again (0: every epoch is read "
                                 "anew). A share that outgrows it is read every epoch.")
    checkpoint_every: int = Field(100, ge=1, description="Optimizer steps between checkpoints.")
    max_failures: int = Field(2, ge=0, le=1000, description="Worker failures Ray Train recovers from.")
    images: str | None = Field(
        None, description="The source image shards of `data` (same shard names and keys): distill stages then "
        "match the teacher's embeddings of these images, computed on the workers, not embeddings stored in the shards.")
    teacher: TeacherSpec | None = Field(
        None, description="The RGB model that embeds `images`; default: the backbone (model.name, model.pretrained).")
    eval_data: str | None = Field(None, description="Labeled shards for zero-shot accuracy during training.")
    classes: str = Field("imagenet", description="Class names for eval_data ('imagenet', 'digits' or a JSON list).")
    templates: str = Field("imagenet", description="Prompt templates for eval_data ('imagenet', 'digits' or a JSON list).")
    eval_every: int = Field(100, ge=1, description="Optimizer steps between zero-shot evaluations.")
    seed: int = 0
    limits: ShardLimits = Field(default_factory=ShardLimits)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    ray: TrainRaySpec = Field(default_factory=TrainRaySpec)

    @model_validator(mode="after")
    def _stages_and_teacher(self) -> "TrainSpec":
        if not self.stages:
            raise ValueError("at least one stage is required")
        if self.teacher is not None and not self.images:
            raise ValueError("teacher embeds the source images: set images as well")
        return self


class EvalSpec(Model):
    data: str = Field(..., description="Labeled splat shards (with .cls): brace pattern.")
    checkpoint: str = Field(..., description="A train run's model.pt (local or s3://).")
    classes: str = Field("imagenet", description="'imagenet', 'digits' or a path to a JSON list of class names.")
    templates: str = Field("imagenet", description="'imagenet', 'digits' or a path to a JSON list of templates with {c}.")
    rgb_checkpoint: str | None = Field(None, description="RGB model to evaluate on the same images.")
    rgb_data: str | None = Field(None, description="The source image shards of `data`, for the RGB model.")
    output: str = Field("outputs/eval.json", min_length=1)
    batch_size: int = Field(64, ge=1, le=65_536)
    limits: ShardLimits = Field(default_factory=ShardLimits)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)


class BatchSpec(Model):
    max_size: int = Field(32, ge=1, le=4096, description="Concurrent requests a replica embeds in one batch.")
    wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long a replica waits to fill a batch.")


class ServeSpec(Model):
    model: str = Field(..., min_length=1, description="The encoder: models:/NAME/VERSION (or models:/NAME@ALIAS) in "
                       "the MLflow registry of `tracking.uri`, or a train run's model.pt (local or s3://).")
    classes: str | None = Field(None, description="Class names to rank ('imagenet', 'digits' or a JSON list); default: "
                                "a registered model's own, none for a model.pt (embeddings only).")
    templates: str = Field("imagenet", description="Prompt templates for `classes` given here.")
    top_k: int = Field(5, ge=1, le=1000, description="Classes in each answer.")
    name: str = Field("splatclip", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="Serve application name.")
    route: str = Field("/embed", pattern=r"^/[A-Za-z0-9_/-]{0,127}$", description="The URL path clients POST to.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0 for other machines).")
    port: int = Field(8000, ge=1, le=65_535)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    max_body_bytes: int = Field(4 << 20, ge=1024, le=1 << 30, description="Larger request bodies get 413.")
    token: SecretStr | None = Field(default_factory=_env_secret("SPLATCLIP_SERVE_TOKEN"), description="Clients send "
                                    "`Authorization: Bearer TOKEN` (else 401); default $SPLATCLIP_SERVE_TOKEN; none: "
                                    "open to whoever reaches the port.")
    limits: ShardLimits = Field(default_factory=ShardLimits, description="`max_gaussians`: more in a request gets 413.")
    ray: RaySpec = Field(default_factory=RaySpec, description="`actors`: replicas (autoscaled up to `max_actors`); "
                         "`cpus_per_actor`, `gpus_per_actor`, `resources`: each replica's.")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="`uri`: the registry `model` is read from.")


SPECS: dict[str, type[Model]] = {"fit": FitSpec, "train": TrainSpec, "eval": EvalSpec, "serve": ServeSpec}  # by job
