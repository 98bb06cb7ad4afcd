"""Transforms on splats against the same transforms on their renders (splatclip.warps), and the
augmentation built on them (splatclip.models.augment)."""

import math

import pytest
import torch

from splatclip.cuda.dense import render_dense
from splatclip.models.augment import Augment, augment_images, augment_splats, draw, stroke_width
from splatclip.models.gsclip import from_open_clip
from splatclip.platform.specs import ModelSpec
from splatclip.warps import (affine_normalized, bend, bend_images, bend_jacobian, bend_splats, blur_images, blur_splats, canonical_images, canonical_splats, gain_splats,
                             level_gain, level_images, level_splats, major_spread, moments_images, moments_splats,
                             warp_images, warp_splats)


def splats(b, n, h, w, seed=0):
    """Gaussians of 2-5 pixels a side, sheared, well inside the frame, positive colors."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(b, n, 8, generator=g)
    p[..., 0:2] = 0.3 + 0.4 * p[..., 0:2]
    p[..., 2] = (2 + 3 * p[..., 2]) / w
    p[..., 4] = (2 + 3 * p[..., 4]) / h
    p[..., 3] = (p[..., 3] - 0.5) * 4 / h
    p[..., 5:8] *= 0.6
    return p


def random_affine(b, h, w, seed=1):
    """Rotations up to 30 degrees either way, zooms 0.8-1.25, shifts up to 3 pixels, in pixels."""
    g = torch.Generator().manual_seed(seed)
    angle = (torch.rand(b, generator=g) - 0.5) * math.radians(60)
    zoom = 0.8 + 0.45 * torch.rand(b, generator=g)
    A = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    return affine_normalized(A * zoom[:, None, None], (torch.rand(b, 2, generator=g) - 0.5) * 6, h, w)


@pytest.mark.parametrize("h,w", [(48, 48), (40, 56)])
def test_warped_splats_render_as_the_warped_render(h, w):
    p = splats(8, 20, h, w)
    A, t = random_affine(8, h, w)
    exact = render_dense(warp_splats(p, A, t), h, w)
    resampled = warp_images(render_dense(p, h, w), A, t)
    err = (exact - resampled).abs()
    peak = exact.amax()
    assert err.mean() < 2e-3 * peak and err.max() < 0.04 * peak  # bilinear resampling, the 3-sigma cut-off
    # moving the means alone (covariances kept) is far off: the comparison can fail
    means_only = render_dense(torch.cat([warp_splats(p, A, t)[..., :2], p[..., 2:]], -1), h, w)
    assert (means_only - resampled).abs().mean() > 10 * err.mean()


def test_the_identity_and_a_quarter_turn_are_exact_on_the_parameters():
    p = splats(2, 5, 32, 32)
    eye = torch.eye(2).expand(2, 2, 2)
    torch.testing.assert_close(warp_splats(p, eye, torch.zeros(2, 2)), p)
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]]).expand(2, 2, 2)
    twice = warp_splats(warp_splats(p, turn, torch.zeros(2, 2)), turn, torch.zeros(2, 2))
    flipped = render_dense(twice, 32, 32)
    torch.testing.assert_close(flipped, render_dense(p, 32, 32).flip(-1, -2), atol=1e-5, rtol=0)


def bent(b, size, seed=4):
    """b random bends (`Augment.bend`'s waves) of root-mean-square size `size`, a fraction of the side."""
    torch.manual_seed(seed)
    amp, freq, phase = draw(Augment(bend=0.1), b).bend
    return amp / amp.square().sum((1, 2), keepdim=True).mul(0.5).sqrt() * size, freq, phase


def test_the_bend_is_its_waves_and_its_jacobian_their_slope():
    amp, freq, phase = bent(3, 0.05)
    p = torch.rand(3, 7, 2, dtype=torch.float64)
    waves = amp.double(), freq.double(), phase.double()
    jac = bend_jacobian(p, *waves)
    rms = torch.sqrt(bend(torch.rand(3, 4000, 2), amp, freq, phase).square().sum(-1).mean(1))  # [3]
    torch.testing.assert_close(rms, torch.full((3,), 0.05), atol=0.015, rtol=0)
    for j in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[j] = 1e-6
        ahead, behind = bend(p + step, *waves), bend(p - step, *waves)
        torch.testing.assert_close(jac[..., j], (ahead - behind) / 2e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("h,w", [(48, 48), (40, 56)])
def test_bent_splats_render_as_the_bent_render(h, w):
    p = splats(8, 20, h, w, seed=3)
    waves = bent(8, 0.04)
    exact = render_dense(bend_splats(p, *waves), h, w)
    resampled = bend_images(render_dense(p, h, w), *waves)
    err = (exact - resampled).abs()
    assert err.mean() < 4e-3 * exact.amax()  # bilinear resampling and the bend's linearization across each Gaussian
    # moving the means alone is further off, and leaving the splats as they were further still
    means_only = render_dense(torch.cat([bend_splats(p, *waves)[..., :2], p[..., 2:]], -1), h, w)
    assert (means_only - resampled).abs().mean() > 2 * err.mean()
    assert (render_dense(p, h, w) - resampled).abs().mean() > 5 * err.mean()
    # the linearization's error shrinks with the bend: at a quarter of it, the images agree 3x closer
    small = [w_ / 4 if i == 0 else w_ for i, w_ in enumerate(waves)]
    err_small = (render_dense(bend_splats(p, *small), h, w) - bend_images(render_dense(p, h, w), *small)).abs()
    assert err_small.mean() < err.mean() / 3


def test_a_bend_of_nothing_leaves_splats_and_images_as_they_are():
    p = splats(2, 6, 32, 32)
    amp, freq, phase = bent(2, 0.05)
    torch.testing.assert_close(bend_splats(p, amp * 0, freq, phase), p)
    image = render_dense(p, 32, 32)
    torch.testing.assert_close(bend_images(image, amp * 0, freq, phase), image, atol=1e-6, rtol=0)


def test_blurred_splats_render_as_the_blurred_render():
    h = w = 48
    p = splats(6, 20, h, w, seed=3)
    sigma = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    exact = render_dense(blur_splats(p, sigma, h, w), h, w)
    resampled = blur_images(render_dense(p, h, w), sigma)
    assert (exact - resampled).abs().max() < 0.01 * exact.amax()
    torch.testing.assert_close(blur_splats(p, torch.zeros(6), h, w), p)
    assert (render_dense(p, h, w) - resampled)[2:].abs().amax((1, 2, 3)).min() > 0.05 * exact.amax()


def test_a_gain_scales_the_render():
    p = splats(2, 10, 24, 24)
    gain = torch.tensor([[0.5, 1.0, 2.0], [1.5, 1.5, 1.5]])
    torch.testing.assert_close(render_dense(gain_splats(p, gain), 24, 24),
                               render_dense(p, 24, 24) * gain[:, :, None, None], atol=1e-6, rtol=1e-5)


def test_augmenting_splats_and_images_with_one_draw_keeps_them_one_image():
    h = w = 48
    p = splats(6, 20, h, w, seed=5)
    settings = Augment(rotate=20, scale=(0.85, 1.15), shift=0.06, blur=0.03, gain=(0.7, 1.3))
    torch.manual_seed(0)
    d = draw(settings, 6)
    exact = render_dense(augment_splats(p, d), h, w)
    resampled = augment_images(render_dense(p, h, w), d)
    assert (exact - resampled).abs().mean() < 3e-3 * exact.amax()
    assert (exact - render_dense(p, h, w)).abs().mean() > 10 * (exact - resampled).abs().mean()  # it did change
    torch.manual_seed(0)
    d = draw(settings.model_copy(update={"bend": 0.05}), 6)  # a bend too: to first order
    exact = render_dense(augment_splats(p, d), h, w)
    assert (exact - augment_images(render_dense(p, h, w), d)).abs().mean() < 5e-3 * exact.amax()
    # the defaults transform nothing, nor does a share of 0; a share of 1/2 about half the samples
    for plain in (draw(Augment(), 6), draw(settings.model_copy(update={"share": 0.0}), 6)):
        torch.testing.assert_close(augment_splats(p, plain), p)
    half = draw(settings.model_copy(update={"share": 0.5}), 1000)
    kept = (half.A == torch.eye(2)).all(-1).all(-1) & (half.t == 0).all(-1) & (half.sigma == 0) & (half.gain == 1).all(-1)
    assert 400 < kept.sum() < 600


def test_a_reframe_is_drawn_in_its_range_and_leaves_the_other_draws_as_they_were():
    settings = Augment(rotate=20, shift=0.05, blur=0.02, gain=(0.8, 1.2), share=0.5)
    torch.manual_seed(3)
    plain = draw(settings, 400)
    torch.manual_seed(3)
    zoomed = draw(settings.model_copy(update={"reframe": 1.4}), 400)
    for name in ("A", "t", "sigma", "gain", "stroke"):  # drawn last: a recipe without it draws as before
        torch.testing.assert_close(getattr(zoomed, name), getattr(plain, name))
    torch.manual_seed(3)
    bent_too = draw(settings.model_copy(update={"reframe": 1.4, "bend": 0.05}), 400)  # and the bend after it
    for name in ("A", "t", "sigma", "gain", "stroke", "reframe"):
        torch.testing.assert_close(getattr(bent_too, name), getattr(zoomed, name))
    assert (plain.reframe == 1).all()
    kept = (plain.A == torch.eye(2)).all(-1).all(-1)  # [400]: the samples the share passes as they are
    assert (zoomed.reframe[kept] == 1).all() and (zoomed.reframe[~kept] != 1).all()
    assert plain.bend is None and (bent_too.bend[0][kept] == 0).all() and (bent_too.bend[0][~kept] != 0).all()
    z = zoomed.reframe[~kept]
    assert (z >= 1 / 1.4).all() and (z <= 1.4).all() and (z < 1).sum() > 0.3 * len(z) and (z > 1).sum() > 0.3 * len(z)


def test_stroke_width_thickens_and_thins_lines():
    image = torch.zeros(3, 1, 9, 9)
    image[:, :, 2:7, 4] = 1.0  # a one-pixel vertical line
    out = stroke_width(image, torch.tensor([2, 1, -1]))  # half pixels
    assert out[0, 0, 4].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]  # a pixel more on each side: three wide
    assert out[1, 0, 4, 3] == out[1, 0, 4, 5] and out[1, 0, 4, 3] == 0.5 and out[1, 0, 4, 4] == 1  # half a pixel
    assert out[2].sum() == 0  # half a pixel off each side of a one-pixel line: nothing left


def test_augment_settings_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="scale must be a range"):
        Augment(scale=(1.2, 0.8))
    with pytest.raises(ValueError):
        Augment(rotate=float("nan"))
    with pytest.raises(ValueError):
        Augment(zoom=2)


