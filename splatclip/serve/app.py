"""The Ray Serve application: POST the bytes of a splat file, get its embedding and top classes.

    POST {route}   Content-Type: application/octet-stream (or application/x-npy)
                   Authorization: Bearer TOKEN (when the spec has a token)
                   body: a splat file as `splatclip fit` writes it (float16 [n, 8] .npy)
    200 {"embedding": [D floats], "classes": [{"name", "score"}, ...], "gaussians": n}
    GET {route}    (the same token)
    200 {"fit": the fit settings of the encoder's training splats or null, "max_gaussians": n,
         "classes": [names]}: how a client should fit the images it sends (`splatclip send` asks)
    4xx {"error": what was wrong}   (400 not a splat file or bad values, 401 token, 405 method,
                                     413 too large or too many Gaussians, 415 content type)

Concurrent requests are embedded together (`serve.batch`, `batch.max_size` and `batch.wait_ms`);
replicas, autoscaling and each replica's CPUs, GPUs and custom resources come from `spec.ray`.
A bad request costs only itself: the replica answers it and goes on.
"""

from __future__ import annotations

import hmac
import logging

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from splatclip.platform.specs import ServeSpec
from splatclip.serve.encoder import Answer, BadRequest, Encoder, parse

log = logging.getLogger(__name__)

CONTENT_TYPES = ("application/octet-stream", "application/x-npy")


def load_encoder(spec: ServeSpec, device: str) -> Encoder:
    """The encoder `spec.model` names: a registered MLflow model (models:/...) or a model.pt; with the
    spec's classes, or a registered model's own."""
    from splatclip.models.model_file import model_from_payload, read_payload
    from splatclip.models.zeroshot import load_classes, load_templates

    if spec.model.startswith("models:/"):
        import mlflow

        mlflow.set_tracking_uri(spec.tracking.uri)
        mlflow.set_registry_uri(spec.tracking.uri)
        encoder = mlflow.pyfunc.load_model(spec.model).unwrap_python_model().encoder
        model, fit = encoder.model, encoder.fit
        if not spec.classes:
            return encoder
    else:
        payload = read_payload(spec.model, spec.storage, device)
        model, fit = model_from_payload(payload, spec.model, spec.storage, device), payload.get("fit")
    classes = load_classes(spec.classes, spec.storage) if spec.classes else None
    return Encoder(model, classes, load_templates(spec.templates, spec.storage) if classes else None, device, fit)


def refusal(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than `limit` bytes (413 past it, whatever Content-Length says)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"body of {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class SplatEncoder:
    """The deployment's class (deployed by `build_app`; kept a plain class of this module so that Ray
    pickles it by reference, not by value with its globals)."""

    def __init__(self, spec: ServeSpec):
        self.spec = spec
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = load_encoder(spec, self.device)
        self.token = spec.token.get_secret_value().encode() if spec.token else None
        self.embed.set_max_batch_size(spec.batch.max_size)
        self.embed.set_batch_wait_timeout_s(spec.batch.wait_ms / 1000)
        log.info("serving %s on %s (%d classes)", spec.model, self.device, len(self.encoder.classes))

    @serve.batch
    async def embed(self, arrays: list) -> list[Answer]:
        return self.encoder.answer(arrays, self.spec.top_k)

    def check(self, request: Request) -> None:
        if request.method not in ("POST", "GET"):
            raise BadRequest(405, f"{request.method}: POST the bytes of a splat file (GET: how to fit them)")
        if self.token is not None:
            sent = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(sent, b"Bearer " + self.token):
                raise BadRequest(401, "missing or wrong bearer token")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind not in CONTENT_TYPES:
            raise BadRequest(415, f"content type {kind[:64] or 'none'!r}; send {' or '.join(CONTENT_TYPES)}")

    def recipe(self) -> dict:
        """What a client needs to make splat files this encoder reads as it was trained to."""
        return {"fit": self.encoder.fit, "max_gaussians": self.spec.limits.max_gaussians,
                "classes": self.encoder.classes}

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            self.check(request)
            if request.method == "GET":
                return JSONResponse(self.recipe())
            arr = parse(await read_body(request, self.spec.max_body_bytes), self.spec.limits)
        except BadRequest as err:
            return refusal(err.status, str(err))
        answer = await self.embed(arr)
        return JSONResponse({"embedding": answer.embedding, "gaussians": len(arr),
                             "classes": [{"name": n, "score": s} for n, s in answer.classes]})


def build_app(spec: ServeSpec, request: dict[str, float]):
    """The deployment bound to its spec: `request` is what each replica asks of Ray (CPUs, GPUs, node
    markers), the replica count or autoscaling range from `spec.ray`."""
    from splatclip.platform.runtime import pool_size, ray_options

    low, high = pool_size(spec.ray)
    scaling = ({"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                       "target_ongoing_requests": spec.batch.max_size}}
               if high > low else {"num_replicas": low})
    return serve.deployment(SplatEncoder).options(ray_actor_options=ray_options(request),
                                                  max_ongoing_requests=4 * spec.batch.max_size, **scaling).bind(spec)
