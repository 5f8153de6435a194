"""Branch-free DSA (augment.py `branch_free_fields` / `apply_fields`): one fixed op sequence for every mode-'S' draw,
equal to `Augment.apply` of that draw, values and gradients, so one captured CUDA graph serves every draw.

Tolerances: float64 1e-10 (crop and flip are bilinear samples at shifted pixel centres: exact up to rounding of the
sampling coordinates); float32 2e-5 absolute on unit-scale images (the ~1e-5 of a shifted grid_sample).
"""

from __future__ import annotations

import pytest
import torch

from distillery.augment import DEFAULT_STRATEGY, PARAM_FIELDS, Augment, AugParams

DIGITS_STRATEGY = "color_crop_cutout_scale_rotate"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def draw_of(augment: Augment, token: str, batch: int, size: tuple[int, int], seed: int = 0) -> AugParams:
    """The first mode-'S' draw from a seeded generator that picked `token`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(500):
        params = augment.sample(batch, gen, size)
        if params.tokens == (token,):
            return params
    raise AssertionError(f"token {token} never drawn")


def images(dtype: torch.dtype, size: tuple[int, int] = (10, 12), batch: int = 6) -> torch.Tensor:
    """Unit-scale images (non-square, so a swapped axis would show)."""
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def cases() -> list[tuple[str, str]]:
    """(strategy, token) for every token of the default and the digits strategy."""
    return [(s, t) for s in (DEFAULT_STRATEGY, DIGITS_STRATEGY) for t in s.split("_")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy,token", cases())
def test_branch_free_equals_apply_values_and_gradients(strategy, token, dtype):
    augment = Augment(strategy)
    x = images(dtype).requires_grad_(True)
    params = draw_of(augment, token, x.shape[0], tuple(x.shape[-2:]))
    ref = augment.apply(x, params)
    got = augment.apply_fields(x, augment.branch_free_fields([params]))
    tol = TOLERANCE[dtype]
    assert (got - ref).abs().max() < tol, (got - ref).abs().max()
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x)
    assert (g_got - g_ref).abs().max() < 4 * tol, (g_got - g_ref).abs().max()
    if token not in ("color",):  # the draw moved something: the comparison is not identity against identity
        assert (ref - x).abs().max() > 1e-2


@pytest.mark.parametrize("strategy", [DEFAULT_STRATEGY, DIGITS_STRATEGY])
def test_fields_have_the_same_shapes_for_every_draw(strategy):
    augment = Augment(strategy)
    signatures = set()
    for token in strategy.split("_"):
        fields = augment.branch_free_fields([draw_of(augment, token, 5, (8, 8))] * 2)
        signatures.add(tuple((tuple(t.shape), t.dtype) for t in fields))
    assert len(signatures) == 1 and len(next(iter(signatures))) == len(PARAM_FIELDS) == 8
    assert next(iter(signatures))[0] == ((10,), torch.float32)  # two draws of 5 images, concatenated


@pytest.mark.parametrize("strategy", [DEFAULT_STRATEGY, DIGITS_STRATEGY])
def test_op_sequence_is_identical_across_draws(strategy):
    """The dispatched aten ops and their output shapes do not depend on the drawn token."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, tuple]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = tuple(tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(o, torch.Tensor))
            self.ops.append((str(func), shapes))
            return out

    augment = Augment(strategy)
    x = images(torch.float32, (8, 8), 4).requires_grad_(True)
    sequences = []
    for token in strategy.split("_"):
        fields = augment.branch_free_fields([draw_of(augment, token, 4, (8, 8))])
        with Record() as rec:
            y = augment.apply_fields(x, fields)
            torch.autograd.grad(y.sum(), x)
        sequences.append(rec.ops)
    assert len(sequences[0]) > 10
    assert all(seq == sequences[0] for seq in sequences)


def test_identity_draw_and_bad_draws():
    augment = Augment(DIGITS_STRATEGY)
    x = images(torch.float64, (8, 8), 3)
    identity = augment.branch_free_fields([AugParams((), (8, 8), 3)])  # no token: every field at its identity value
    assert len(identity) == 8 and torch.allclose(augment.apply_fields(x, identity), x, atol=1e-12)
    assert Augment("none").branch_free_fields([AugParams((), (8, 8), 3)]) == ()
    with pytest.raises(ValueError, match="one drawn token"):
        augment.branch_free_fields([AugParams(("flip",), (8, 8), 3)])  # not a token of the digits strategy
    with pytest.raises(ValueError, match="one drawn token"):
        Augment(mode="M").branch_free_fields([Augment(mode="M").sample(3, torch.Generator(), (8, 8))])
