"""Perceiver resampler: a fixed number of learned latent queries cross-attend to a variable,
masked set of Gaussian tokens (Flamingo-style: keys are the tokens and the latents themselves)."""

import torch
from torch import nn


class ResamplerLayer(nn.Module):
    def __init__(self, width: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm_latents = nn.LayerNorm(width)
        self.norm_tokens = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ff_mult * width), nn.GELU(),
                                nn.Linear(ff_mult * width, width))

    def forward(self, latents, tokens, ignore):
        # latents [B, L, W], tokens [B, N, W], ignore [B, N + L] (True: not attended)
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_tokens(tokens), q], 1)
        latents = latents + self.attn(q, kv, kv, key_padding_mask=ignore, need_weights=False)[0]
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """tokens [B, N, width], mask [B, N] (True: live) -> [B, latents, out_width]."""

    def __init__(self, width: int, out_width: int, latents: int, layers: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, width) * width**-0.5)
        self.layers = nn.ModuleList(ResamplerLayer(width, heads, ff_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_width)

    def forward(self, tokens, mask):
        B = tokens.shape[0]
        latents = self.latents.expand(B, -1, -1)
        ignore = torch.cat([~mask.bool(), mask.new_zeros(B, latents.shape[1], dtype=torch.bool)], 1)
        for layer in self.layers:
            latents = layer(latents, tokens, ignore)
        return self.out(self.norm(latents))
