"""RaT-BPTT (SPEC §6): inner optimisers vs torch.optim, batch and window sampling, the windowed meta-gradient against
a full unroll and finite differences, warm-up isolation (P13), EMA clipping, learned labels, Boost-DD, exact resume."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distillery.augment import Augment
from distillery.errors import UserError
from distillery.methods.bptt import (
    InnerOptimizer, check_window, meta_gradient, sample_batch, warm_up, window_period, window_start,
)
from distillery.methods.ratbptt import (
    BoostSchedule, EmaClipper, RaTBPTT, RaTBPTTConfig, append_block, stream_generator,
)
from distillery.models import FunctionalModel
from distillery.models.convnet import ConvNet

C, IPC = 3, 2
D = torch.float64
AUG = Augment.rat()  # flip_rotate, align_corners=False (SPEC §3.5)


def tiny(seed: int = 0) -> tuple[FunctionalModel, torch.Tensor]:
    """The tiny float64 ConvNet of the brief and its initial flat parameters."""
    torch.manual_seed(seed)  # test code only: the library never seeds the global RNG
    net = ConvNet(channels=1, num_classes=C, im_size=(8, 8), width=4, depth=2).double()
    fm = FunctionalModel(net)
    return fm, fm.flatten(net).detach()


def synthetic(learned: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-blocked float64 set requiring grad; labels hard or (positive, non-one-hot) learned."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(C * IPC, 1, 8, 8, generator=g, dtype=D).requires_grad_(True)
    hard = torch.arange(C).repeat_interleave(IPC)
    if not learned:
        return x, hard
    y = (F.one_hot(hard, C).to(D) + 0.2 * torch.rand(C * IPC, C, generator=g, dtype=D)).requires_grad_(True)
    return x, y


def real(n: int = 12, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=D), torch.randint(C, (n,), generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- inner optimiser -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_inner_optimizer_matches_torch_optim(kind):
    g = torch.Generator().manual_seed(0)
    theta = theta_init = torch.randn(50, generator=g, dtype=D)
    grads = [torch.randn(50, generator=g, dtype=D) for _ in range(6)]
    p = torch.nn.Parameter(theta.clone())
    ref = (torch.optim.Adam([p], lr=1e-2) if kind == "adam"
           else torch.optim.SGD([p], lr=1e-2, momentum=0.9, weight_decay=5e-4))
    opt = InnerOptimizer(kind, lr=1e-2)
    state = opt.init_state(theta)
    for grad in grads:
        p.grad = grad.clone()
        ref.step()
        theta, state = opt.step(theta, grad, state)
        assert torch.allclose(theta, p.detach(), rtol=0, atol=1e-10)
    assert (theta - theta_init).abs().max() > 1e-3  # the comparison is not between two unmoved vectors


def test_inner_adam_is_differentiable_where_a_gradient_is_exactly_zero():
    # sqrt(v) at v = 0 has an infinite derivative; multiplied by a zero it would turn the meta-gradient into NaN.
    w = torch.tensor([1.0, 2.0, 3.0], dtype=D, requires_grad=True)
    grad = w * torch.tensor([1.0, 0.0, 1.0], dtype=D)
    opt = InnerOptimizer("adam", lr=0.1)
    theta, _ = opt.step(torch.zeros(3, dtype=D), grad, opt.init_state(w))
    (gw,) = torch.autograd.grad(theta.sum(), w)
    assert torch.isfinite(gw).all()


def test_inner_optimizer_rejects_unknown_kind():
    with pytest.raises(UserError, match="adam or sgd"):
        InnerOptimizer("rmsprop")


# --- sampling --------------------------------------------------------------------------------------------------------
def test_sample_batch_all_classes_and_task_sampler():
    g = torch.Generator().manual_seed(0)
    idx = sample_batch(4, 5, 4, 3, g)
    assert idx.shape == (12,)
    per_class = (idx // 5).reshape(4, 3)
    assert (per_class == torch.arange(4)[:, None]).all()            # 3 images of every class, class-blocked
    assert all(len(set(r.tolist())) == 3 for r in idx.reshape(4, 3))  # distinct within a class
    assert (idx.reshape(4, 3).diff(dim=1) > 0).all()                 # increasing, like the reference
    seen = set()
    for _ in range(20):
        idx = sample_batch(10, 4, 3, 9, g)                            # 3 classes, min(ipc, 9) = 4 images each
        classes = (idx // 4).reshape(3, 4)
        assert idx.shape == (12,) and (classes == classes[:, :1]).all()
        assert (classes[:, 0].diff() > 0).all()                      # sorted random classes
        seen.update(classes[:, 0].tolist())
    assert len(seen) > 3                                             # the classes do vary


def test_window_start_is_uniform_on_the_inclusive_range():
    starts = [window_start(2, 10, 5, stream_generator(0, 1, i)) for i in range(300)]
    assert set(starts) == {2, 3, 4, 5}                               # [m, T-W] with both ends
    assert window_start(3, 10, 7, torch.Generator()) == 3           # m = T-W: fixed
    for bad in [(10, 0, 0), (10, 11, 0), (10, 5, 6), (10, 5, -1)]:
        with pytest.raises(UserError):
            check_window(*bad)


def test_window_resampled_per_step_or_per_epoch():
    def starts(mode: str) -> list[int]:
        return [window_start(0, 50, 5, stream_generator(0, 1, window_period(it, mode, 4))) for it in range(12)]

    per_epoch = starts("epoch")
    assert all(len(set(per_epoch[e * 4:(e + 1) * 4])) == 1 for e in range(3))  # constant within an epoch
    assert len(set(per_epoch)) > 1
    assert len(set(starts("step"))) > 3                                          # redrawn every step
    with pytest.raises(UserError):
        window_period(0, "sometimes", 4)


# --- the meta-gradient -----------------------------------------------------------------------------------------------
def reference_grads(fm, images, labels, theta0, opt, start, window, real_x, real_y, seed, truncate=True):
    """Autograd through ALL start + window steps with the graph kept, the steps before the window using detached
    images/labels (truncate=True), or nothing detached (truncate=False); same random draws as meta_gradient."""
    gen = torch.Generator().manual_seed(seed)
    theta = theta0.clone().requires_grad_(True)
    state = opt.init_state(theta)
    for k in range(start + window):
        use_graph = k >= start or not truncate
        x_all, y_all = (images, labels) if use_graph else (images.detach(), labels.detach())
        idx = sample_batch(C, IPC, C, IPC, gen)
        loss = F.cross_entropy(fm(theta, AUG(x_all[idx], gen)), y_all[idx])
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta, state = opt.step(theta, grad, state)
    meta = F.cross_entropy(fm(theta, AUG(real_x, gen)), real_y)
    wrt = [images, labels] if labels.requires_grad else [images]
    return torch.autograd.grad(meta, wrt)


@pytest.mark.parametrize("kind,learned", [("adam", False), ("adam", True), ("sgd", True)])
def test_windowed_meta_gradient_equals_truncated_full_unroll(kind, learned):
    fm, theta0 = tiny()
    images, labels = synthetic(learned)
    real_x, real_y = real()
    opt = InnerOptimizer(kind, lr=0.05 if kind == "adam" else 0.2)
    start, window = 3, 2
    loss, gx, gy = meta_gradient(fm, images, labels, theta0, opt, start, window, real_x, real_y, AUG, AUG,
                                 torch.Generator().manual_seed(7), num_classes=C)
    ref = reference_grads(fm, images, labels, theta0, opt, start, window, real_x, real_y, seed=7)
    assert rel(gx, ref[0]) < 1e-9
    assert (gy is None) == (not learned)
    if learned:
        assert rel(gy, ref[1]) < 1e-9
    full = reference_grads(fm, images, labels, theta0, opt, start, window, real_x, real_y, seed=7, truncate=False)
    assert rel(gx, full[0]) > 1e-3  # the truncation is visible, so the comparison above can fail
    assert images.grad is None and loss > 0


def test_meta_gradient_matches_finite_differences():
    fm, theta0 = tiny()
    images, labels = synthetic(learned=True)
    real_x, real_y = real()
    opt = InnerOptimizer("adam", lr=0.05)

    def run(x, y):
        return meta_gradient(fm, x, y, theta0, opt, 0, 3, real_x, real_y, AUG, AUG,
                             torch.Generator().manual_seed(3), num_classes=C)

    _, gx, gy = run(images, labels)
    g = torch.Generator().manual_seed(9)
    dx, dy = torch.randn(images.shape, generator=g, dtype=D), torch.randn(labels.shape, generator=g, dtype=D)
    eps = 1e-6
    fd_x = (run(images + eps * dx, labels)[0] - run(images - eps * dx, labels)[0]) / (2 * eps)
    fd_y = (run(images, labels + eps * dy)[0] - run(images, labels - eps * dy)[0]) / (2 * eps)
    assert abs(fd_x - float((gx * dx).sum())) < 1e-5 * abs(fd_x)
    assert abs(fd_y - float((gy * dy).sum())) < 1e-5 * abs(fd_y)


def test_warm_up_keeps_no_graph_to_the_synthetic_data():  # SPEC P13
    fm, theta0 = tiny()
    images, labels = synthetic(learned=True)
    opt = InnerOptimizer("adam", lr=0.05)
    draw = lambda gen: sample_batch(C, IPC, C, IPC, gen)  # noqa: E731
    theta, state = warm_up(fm, images, labels, theta0, opt, 4, draw, AUG, torch.Generator().manual_seed(0))
    assert not theta.requires_grad and all(not v.requires_grad for v in state.values())
    assert int(state["step"]) == 4 and not torch.equal(theta, theta0)
    assert images.grad is None and labels.grad is None


# --- outer optimisation ----------------------------------------------------------------------------------------------
def test_ema_clipper_follows_spec():
    clip = EmaClipper(0.9)
    # e: 1 (first value) -> 1 - 0.1(1 - 10) = 1.9 -> 1.9 - 0.1(1.9 - 0.5) = 1.76 -> 1.76 - 0.1(1.76 - 100) = 11.584
    expected = [(1.0, 1.0), (10.0, 3.8), (0.5, 0.5), (100.0, 23.168)]
    for norm, clipped in expected:
        g = torch.zeros(4, dtype=D)
        g[1] = norm
        out, raw = clip(g)
        assert raw == pytest.approx(norm)
        assert float(out.norm()) == pytest.approx(clipped, rel=1e-5)
    assert clip.ema == pytest.approx(11.584)
    other = EmaClipper()
    other.load_state_dict(clip.state_dict())
    assert other.ema == clip.ema


def test_boost_schedule_and_block_order():
    b = BoostSchedule((1, 2), beta=0.0, steps_per_block=3)
    assert [b.stage(it) for it in range(8)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert b.ipc(0) == 1 and b.ipc(1) == 3
    assert b.lr_multipliers(1, 2).tolist() == [0, 1, 1, 0, 1, 1]
    x = torch.tensor([[0.0], [1.0]])                                   # classes 0, 1 with one image each
    grown = append_block(x, torch.tensor([[10.0], [11.0], [20.0], [21.0]]), 2)
    assert grown.flatten().tolist() == [0, 10, 11, 1, 20, 21]          # class, then block
    with pytest.raises(UserError):
        BoostSchedule((1, 0))
    with pytest.raises(UserError):
        BoostSchedule((1,), beta=2.0)


# --- the method object -----------------------------------------------------------------------------------------------
class FakePreprocess:
    def meta(self):
        return {"kind": "standard"}

    def tensors(self):
        return {}

    def fingerprint(self):
        return "fake"


def fake_dataset(n_per_class: int = 20, num_classes: int = C) -> SimpleNamespace:
    """The parts of distillery.data.Dataset the method uses (contract of docs/ARCHITECTURE.md)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 1, 8, 8, generator=g) + y[:, None, None, None] * 0.5
    class_indices = [torch.nonzero(y == c).flatten() for c in range(num_classes)]

    def sample_real(c, k, generator):
        return x[class_indices[c][torch.randperm(n_per_class, generator=generator)[:k]]]

    spec = SimpleNamespace(name="fake", channels=1, im_size=(8, 8), num_classes=num_classes,
                           class_names=[str(c) for c in range(num_classes)], default_model="ConvNetD2W4",
                           rat_noise_init=False)
    return SimpleNamespace(spec=spec, train=SimpleNamespace(x=x, y=y), class_indices=class_indices,
                           preprocess=FakePreprocess(), sample_real=sample_real)