def test_the_moments_of_splats_are_the_moments_of_their_render():
    h = w = 64
    p = splats(6, 20, h, w, seed=9)
    mask = torch.rand(6, 20, generator=torch.Generator().manual_seed(2)) > 0.3
    got, want = moments_splats(p, mask), moments_images(render_dense(p, h, w, mask))
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=0)  # centroid
    scale = want[2][:, [0, 2]].amax()  # second moments xx, xy, yy (the cut-off trims the tails)
    torch.testing.assert_close(got[2], want[2], atol=0.03 * scale, rtol=0)
    torch.testing.assert_close(got[0] * h * w, want[0], atol=0, rtol=0.03)  # ink, in pixels


def test_the_spread_is_along_the_major_axis_and_a_turn_keeps_it():
    def spread(p):
        return major_spread(*moments_splats(p)[2].unbind(-1))

    bar = torch.tensor([[[0.5, 0.5, 0.02, 0.0, 0.2, 1.0, 1.0, 1.0]]])  # one tall, thin Gaussian: a 1
    torch.testing.assert_close(spread(bar), torch.tensor([0.2]))  # its height, not the axes' mean
    p = splats(4, 20, 28, 28, seed=3)
    turn = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]]).expand(4, 2, 2)
    torch.testing.assert_close(spread(warp_splats(p, turn, torch.zeros(4, 2))), spread(p))


