"""The tiled renderer (hand-written backward) against the dense reference, values and gradients."""

import pytest
import torch

from splatclip.cuda import render, resolve_backend
from splatclip.cuda.binning import bin_gaussians, tile_boxes
from splatclip.cuda.contract import CUTOFF, gaussian_weight
from tests_helpers import random_splats


CASES = [(1, 1, 16, 16), (1, 40, 37, 53), (3, 60, 37, 53), (3, 200, 64, 48), (2, 5, 5, 70)]


@pytest.mark.parametrize("B,N,H,W", CASES)
def test_tiled_matches_dense_forward_and_gradients(B, N, H, W):
    p = random_splats(B, N, seed=B * 1000 + N).requires_grad_()
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(1)) > 0.2
    dense = render(p, H, W, mask, backend="torch-dense")
    tiled = render(p, H, W, mask, backend="torch")
    assert dense.shape == tiled.shape == (B, 3, H, W)
    torch.testing.assert_close(tiled, dense, rtol=1e-6, atol=1e-12)
    up = torch.randn(dense.shape, dtype=dense.dtype, generator=torch.Generator().manual_seed(2))
    g_dense, = torch.autograd.grad((dense * up).sum(), p)
    g_tiled, = torch.autograd.grad((tiled * up).sum(), p)
    torch.testing.assert_close(g_tiled, g_dense, rtol=1e-6, atol=1e-9 * g_dense.abs().max().item())
    assert torch.all(g_dense[~mask] == 0)  # masked Gaussians get no gradient


def test_gradcheck_tiled_and_dense():
    p = random_splats(2, 4, seed=7)
    p[..., 2:5] = p[..., 2:5].abs().clamp(0.05, 0.3)  # well inside, away from the cut-off's kink
    p[..., 0:2] = p[..., 0:2].clamp(0.2, 0.8)
    p.requires_grad_()
    for backend in ("torch", "torch-dense"):
        assert torch.autograd.gradcheck(lambda x: render(x, 9, 11, backend=backend), (p,), eps=1e-7, atol=1e-6)


def test_empty_inputs_render_black():
    p = random_splats(2, 3)
    p[..., 0] = 5.0  # every Gaussian far right of the image, none wide enough to reach it
    p[..., 2:5] = p[..., 2:5].clamp(-0.2, 0.2)
    out = render(p, 33, 17, backend="torch")
    assert out.abs().max() == 0
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert render(random_splats(2, 3), 20, 20, mask, backend="torch").abs().max() == 0


def test_contract_pixel_centers_and_cutoff():
    # A unit-color Gaussian exactly on pixel (2, 3)'s center gives 1 there.
    H, W = 8, 10
    p = torch.tensor([[[3.5 / W, 2.5 / H, 0.1, 0.0, 0.1, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    for backend in ("torch", "torch-dense"):
        out = render(p, H, W, backend=backend)
        assert out[0, :, 2, 3].tolist() == [1.0, 1.0, 1.0]
    d = torch.tensor([2.99, 3.01], dtype=torch.float64)  # just inside / outside 3 sigma
    w = gaussian_weight(d, torch.zeros(2, dtype=torch.float64), 1.0, 0.0, 1.0)
    assert w[0] == pytest.approx(torch.exp(-0.5 * d[0] ** 2).item()) and w[1] == 0
    assert CUTOFF == 4.5


def test_binning_lists_every_overlapping_pair_once():
    B, N, H, W = 3, 120, 50, 70
    p = random_splats(B, N, seed=3, dtype=torch.float32)
    bins = bin_gaussians(p, H, W)
    T = bins.tiles_x * bins.tiles_y
    assert torch.all(bins.key[1:] >= bins.key[:-1])  # sorted
    pairs = set(zip(bins.key.tolist(), bins.gaussian.tolist()))
    assert len(pairs) == len(bins.key)  # none twice
    # Brute force: a Gaussian overlaps a tile if any pixel of the tile has q <= cutoff.
    ys = (torch.arange(H) + 0.5) / H
    xs = (torch.arange(W) + 0.5) / W
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    for b in range(B):
        for n in range(N):
            q = p[b, n]
            w = gaussian_weight(X - q[0], Y - q[1], q[2], q[3], q[4])
            rows, cols = torch.nonzero(w > 0, as_tuple=True)
            for tile in set(((rows // 16) * bins.tiles_x + cols // 16).tolist()):
                assert (b * T + tile, b * N + n) in pairs
    # offsets index the sorted keys per (image, tile)
    for k in torch.unique(bins.key).tolist():
        s, e = bins.offsets[k].item(), bins.offsets[k + 1].item()
        assert torch.all(bins.key[s:e] == k)


def test_tile_boxes_skip_outside_and_masked():
    p = torch.tensor([[[0.5, 0.5, 0.01, 0, 0.01, 1, 1, 1], [3.0, 0.5, 0.01, 0, 0.01, 1, 1, 1]]])
    *_, count = tile_boxes(p, 32, 32)
    assert count.tolist() == [[4, 0]]  # the first touches the 4 tiles meeting at the center
    *_, count = tile_boxes(p, 32, 32, torch.tensor([[False, True]]))
    assert count.tolist() == [[0, 0]]


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="unknown render backend"):
        resolve_backend("opengl", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\[B, N, 8\]"):
        render(torch.zeros(3, 8), 4, 4)