def small_config(**kw) -> RaTBPTTConfig:
    base = dict(ipc=2, horizon=6, window=2, min_start=0, real_batch=16, inner_lr=0.01, lr=0.01, seed=3)
    return RaTBPTTConfig(**{**base, **kw})


def test_learned_labels_stay_nonnegative_and_images_move():
    m = RaTBPTT(fake_dataset(), small_config(learn_labels=True, lr=0.5, label_lr_scale=0.5))
    x0, y0 = m.images.detach().clone(), m.labels.detach().clone()
    assert torch.equal(y0, F.one_hot(torch.arange(C).repeat_interleave(2), C).float())
    for it in range(3):
        logs = m.step(it)
        assert m.labels.min() >= 0
        assert 0 <= logs["window_start"] <= 4
    assert not torch.equal(m.labels, y0) and not torch.equal(m.images, x0)
    s = m.synset()
    assert s.label_kind == "learned" and s.images.shape == (6, 1, 8, 8) and s.labels.shape == (6, C)


def test_noise_init_has_unit_norm_images():
    m = RaTBPTT(fake_dataset(), small_config(pix_init="noise"))
    assert torch.allclose(m.images.detach().flatten(1).norm(dim=1), torch.ones(6))


def test_resume_is_exact():
    cfg = small_config(learn_labels=True, window_resample="epoch")
    a = RaTBPTT(fake_dataset(), cfg)
    a.step(0), a.step(1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    a.step(2)
    b = RaTBPTT(fake_dataset(), cfg)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    b.step(2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.clipper.ema == b.clipper.ema


def test_boosting_freezes_earlier_blocks_and_keeps_prefixes_valid():
    m = RaTBPTT(fake_dataset(), small_config(ipc=3, boost_blocks="1,2", boost_beta=0.0, boost_every=2, lr=0.1))
    m.step(0), m.step(1)
    first = m.images.detach().clone()                                  # stage 0: 1 image per class
    assert first.shape[0] == C
    m.step(2)                                                          # stage 1: 1 + 2 images per class
    assert m.images.shape[0] == 3 * C
    grown = m.images.detach().clone()
    m.step(3)
    now = m.images.detach().reshape(C, 3, -1)
    assert torch.equal(now[:, 0], first.reshape(C, -1))                # beta = 0: the first block is frozen
    assert not torch.equal(now[:, 1:], grown.reshape(C, 3, -1)[:, 1:])  # the new block trains
    s = m.synset()
    assert torch.equal(s.prefix(1).images, first) and s.meta["boost_prefix_ipcs"] == [1, 3]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_boost_blocks_must_sum_to_ipc():
    with pytest.raises(UserError, match="sum to"):
        RaTBPTT(fake_dataset(), small_config(ipc=3, boost_blocks="1,1"))
