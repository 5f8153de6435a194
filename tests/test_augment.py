"""DSA tests (SPEC §3, §10.2 item 6): shapes, gradients, ranges, siamese pairing, generator hygiene, composition."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from distillery.augment import TOKENS, Augment, AugParams, DSAParams
from distillery.errors import UserError


def gen(seed: int = 0) -> torch.Generator:
    """A fresh CPU generator."""
    return torch.Generator().manual_seed(seed)


def images(n: int = 8, size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random (n, 3, size, size) images."""
    return torch.randn(n, 3, size, size, generator=gen(seed), dtype=dtype)


def ramp(n: int, size: int = 32) -> torch.Tensor:
    """Images linear in the pixel coordinates, on which bilinear resampling is exact away from the border."""
    i = torch.arange(size, dtype=torch.float32)
    plane = 0.03 * i[:, None] - 0.02 * i[None, :]
    offsets = torch.linspace(-1, 1, n).view(n, 1, 1, 1) + torch.tensor([0.0, 0.5, -0.5]).view(1, 3, 1, 1)
    return plane + offsets


ALL = [(token, "S") for token in TOKENS] + [("color_crop_cutout_flip_scale_rotate", "M")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy,mode", ALL)
def test_ops_preserve_shape_and_dtype(strategy: str, mode: str, dtype: torch.dtype) -> None:
    x = images(dtype=dtype)
    y = Augment(strategy, mode)(x, gen())
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("compose", [True, False])
@pytest.mark.parametrize("strategy,mode", ALL)
def test_gradient_reaches_input(strategy: str, mode: str, compose: bool) -> None:
    x = images().requires_grad_()
    y = Augment(strategy, mode, compose=compose)(x, gen())
    (y * torch.randn(y.shape, generator=gen(1))).sum().backward()
    assert x.grad is not None and (x.grad != 0).any() and torch.isfinite(x.grad).all()


def test_flip_twice_is_identity() -> None:
    aug = Augment("flip")
    x = images(64)
    p = aug.sample(64, gen(), 16)
    assert 0 < int(p.flip.sum()) < 64  # both outcomes occur
    assert torch.equal(aug.apply(aug.apply(x, p), p), x)
    assert torch.equal(aug.apply(x, p)[p.flip], x[p.flip].flip(3))


def test_brightness_shift_in_range() -> None:
    aug = Augment("color")
    p = aug.sample(1024, gen(), 16)
    assert p.brightness.min() >= -0.5 and p.brightness.max() < 0.5
    assert p.brightness.min() < -0.45 and p.brightness.max() > 0.45
    # On a constant image saturation and contrast are no-ops, so the output minus the input is the shift itself.
    x = torch.full((1024, 3, 4, 4), 0.3)
    shift = aug.apply(x, dataclasses.replace(p, im_size=(4, 4))) - x
    torch.testing.assert_close(shift, p.brightness.view(-1, 1, 1, 1).expand_as(x), atol=1e-6, rtol=0)


def test_parameter_ranges_match_spec() -> None:
    aug = Augment(mode="M")
    p = aug.sample(4096, gen(), 32)
    assert 0 <= p.saturation.min() and p.saturation.max() < 2.0
    assert 0.5 <= p.contrast.min() and p.contrast.max() < 1.5
    assert set(p.translate.unique().tolist()) == set(range(-4, 5))  # s = int(32 * 0.125 + 0.5) = 4
    centre = p.cutout[:, :2] + 8
    assert (p.cutout[:, 2:] - p.cutout[:, :2] == 16).all()  # k = 16
    assert centre.min() == 0 and centre.max() == 32  # U{0 .. H - k mod 2}
    assert 1 / 1.2 <= p.scale.min() and p.scale.max() < 1.2
    assert p.rotate.abs().max() <= math.radians(15) and p.rotate.abs().max() > math.radians(14)
    assert 0.45 < p.flip.float().mean() < 0.55


def test_ops_match_their_definitions() -> None:
    n, size = 6, 9
    x = images(n, size)
    p = Augment(mode="M").sample(n, gen(3), size)
    expected_crop = torch.zeros_like(x)
    expected_cut = x.clone()
    for b in range(n):
        dr, dc = p.translate[b].tolist()
        top, left, bottom, right = p.cutout[b].tolist()
        expected_cut[b, :, max(top, 0) : bottom, max(left, 0) : right] = 0
        for i in range(size):
            for j in range(size):
                if 0 <= i + dr < size and 0 <= j + dc < size:
                    expected_crop[b, :, i, j] = x[b, :, i + dr, j + dc]

    def only(token: str) -> AugParams:
        """The M-mode draw restricted to one token."""
        return dataclasses.replace(p, tokens=(token,))

    assert torch.equal(Augment("crop").apply(x, only("crop")), expected_crop)
    assert torch.equal(Augment("cutout").apply(x, only("cutout")), expected_cut)

    b_, s_, c_ = (v.view(-1, 1, 1, 1) for v in (p.brightness, p.saturation, p.contrast))
    y = x + b_
    y = (y - y.mean(1, keepdim=True)) * s_ + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * c_ + y.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(Augment("color").apply(x, only("color")), y)

    phi = p.rotate
    theta = torch.stack([phi.cos(), -phi.sin(), 0 * phi, phi.sin(), phi.cos(), 0 * phi], 1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    expected = F.grid_sample(x, grid, align_corners=True)
    torch.testing.assert_close(Augment("rotate").apply(x, only("rotate")), expected)


@pytest.mark.parametrize("compose", [True, False])
@pytest.mark.parametrize("strategy,mode", ALL)
def test_siamese_params_act_identically_on_any_batch(strategy: str, mode: str, compose: bool) -> None:
    aug = Augment(strategy, mode, compose=compose)
    p = aug.sample(8, gen(5), 16, shared=True)
    assert p.shared and all(t.shape[0] == 1 for t in vars(p).values() if isinstance(t, torch.Tensor))
    real, syn = images(8, seed=1), images(3, seed=2)
    perm = torch.randperm(8, generator=gen(6))
    y_real = aug.apply(real, p)
    torch.testing.assert_close(aug.apply(real[perm], p), y_real[perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(aug.apply(torch.cat([syn, real]), p)[3:], y_real, rtol=0, atol=1e-6)
    same = aug.apply(real[:1].expand(5, -1, -1, -1), p)
    assert (same == same[:1]).all()  # one transform for every image


def test_per_image_params_differ_and_must_match_batch() -> None:
    aug = Augment("rotate")
    p = aug.sample(8, gen(), 16)
    assert p.rotate.unique().numel() == 8
    with pytest.raises(ValueError, match="8 images"):
        aug.apply(images(5), p)
    with pytest.raises(ValueError, match="size"):
        aug.apply(images(8, size=12), p)


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    x = images(4).requires_grad_()
    for mode in "SM":
        aug = Augment(mode=mode)
        aug(x, gen()).sum().backward()
        aug.apply(x, aug.sample(4, gen(1), 16, shared=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_same_output_different_seed_different() -> None:
    x = images(16)
    for mode in "SM":
        aug = Augment(mode=mode)
        assert torch.equal(aug(x, gen(7)), aug(x, gen(7)))
        assert not torch.equal(aug(x, gen(7)), aug(x, gen(8)))


def test_mode_s_picks_one_token_per_call_uniformly() -> None:
    aug = Augment(mode="S")
    g = gen()
    counts = {token: 0 for token in TOKENS}
    for _ in range(600):
        p = aug.sample(4, g, 16)
        assert len(p.tokens) == 1
        counts[p.tokens[0]] += 1
    assert all(60 < c < 140 for c in counts.values()), counts
    assert Augment(mode="M").sample(4, g, 16).tokens == TOKENS


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("strategy", ["crop_cutout_flip_scale", "crop_rotate", "flip_rotate", "cutout_flip_scale"])
def test_composed_warp_is_exact_with_one_resampling(strategy: str, align_corners: bool) -> None:
    x = images(32, 32)
    composed = Augment(strategy, "M", align_corners=align_corners)
    sequential = Augment(strategy, "M", align_corners=align_corners, compose=False)
    p = composed.sample(32, gen(2), 32)
    torch.testing.assert_close(composed.apply(x, p), sequential.apply(x, p), rtol=0, atol=1e-4)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("strategy", ["crop_flip_scale_rotate", "rotate_scale"])
def test_composed_vs_sequential_differ_by_interpolation_error(
    strategy: str, align_corners: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    grid_sample = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: calls.append(1) or grid_sample(*a, **k))
    x = ramp(64)
    composed = Augment(strategy, "M", align_corners=align_corners)
    sequential = Augment(strategy, "M", align_corners=align_corners, compose=False)
    p = composed.sample(64, gen(4), 32)
    y_c = composed.apply(x, p)
    assert len(calls) == 1
    y_s = sequential.apply(x, p)
    assert len(calls) == 3
    diff = (y_c - y_s).abs()
    # Bilinear resampling is exact on a linear image, so the two agree wherever no zero-filled edge is near ...
    torch.testing.assert_close(y_c[..., 10:22, 10:22], y_s[..., 10:22, 10:22], rtol=0, atol=1e-4)
    # ... and differ only in a thin band along the clipped frame.
    assert diff.mean() < 0.02 and (diff > 0.05).float().mean() < 0.08


def test_crop_as_translation_lands_on_pixel_centres() -> None:
    x = images(16, 32)
    for align_corners in (True, False):
        aug = Augment("crop_scale", "M", align_corners=align_corners)
        p = aug.sample(16, gen(), 32)
        p = dataclasses.replace(p, scale=torch.ones_like(p.scale))  # the warp is then the crop alone
        torch.testing.assert_close(aug.apply(x, p), Augment("crop").apply(x, p), rtol=0, atol=1e-4)


def test_strategy_validation() -> None:
    with pytest.raises(UserError, match=r"'blur'.*color, crop, cutout, flip, scale, rotate"):
        Augment("color_blur")
    with pytest.raises(UserError, match="repeats"):
        Augment("flip_flip")
    with pytest.raises(UserError, match="mode"):
        Augment(mode="X")


@pytest.mark.parametrize("aug", [Augment("none"), Augment("None"), Augment(""), Augment.none(), Augment("none", "M")])
def test_identity_strategies(aug: Augment) -> None:
    g = gen()
    state = g.get_state()
    x = images()
    assert aug(x, g) is x
    assert torch.equal(g.get_state(), state)


def test_rat_mode() -> None:
    aug = Augment.rat()
    assert (aug.tokens, aug.mode, aug.align_corners) == (("flip", "rotate"), "S", False)
    g = gen()
    assert {aug.sample(4, g, 16).tokens for _ in range(50)} == {("flip",), ("rotate",)}
    assert aug(images(), g).shape == (8, 3, 16, 16)


def test_usable_under_torch_func() -> None:
    aug = Augment(mode="M")
    x = images(4, dtype=torch.float64)
    p = aug.sample(4, gen(), 16)
    grad = torch.func.grad(lambda z: aug.apply(z, p).square().sum())(x)
    assert grad.shape == x.shape and (grad != 0).any()
    batched = torch.func.vmap(lambda z: aug.apply(z, p))(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batched[1], aug.apply(2 * x, p))


def test_params_move_between_devices_and_keep_defaults() -> None:
    assert DSAParams() == DSAParams(0.5, 1.2, 15.0, 0.125, 0.5, 0.05, 1.0, 2.0, 0.5)
    p = Augment().sample(4, gen(), 16, device="cpu")
    assert isinstance(p, AugParams) and p.to("cpu").tokens == p.tokens