@pytest.mark.parametrize("deskew", [0.0, 1.0])
@pytest.mark.parametrize("target", [0.12, 0.12 * torch.tensor([0.75, 0.9, 1.0, 1.1, 1.2, 1.3])],
                         ids=["one spread", "a spread per sample"])  # per sample: the target times a reframe
def test_canonical_splats_render_as_the_canonical_render(deskew, target):
    h = w = 48
    p = splats(6, 20, h, w, seed=4)
    A, t = random_affine(6, h, w, seed=5)  # the same ink, moved, turned and zoomed
    moved = warp_splats(p, A, t)
    exact = render_dense(canonical_splats(moved, None, target, deskew), h, w)
    resampled = canonical_images(render_dense(moved, h, w), target, deskew)
    assert (exact - resampled).abs().mean() < 5e-3 * exact.amax()
    _, mu, cov = moments_images(exact)
    torch.testing.assert_close(mu, torch.full_like(mu, 0.5), atol=5e-3, rtol=0)
    spread = major_spread(*cov.unbind(-1))
    torch.testing.assert_close(spread, torch.as_tensor(target).expand(6), atol=0, rtol=0.05)
    if deskew:  # upright: the ink's x no longer drifts with its y
        assert (cov[:, 1] / cov[:, 2]).abs().max() < 0.03
    # an empty image stays as it is
    empty = torch.zeros(1, 3, 8, 8)
    torch.testing.assert_close(canonical_images(empty, 0.12), empty)


