"""Rasterizer backends behind one function, `render` (the contract: `splatclip.cuda.contract`)."""

import torch

BACKENDS = ("auto", "torch", "torch-dense", "triton", "gsplat")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> triton on CUDA, the tiled torch renderer elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown render backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def render(params, height: int, width: int, mask=None, backend: str = "auto", compile: bool = False):
    """params [B, N, 8] (x, y, l11, l21, l22, r, g, b), mask [B, N] or None -> [B, 3, H, W].

    `compile`: the tiled torch renderer runs its kernels compiled for this CPU (`aot`; the other backends
    ignore it)."""
    if params.ndim != 3 or params.shape[-1] != 8:
        raise ValueError(f"params must be [B, N, 8], got {list(params.shape)}")
    name = resolve_backend(backend, params.device)
    if name == "torch":
        from splatclip.cuda.tiled import render_tiled

        return render_tiled(params, height, width, mask, compile)
    if name == "torch-dense":
        from splatclip.cuda.dense import render_dense

        return render_dense(params, height, width, mask)
    if name == "triton":
        from splatclip.cuda.triton_op import render_triton

        return render_triton(params, height, width, mask)
    from splatclip.cuda.gsplat_backend import render_gsplat

    return render_gsplat(params, height, width, mask)
