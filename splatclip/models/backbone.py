"""open_clip models from a name, a config file, and weights from a tag, a local file or a URL.

`name` is an open_clip model name ("ViT-B-16"), the name of a config shipped in
`splatclip/models/configs/` ("demo-vit"), or a path to a model config JSON (registered under its
file stem). `pretrained` is an open_clip tag, a local checkpoint, or an s3:// / file:// URL
fetched through storage into a private cache (keyed by URL and endpoint). Nothing is downloaded unless a tag asks for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from splatclip.platform import storage
from splatclip.platform.specs import StorageSpec

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parent / "configs"


def model_name(name: str) -> str:
    """Register a config file with open_clip when `name` is one, and return the model name."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"model config {name} not found")
        open_clip.add_model_config(path)
        return path.stem
    if (CONFIGS / f"{name}.json").exists():
        open_clip.add_model_config(CONFIGS / f"{name}.json")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r} (not an open_clip or splatclip config name, "
                         "nor a .json config path)")
    return name


def weights_cache() -> Path:
    """This user's private cache of fetched weights (mode 0700; another user's directory is refused)."""
    root = Path(tempfile.gettempdir()) / f"splatclip-weights-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if not root.is_dir() or root.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{root} is not a private directory of this user")
    return root


def missing_weights(pretrained: str | None) -> bool:
    """Whether `pretrained` names a local weights file that does not exist (a tag or URL never does)."""
    looks_like_a_file = pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin",
                                                                                    ".safetensors")))
    return bool(looks_like_a_file) and "://" not in pretrained and not os.path.exists(pretrained)


def local_weights(pretrained: str | None, spec: StorageSpec | None) -> str | None:
    """A path open_clip can load: remote URLs are fetched once into the private cache, under a key of
    the whole URL and the storage endpoint (two stores with the same path never share a file),
    written beside the target and renamed into place (a reader never sees half a file)."""
    if pretrained is None or "://" not in pretrained or pretrained.startswith(("http://", "https://")):
        return pretrained
    endpoint = (spec.endpoint_url if spec is not None else None) or ""
    digest = hashlib.sha256(f"{endpoint}\n{pretrained}".encode()).hexdigest()[:32]
    target = weights_cache() / f"{digest}-{Path(pretrained.split('?')[0]).name[-64:]}"
    if not target.exists():
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{digest}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(storage.read_bytes(pretrained, spec))
            os.replace(part, target)
        finally:
            if os.path.exists(part):
                os.unlink(part)
    return str(target)


def create(name: str, pretrained: str | None = None, spec: StorageSpec | None = None, device="cpu"):
    """(model, tokenizer) for an open_clip CLIP model, in eval mode."""
    resolved = model_name(name)
    model = open_clip.create_model(resolved, pretrained=local_weights(pretrained, spec), device=device)
    return model.eval(), open_clip.get_tokenizer(resolved)


def input_size(model) -> int:
    """The side of the square images an open_clip model's image tower takes."""
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


def normalize_images(model, images):
    """[B, 3, H, W] in [0, 1] -> the model's input: resized to its image size, mean/std normalized."""
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


@torch.no_grad()
def embed_images(model, images):
    """[B, 3, H, W] in [0, 1] -> L2-normalized image embeddings [B, D]."""
    return F.normalize(model.encode_image(normalize_images(model, images)).float(), dim=-1)


@torch.no_grad()
def patch_tokens(model, images):
    """[B, 3, H, W] in [0, 1] -> the ViT's patch tokens as its blocks take them: the patch embedding
    plus each patch's position, [B, L, width] (L patches, row by row; the class token left out)."""
    visual = model.visual
    x = visual.conv1(normalize_images(model, images))  # [B, width, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, L, width]
    return x + visual.positional_embedding[1:].to(x.dtype)