def test_deskewing_undoes_a_slant_and_a_share_of_it_undoes_that_share():
    p = splats(5, 20, 28, 28, seed=7)
    shear = torch.tensor([[1.0, 0.4], [0.0, 1.0]]).expand(5, 2, 2)  # italic: x drifts with y
    slanted = warp_splats(p, shear, torch.zeros(5, 2))
    torch.testing.assert_close(canonical_splats(slanted, None, 0.2, 1.0), canonical_splats(p, None, 0.2, 1.0),
                               atol=1e-5, rtol=1e-4)
    _, _, cov = moments_splats(canonical_splats(slanted, None, 0.2, 0.5))
    _, _, before = moments_splats(slanted)
    torch.testing.assert_close(cov[:, 1] / cov[:, 2], before[:, 1] / before[:, 2] / 2, atol=1e-5, rtol=1e-4)
    # a slant past 45 degrees is undone only up to 45
    flat = warp_splats(p, torch.tensor([[1.0, 3.0], [0.0, 1.0]]).expand(5, 2, 2), torch.zeros(5, 2))
    _, _, cov = moments_splats(canonical_splats(flat, None, 0.2, 1.0))
    assert ((cov[:, 1] / cov[:, 2]).abs() > 0.5).all()


def test_deskewing_without_the_framing_is_refused():
    with pytest.raises(ValueError, match="canonical_deskew is a part of the framing"):
        ModelSpec(canonical_deskew=1.0)
    with pytest.raises(ValueError):
        ModelSpec(canonical_spread=0.2, canonical_deskew=1.5)


