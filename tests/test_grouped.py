"""K networks as one grouped ConvNet equal K separate networks; the plain-autograd expert step equals torch.func's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

from distillery.augment import Augment
from distillery.experts import _sgd_epoch
from distillery.evaluation.training import augment_each, grouped_step, plain_step
from distillery.models import FunctionalModel, create_model, init_seeded
from distillery.models.grouped import GroupedConvNet, groupable

MODELS = ["ConvNetD2W8", "ConvNetD2W8GAP", "ConvNetD1W6MP", "ConvNetD2W8NN"]


def flats_of(name: str, k: int) -> tuple[FunctionalModel, torch.Tensor]:
    """A float64 template of `name` for 1x8x8 digits-like input and K different seeded inits as flat vectors."""
    fm = FunctionalModel(create_model(name, 1, 3, (8, 8)).double())
    return fm, torch.stack([fm.flatten(init_seeded(name, 1, 3, (8, 8), s)).detach().double() for s in range(k)])


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("name", MODELS)
def test_grouped_forward_and_grads_equal_separate_networks(name: str) -> None:
    fm, flats = flats_of(name, 3)
    net = GroupedConvNet(fm.module, 3)
    assert torch.equal(net.to_flats(net.from_flats(flats)), flats)
    x, y = data(12)
    xs, ys = x.view(3, 4, 1, 8, 8), y.view(3, 4)
    torch.testing.assert_close(net(net.from_flats(flats), xs), torch.stack([fm(f, xb) for f, xb in zip(flats, xs)]))
    grads, losses = grouped_step(fm, 3)(flats, xs, ys)
    ref = vmap(grad_and_value(lambda f, xb, yb: F.cross_entropy(fm(f, xb), yb)))(flats, xs, ys)
    torch.testing.assert_close(grads, ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, ref[1])


def test_groupable_refuses_layernorm_and_other_models() -> None:
    assert groupable(create_model("ConvNet", 3, 10, (32, 32)))
    assert not groupable(create_model("ConvNetLN", 3, 10, (32, 32)))
    assert not groupable(create_model("MLP", 3, 10, (32, 32)))


def test_augment_each_equals_separate_calls() -> None:
    x, _ = data(24)
    xs = list(x.view(4, 6, 1, 8, 8))
    aug = Augment("color_crop_cutout_flip_scale_rotate")
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    twins = [torch.Generator().manual_seed(s) for s in range(4)]
    for _ in range(5):
        together = augment_each(aug, xs, gens)
        torch.testing.assert_close(together, torch.stack([aug(xb, g) for xb, g in zip(xs, twins)]), rtol=0, atol=0)


def test_expert_epochs_plain_and_grouped_equal_the_torch_func_path() -> None:
    """One SGD epoch of 3 experts: grouped (K = 3) and plain (K = 1 each) equal vmap(grad_and_value), float64."""
    fm, flats = flats_of("ConvNetD2W8", 3)
    x, y = data(40)
    aug = Augment("color_crop_cutout_flip_scale_rotate")

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + s) for s in range(3)]

    ref_step = vmap(grad_and_value(lambda f, xb, yb: F.cross_entropy(fm(f, xb), yb)))
    ref, ref_loss = _sgd_epoch(ref_step, flats, gens(), x, y, aug, 16, 0.1)
    grouped, grouped_loss = _sgd_epoch(grouped_step(fm, 3), flats, gens(), x, y, aug, 16, 0.1)
    plain = torch.cat([_sgd_epoch(plain_step(fm), flats[i:i + 1], [g], x, y, aug, 16, 0.1)[0]
                       for i, g in enumerate(gens())])
    assert not torch.allclose(ref, flats)
    torch.testing.assert_close(grouped, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plain, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grouped_loss, ref_loss)


@pytest.mark.parametrize("soft", [False, True])
def test_evaluation_runs_together_equal_runs_one_by_one(soft: bool) -> None:
    """R = 3 evaluation runs (SPEC §7: momentum, weight decay, the lr drop) trained at once equal 3 separate ones."""
    from distillery.evaluation.dsa import train_runs

    x, y = data(20)
    if soft:
        y = torch.softmax(torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    args = ("ConvNetD2W8", x, y, 1, 3, 4, 0.05, 8, "color_crop_cutout_flip_scale_rotate", [5, 6, 7])
    alone, together = train_runs(*args, together=False), train_runs(*args, together=True)
    fm = FunctionalModel(alone[0])
    first = fm.flatten(alone[0]).detach()
    assert not torch.allclose(first, fm.flatten(init_seeded("ConvNetD2W8", 1, 3, (8, 8), 5)).double())
    for a, b in zip(alone, together):
        torch.testing.assert_close(fm.flatten(b).detach(), fm.flatten(a).detach(), rtol=1e-9, atol=1e-11)


def test_plain_step_in_chunks_equals_the_whole_batch() -> None:
    """The CPU step runs the batch a chunk at a time (uneven last chunk too): the same gradient and loss, float64."""
    fm, flats = flats_of("ConvNetD2W8", 1)
    x, y = data(23)
    whole = plain_step(fm, chunk=23)(flats, x[None], y[None])
    for chunk in (5, 8):
        grads, losses = plain_step(fm, chunk=chunk)(flats, x[None], y[None])
        torch.testing.assert_close(grads, whole[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(losses, whole[1], rtol=1e-12, atol=1e-14)
    ref = grad_and_value(lambda f: F.cross_entropy(fm(f, x), y))(flats[0])
    torch.testing.assert_close(whole[0][0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whole[1][0], ref[1])
