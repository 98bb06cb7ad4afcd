"""GS-CLIP: a splat encoder that plugs into a frozen open_clip ViT, beside its frozen text tower.

    params [B, N, 8], mask [B, N] -> SplatStem -> PerceiverResampler -> [B, L, width]
    -> CLS (the ViT's own) + tokens -> ln_pre -> the ViT's transformer blocks -> pool, ln_post -> proj

The ViT's patch embedding is the only part not used. What trains: the stem, the resampler, the
final norm and projection, the logit scale, and optionally the first k transformer blocks.
`encoder="rgb"` keeps the plain open_clip image tower (the baseline, and the teacher when no
pretrained weights exist), with every parameter trainable.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from splatclip.models.backbone import create, normalize_images
from splatclip.models.resampler import PerceiverResampler
from splatclip.models.stem import SplatStem
from splatclip.platform.specs import ModelSpec, StorageSpec
from splatclip.warps import canonical_images, canonical_splats, gain_splats, level_gain, level_images, level_splats

log = logging.getLogger(__name__)


class GSEncoder(nn.Module):
    """The trainable front of the splat encoder: Gaussians -> a fixed number of ViT-width tokens."""

    def __init__(self, vit_width: int, latents: int, layers: int, bands: int, resampler_width: int):
        super().__init__()
        heads = max(1, resampler_width // 64)
        self.stem = SplatStem(resampler_width, bands)
        self.resampler = PerceiverResampler(resampler_width, vit_width, latents, layers, heads)

    def forward(self, params, mask):
        return self.resampler(self.stem(params), mask)  # [B, L, vit_width]


def through_vit(visual: nn.Module, tokens):
    """tokens [B, L, width] -> the open_clip ViT's CLS + blocks + pooling + projection -> [B, D]."""
    cls = (visual.class_embedding + visual.positional_embedding[0]).to(tokens.dtype)
    x = torch.cat([cls.expand(tokens.shape[0], 1, -1), tokens], 1)
    x = visual.transformer(visual.ln_pre(x))
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


class GSCLIP(nn.Module):
    def __init__(self, clip: nn.Module, tokenizer, spec: ModelSpec):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.encoder = spec.encoder
        self.canonical_spread = spec.canonical_spread
        self.canonical_deskew = spec.canonical_deskew
        self.canonical_level = spec.canonical_level
        width = clip.visual.class_embedding.shape[-1]
        self.splat = (
            GSEncoder(width, spec.latents, spec.resampler_layers, spec.fourier_bands, spec.resampler_width)
            if spec.encoder == "splat" else None
        )
        self.set_trainable(0)

    @property
    def logit_scale(self):
        return self.clip.logit_scale.exp().clamp(max=100)

    def spread(self, reframe):
        """The ink spread each sample is framed to: `canonical_spread`, times `reframe` [B] when given
        (training's zoom after the framing, `Augment.reframe`)."""
        return self.canonical_spread if reframe is None else self.canonical_spread * reframe

    def splat_tokens(self, params, mask=None, reframe=None):
        """params [B, N, 8], mask [B, N] (True: live) -> the tokens the ViT's blocks take [B, L, width]."""
        if mask is None:
            mask = torch.ones(params.shape[:2], dtype=torch.bool, device=params.device)
        if self.canonical_spread is not None:
            params = canonical_splats(params, mask, self.spread(reframe), self.canonical_deskew)
        if self.canonical_level is not None:
            gain = level_gain(level_splats(params, mask), self.canonical_level)  # [B]
            params = gain_splats(params, gain[:, None].expand(-1, 3))
        return self.splat(params, mask)

    def splat_features(self, params, mask=None, reframe=None):
        """params [B, N, 8], mask [B, N] (True: live) -> image embedding [B, D] (not normalized)."""
        return through_vit(self.clip.visual, self.splat_tokens(params, mask, reframe))

    def encode_splats(self, params, mask=None, reframe=None):
        return F.normalize(self.splat_features(params, mask, reframe), dim=-1)

    def view(self, images, reframe=None):
        """images [B, 3, H, W] as this model is shown them (centered, zoomed and deskewed by their ink with
        `canonical_spread` and `canonical_deskew`, `reframe` [B]: see `spread`; their ink brought to
        `canonical_level`)."""
        if self.canonical_spread is not None:
            images = canonical_images(images, self.spread(reframe), self.canonical_deskew)
        if self.canonical_level is not None:
            images = images * level_gain(level_images(images), self.canonical_level)[:, None, None, None]
        return images

    def encode_image(self, images, reframe=None):
        """images [B, 3, H, W] in [0, 1] through the RGB tower."""
        return F.normalize(self.clip.encode_image(normalize_images(self.clip, self.view(images, reframe))), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def trainable_names(self, unfreeze_blocks: int) -> set[str]:
        names = {n for n, _ in self.named_parameters()}
        if self.encoder == "rgb":
            return names
        blocks = {f"clip.visual.transformer.resblocks.{i}." for i in range(unfreeze_blocks)}
        return {
            n for n in names
            if n.startswith("splat.stem.") or n.startswith("splat.resampler.")
            or n.startswith("clip.visual.ln_post.") or n == "clip.visual.proj" or n == "clip.logit_scale"
            or any(n.startswith(b) for b in blocks)
        }

    def set_trainable(self, unfreeze_blocks: int) -> float:
        """Freeze all but the trainable parameters; return the trainable share of all parameters."""
        keep = self.trainable_names(unfreeze_blocks)
        for name, p in self.named_parameters():
            p.requires_grad_(name in keep)
        return self.trainable_share()

    def trainable_share(self) -> float:
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / total

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint needs: everything but the frozen, pretrained backbone."""
        keep = self.trainable_names(len(self.clip.visual.transformer.resblocks)) if self.encoder == "splat" else None
        state = self.state_dict()
        return {k: v for k, v in state.items() if keep is None or k in keep}


def from_open_clip(name: str = "ViT-B-16", pretrained: str | None = None, spec: ModelSpec | None = None,
                   storage: StorageSpec | None = None, device="cpu") -> GSCLIP:
    """A GS-CLIP (or RGB) model on any open_clip ViT, weights from a tag, a local file or s3://."""
    spec = (spec or ModelSpec()).model_copy(update={"name": name, "pretrained": pretrained})
    clip, tokenizer = create(spec.name, spec.pretrained, storage, device)
    model = GSCLIP(clip, tokenizer, spec).to(device)
    log.info("%s encoder on %s: %.2f%% of %d parameters train",
             spec.encoder, spec.name, 100 * model.trainable_share(), sum(p.numel() for p in model.parameters()))
    return model