def test_a_model_with_a_canonical_spread_does_not_see_where_the_ink_is():
    torch.manual_seed(0)
    spec = ModelSpec(name="demo-vit", latents=4, resampler_layers=1, resampler_width=32, fourier_bands=2,
                     canonical_spread=0.15)
    model = from_open_clip("demo-vit", None, spec).eval()
    p = splats(2, 12, 28, 28, seed=6)
    moved = warp_splats(p, torch.eye(2).expand(2, 2, 2) * 0.8, torch.tensor([[0.1, -0.05], [-0.08, 0.02]]))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_splats(moved), model.encode_splats(p), atol=1e-4, rtol=0)
        plain = from_open_clip("demo-vit", None, spec.model_copy(update={"canonical_spread": None})).eval()
        assert (plain.encode_splats(moved) - plain.encode_splats(p)).abs().max() > 1e-2
        # deskewed as well, nor how the ink slants
        upright = from_open_clip("demo-vit", None, spec.model_copy(update={"canonical_deskew": 1.0})).eval()
        slanted = warp_splats(moved, torch.tensor([[1.0, -0.3], [0.0, 1.0]]).expand(2, 2, 2), torch.zeros(2, 2))
        torch.testing.assert_close(upright.encode_splats(slanted), upright.encode_splats(p), atol=1e-4, rtol=0)
        assert (model.encode_splats(slanted) - model.encode_splats(p)).abs().max() > 1e-2


def test_the_level_of_splats_is_the_level_of_their_render_and_no_warp_changes_it():
    h = w = 64
    p = splats(6, 20, h, w, seed=8)
    p[:3, ::4, 5:8] *= -0.5  # some Gaussians that take ink away, as fits have
    exact = level_splats(p)
    torch.testing.assert_close(exact, level_images(render_dense(p, h, w)), atol=0, rtol=0.01)
    A, t = random_affine(6, h, w, seed=9)
    torch.testing.assert_close(level_splats(warp_splats(p, A, t)), exact, atol=1e-6, rtol=1e-5)
    # a fainter pen is a lower level, by the gain; masked Gaussians carry no ink
    torch.testing.assert_close(level_splats(gain_splats(p, torch.full((6, 3), 0.4))), 0.4 * exact)
    mask = torch.ones(6, 20, dtype=torch.bool)
    mask[:, 10:] = False
    torch.testing.assert_close(level_splats(p, mask), level_splats(p[:, :10]))
    # taken a few pairs at a time (memory for a set of many Gaussians), the same sum
    torch.testing.assert_close(level_splats(p, chunk=6 * 20 * 3), exact)
    # no ink: level 0 and a gain of 1; the gain stays within 1/4-4
    empty = torch.zeros(2, 5, 8)
    empty[..., 2] = empty[..., 4] = 0.05
    assert level_splats(empty).tolist() == [0.0, 0.0]
    assert level_gain(torch.tensor([0.0, 0.1, 0.85, 10.0]), 0.85).tolist() == pytest.approx([1.0, 4.0, 1.0, 0.25])


def test_a_model_with_a_canonical_level_does_not_see_how_faint_the_ink_is():
    torch.manual_seed(0)
    spec = ModelSpec(name="demo-vit", latents=4, resampler_layers=1, resampler_width=32, fourier_bands=2,
                     canonical_spread=0.15, canonical_level=0.85)
    model = from_open_clip("demo-vit", None, spec).eval()
    p = splats(2, 12, 28, 28, seed=6)
    faint, bold = gain_splats(p, torch.full((2, 3), 0.35)), gain_splats(p, torch.full((2, 3), 1.6))
    images = render_dense(p, 28, 28)
    rgb = from_open_clip("demo-vit", None, spec.model_copy(update={"encoder": "rgb"})).eval()
    with torch.no_grad():
        for other in (faint, bold):
            torch.testing.assert_close(model.encode_splats(other), model.encode_splats(p), atol=1e-4, rtol=0)
        torch.testing.assert_close(rgb.encode_image(0.35 * images), rgb.encode_image(images), atol=1e-4, rtol=0)
        plain = from_open_clip("demo-vit", None, spec.model_copy(update={"canonical_level": None})).eval()
        assert (plain.encode_splats(faint) - plain.encode_splats(p)).abs().max() > 1e-2
    # the image the model is shown has its ink at the level, as the splats it reads do
    torch.testing.assert_close(level_images(rgb.view(0.35 * images)), torch.full((2,), 0.85), atol=0, rtol=1e-4)
    with pytest.raises(ValueError):
        ModelSpec(canonical_level=0.0)
    with pytest.raises(ValueError):
        ModelSpec(canonical_level=1.5)
