"""The plain-autograd step of one network (experts, fast evaluation) equals torch.func's, in chunks or whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad_and_value

from distillery.augment import Augment
from distillery.evaluation.training import FlatSGD, plain_step
from distillery.models import FunctionalModel, create_model, init_seeded


def flat_of(name: str, seed: int) -> tuple[FunctionalModel, torch.Tensor]:
    """A float64 template of `name` for 1x8x8 digits-like input and a seeded init as a flat vector."""
    fm = FunctionalModel(create_model(name, 1, 3, (8, 8)).double())
    return fm, fm.flatten(init_seeded(name, 1, 3, (8, 8), seed)).detach().double()


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_flat_sgd_epoch_equals_the_torch_func_path() -> None:
    """One SGD epoch (momentum, weight decay, DSA, a short last batch) equals the same loop with grad_and_value."""
    fm, flat = flat_of("ConvNetD2W8", 1)
    x, y = data(40)
    aug = Augment("color_crop_cutout_flip_scale_rotate")
    ref, buf = flat.clone(), torch.zeros_like(flat)
    grad_fn = grad_and_value(lambda f, xb, yb: F.cross_entropy(fm(f, xb), yb))
    gen = torch.Generator().manual_seed(100)
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), 16):
        idx = order[i:i + 16]
        grad, _ = grad_fn(ref, aug(x[idx], gen), y[idx])
        buf = 0.9 * buf + grad + 5e-4 * ref
        ref = ref - 0.1 * buf
    ours = flat.clone()
    FlatSGD(plain_step(fm), aug, x, y, ours, torch.zeros_like(ours), 0.9, 5e-4).epoch(
        torch.Generator().manual_seed(100), 16, 0.1)
    assert not torch.allclose(ref, flat)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_plain_step_in_chunks_equals_the_whole_batch() -> None:
    """The CPU step runs the batch a chunk at a time (uneven last chunk too): the same gradient and loss, float64."""
    fm, flat = flat_of("ConvNetD2W8", 0)
    x, y = data(23)
    whole = plain_step(fm, chunk=23)(flat, x, y)
    for chunk in (5, 8):
        grad, loss = plain_step(fm, chunk=chunk)(flat, x, y)
        torch.testing.assert_close(grad, whole[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(loss, whole[1], rtol=1e-12, atol=1e-14)
    ref = grad_and_value(lambda f: F.cross_entropy(fm(f, x), y))(flat)
    torch.testing.assert_close(whole[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whole[1], ref[1])
