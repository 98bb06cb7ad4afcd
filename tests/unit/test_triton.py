"""Triton kernels against the dense torch reference. On a CPU machine they run in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1 before anything touches Triton)."""

import pytest
import torch

from splatclip.cuda import render
from splatclip.cuda.triton_kernels import KERNELS
from splatclip.cuda.triton_op import render_tiles
from tests_helpers import random_splats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compare(p, H, W, mask=None):
    p = p.to(DEVICE).requires_grad_()
    mask = None if mask is None else mask.to(DEVICE)
    fast = render(p, H, W, mask, backend="triton")
    ref = render(p, H, W, mask, backend="torch-dense")
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    g_fast, = torch.autograd.grad((fast * up).sum(), p)
    g_ref, = torch.autograd.grad((ref * up).sum(), p)
    scale = g_ref.abs().amax(dim=(0, 1)).clamp_min(1e-6)  # per parameter: x, y, l11, ..., b
    torch.testing.assert_close(g_fast / scale, g_ref / scale, rtol=1e-3, atol=2e-4)
    return fast


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("N", [1, 7, 300])
@pytest.mark.parametrize("size", [(16, 16), (33, 47), (64, 64)])
def test_triton_matches_dense(B, N, size):
    p = random_splats(B, N, seed=B * 100 + N, dtype=torch.float32)
    compare(p, *size)


def test_tile_with_more_gaussians_than_a_chunk():
    # 5 chunks' worth (of the larger chunk) of Gaussians piled on one tile; every one of them must count.
    n = 5 * max(k.chunk for k in KERNELS.values()) + 3
    p = torch.zeros(1, n, 8)
    p[0, :, 0:2] = 0.25 + 0.2 * torch.rand(n, 2, generator=torch.Generator().manual_seed(0))
    p[0, :, 2] = p[0, :, 4] = 0.02
    p[0, :, 5:8] = 0.01
    out = compare(p, 16, 16)
    torch.testing.assert_close(out.sum(), render(p, 16, 16, backend="torch-dense").sum().to(DEVICE), rtol=1e-5, atol=0)


def test_empty_tiles_outside_and_masked_gaussians():
    p = random_splats(2, 40, seed=9, dtype=torch.float32)
    p[:, :10, 0] = 3.0  # wholly outside the image
    p[:, :, 2:5] = p[:, :, 2:5].clamp(-0.05, 0.05)  # small: most tiles stay empty
    mask = torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    compare(p, 48, 80, mask)
    none = torch.zeros(2, 40, dtype=torch.bool)
    assert render(p.to(DEVICE), 48, 80, none.to(DEVICE), backend="triton").abs().max() == 0


def test_custom_op_passes_opcheck():
    from splatclip.cuda.binning import bin_gaussians

    p = random_splats(2, 5, seed=2, dtype=torch.float32).to(DEVICE)
    bins = bin_gaussians(p, 20, 20)
    args = (p.reshape(-1, 8).requires_grad_(), bins.gaussian.int(), bins.offsets.int(), 2, bins.tiles_y,
            bins.tiles_x, 20, 20)
    torch.library.opcheck(render_tiles, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
def test_compiled_kernels_on_cuda_match_reference():
    p = random_splats(4, 2000, seed=4, dtype=torch.float32)
    compare(p, 224, 224)


@pytest.mark.gpu
def test_gsplat_backend_renders_on_cuda():
    from splatclip.cuda.gsplat_backend import gsplat_inputs

    p = random_splats(2, 100, seed=6, dtype=torch.float32).cuda()
    p[..., 2:5] = p[..., 2:5].abs().clamp(0.01, 0.1)
    p[..., 5:8] = p[..., 5:8].abs()
    out = render(p, 64, 64, backend="gsplat")
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    # A single Gaussian with alpha blending equals the sum model where exp(-q) >= 1/255.
    one = p[:1, :1]
    torch.testing.assert_close(render(one, 64, 64, backend="gsplat").max(),
                               render(one, 64, 64, backend="torch").max(), rtol=2e-3, atol=5e-3)
    _, conics, *_ = gsplat_inputs(one, 64, 64)
    assert torch.isfinite(conics).all()
