"""The Triton rasterizer as one autograd-capable custom op (`splatclip::render_tiles`), with fake
implementations so torch.compile can trace a fitting step around it. Binning is done outside the
op with sort-based tensor ops (`binning.bin_gaussians`)."""

import os

import torch

from splatclip.cuda.binning import bin_gaussians
from splatclip.cuda.contract import TILE


def _check(params):
    if params.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to run on the CPU)")


def _tiles_to_image(tiles_out, batch, tiles_y, tiles_x, height, width):
    # [B * T, 256, 3] -> [B, 3, H, W]
    out = tiles_out.view(batch, tiles_y, tiles_x, TILE, TILE, 3).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(batch, 3, tiles_y * TILE, tiles_x * TILE)[:, :, :height, :width]


def _image_to_tiles(grad, tiles_y, tiles_x):
    # [B, 3, H, W] -> [B * T, 256, 3], zero-padded to whole tiles
    B, _, H, W = grad.shape
    padded = grad.new_zeros(B, 3, tiles_y * TILE, tiles_x * TILE)
    padded[:, :, :H, :W] = grad
    return padded.view(B, 3, tiles_y, TILE, tiles_x, TILE).permute(0, 2, 4, 3, 5, 1).reshape(-1, TILE * TILE, 3)


@torch.library.custom_op("splatclip::render_tiles", mutates_args=())
def render_tiles(params: torch.Tensor, gaussian: torch.Tensor, offsets: torch.Tensor, batch: int,
                 tiles_y: int, tiles_x: int, height: int, width: int) -> torch.Tensor:
    """params [B * N, 8] float32, sorted bins -> image [B, 3, H, W]."""
    from splatclip.cuda.triton_kernels import KERNELS

    tiles = tiles_x * tiles_y
    out = params.new_empty(batch * tiles, TILE * TILE, 3)
    if batch * tiles:
        KERNELS["render_fwd"].launch(batch * tiles, params.contiguous(), gaussian, offsets, out, tiles, tiles_x,
                                     height, width)
    return _tiles_to_image(out, batch, tiles_y, tiles_x, height, width).contiguous()


@render_tiles.register_fake
def _(params, gaussian, offsets, batch, tiles_y, tiles_x, height, width):
    return params.new_empty(batch, 3, height, width)


@torch.library.custom_op("splatclip::render_tiles_backward", mutates_args=())
def render_tiles_backward(grad: torch.Tensor, params: torch.Tensor, gaussian: torch.Tensor, offsets: torch.Tensor,
                          tiles_y: int, tiles_x: int, height: int, width: int) -> torch.Tensor:
    from splatclip.cuda.triton_kernels import KERNELS

    grad_tiles = _image_to_tiles(grad.contiguous(), tiles_y, tiles_x).contiguous()
    grad_params = torch.zeros_like(params)
    if grad_tiles.shape[0]:
        KERNELS["render_bwd"].launch(grad_tiles.shape[0], params.contiguous(), gaussian, offsets, grad_tiles,
                                     grad_params, tiles_x * tiles_y, tiles_x, height, width)
    return grad_params


@render_tiles_backward.register_fake
def _(grad, params, gaussian, offsets, tiles_y, tiles_x, height, width):
    return torch.empty_like(params)


def _setup(ctx, inputs, output):
    params, gaussian, offsets, _, tiles_y, tiles_x, height, width = inputs
    ctx.save_for_backward(params, gaussian, offsets)
    ctx.geometry = (tiles_y, tiles_x, height, width)


def _backward(ctx, grad):
    params, gaussian, offsets = ctx.saved_tensors
    grad_params = render_tiles_backward(grad, params, gaussian, offsets, *ctx.geometry)
    return grad_params, None, None, None, None, None, None, None


render_tiles.register_autograd(_backward, setup_context=_setup)


def render_triton(params, height: int, width: int, mask=None):
    """params [B, N, 8], mask [B, N] or None -> [B, 3, H, W], float32 (the kernels' precision)."""
    _check(params)
    B, N, _ = params.shape
    bins = bin_gaussians(params, height, width, mask, sort=True)
    flat = params.reshape(B * N, 8).float()
    out = render_tiles(flat, bins.gaussian.to(torch.int32), bins.offsets.to(torch.int32), B,
                       bins.tiles_y, bins.tiles_x, height, width)
    return out.to(params.dtype)
