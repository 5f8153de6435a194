"""RaT-BPTT's CUDA-graph path (`--fast on`, `ratbptt.GraphedRat`) against the plain `meta_gradient`.

CPU: GraphedRat with `capture.Captured` replaced by an eager stand-in that keeps CUDA's replay semantics (conftest
`replay_on_cpu`) gives the plain meta-gradient (float64, rel 1e-9) and leaves the generator where the plain path
leaves it, for Adam (both window formulas) and SGD, hard and learned labels, sampled classes, chunked meta-losses,
with and without augmentation; the two captured functions (`bptt.warm_up_step`, `bptt.window_grads` on packed plans)
run on the meta device (no host sync, no data-dependent shape); the method with fast "on" trains like fast "off".
CUDA (skipped without a GPU): real captures and replays.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import distillery.capture as capture
from distillery.augment import Augment
from distillery.errors import UserError
from distillery.methods.bptt import InnerOptimizer, meta_gradient, warm_up_step, window_grads
from distillery.methods.graphed import GraphedRat
from distillery.methods.trajectory import PackedPlan
from distillery.methods.ratbptt import RaTBPTT, RaTBPTTConfig
from distillery.models import FunctionalModel, init_seeded

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
C, IPC, SIZE = 3, 2, (8, 8)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def problem(dtype: torch.dtype, device: str, learned: bool, n_real: int = 12):
    """A float ConvNet, θ_0, a class-blocked set (hard or learned labels) and a real batch."""
    fm = FunctionalModel(init_seeded("ConvNetD2W4", 1, C, SIZE, 0).to(device, dtype))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(C * IPC, 1, *SIZE, generator=g, dtype=dtype)
    y = torch.arange(C).repeat_interleave(IPC)
    if learned:
        y = F.one_hot(y, C).to(dtype) + 0.2 * torch.rand(C * IPC, C, generator=g, dtype=dtype)
    real_x, real_y = torch.randn(n_real, 1, *SIZE, generator=g, dtype=dtype), torch.randint(C, (n_real,), generator=g)
    x, y, real_x, real_y = (t.to(device) for t in (x, y, real_x, real_y))
    return fm, fm.flatten(fm.module).detach(), x.requires_grad_(True), y.requires_grad_(learned), real_x, real_y


def both(fm, theta0, x, y, real_x, real_y, start, window, opt, window_opt, augment, chunk, graphed, seed=5, **kw):
    """(plain, graphed) results and generator states after each, same draws."""
    out = []
    for fn in ("plain", "graphed"):
        gen = torch.Generator(device=x.device).manual_seed(seed)
        if fn == "plain":
            res = meta_gradient(fm, x, y, theta0, opt, start, window, real_x, real_y, augment, augment, gen,
                                num_classes=C, window_optimizer=window_opt, real_chunk=chunk, **kw)
        else:
            res = graphed(x, y, theta0, start, window, real_x, real_y, gen, num_classes=C, **kw)
        out.append((res, gen.get_state()))
    return out


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = b.abs().max().item()
    assert scale > 0 and (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("kind,adam,learned,augment,chunk,sampling", [
    ("adam", "higher", False, True, None, {}),
    ("adam", "torch", True, True, 5, {}),
    ("sgd", "torch", False, False, None, {"task_sampler_nc": 2, "batch_per_class": 1}),
    ("adam", "higher", True, False, 5, {"batch_per_class": 1}),
])
def test_graphed_meta_gradient_equals_plain(monkeypatch, replay_on_cpu, kind, adam, learned, augment, chunk,
                                            sampling):
    """Three calls on one GraphedRat (window starts 3, 0 and 2: graphs captured once, then replayed) equal the plain
    meta-gradient each time, and the generator ends where the plain path leaves it."""
    monkeypatch.setattr(capture, "Captured", replay_on_cpu)
    fm, theta0, x, y, real_x, real_y = problem(torch.float64, "cpu", learned)
    opt = InnerOptimizer(kind, 0.01)
    window_opt = opt.with_adam(adam)
    aug = Augment.rat() if augment else None
    graphed = GraphedRat(fm, opt, window_opt, aug, aug, chunk)
    for seed, start in ((5, 3), (6, 0), (7, 2)):
        (plain, plain_gen), (fast, fast_gen) = both(fm, theta0, x, y, real_x, real_y, start, 2, opt, window_opt, aug,
                                                    chunk, graphed, seed, **sampling)
        assert torch.equal(plain_gen, fast_gen)  # the same draws in the same order
        assert abs(fast[0] - plain[0]) <= 1e-9 * abs(plain[0])
        assert_close(fast[1], plain[1], 1e-9)
        if learned:
            assert_close(fast[2], plain[2], 1e-9)
        else:
            assert fast[2] is None and plain[2] is None
    assert graphed.captures == 2  # one warm-up step graph, one window graph; start 0 replays no warm-up


def test_a_new_set_shape_recaptures(monkeypatch, replay_on_cpu):
    """Boost-DD grows the set: the graphs of the old shape are dropped and the new shape is captured."""
    monkeypatch.setattr(capture, "Captured", replay_on_cpu)
    fm, theta0, x, y, real_x, real_y = problem(torch.float64, "cpu", False)
    opt = InnerOptimizer("adam", 0.01)
    graphed = GraphedRat(fm, opt, opt, None, None, None)
    graphed(x, y, theta0, 1, 2, real_x, real_y, torch.Generator().manual_seed(0), num_classes=C)
    bigger = torch.cat([x, x]).detach().requires_grad_(True)
    labels = torch.arange(C).repeat_interleave(2 * IPC)
    (plain, _), (fast, _) = both(fm, theta0, bigger, labels, real_x, real_y, 1, 2, opt, opt, None, None, graphed)
    assert graphed.captures == 4 and len(graphed._graphs) == 2
    assert_close(fast[1], plain[1], 1e-9)


def test_captured_functions_run_on_meta_tensors():
    """Both captured functions on tensors without data: any .item(), host read or data-dependent shape raises."""
    fm, theta0, x, y, real_x, real_y = problem(torch.float32, "cpu", True)
    fm = FunctionalModel(init_seeded("ConvNetD2W4", 1, C, SIZE, 0).to("meta"))
    aug = Augment.rat()
    gen = torch.Generator().manual_seed(0)
    fields = aug.branch_free_fields([aug.sample(4, gen, SIZE, device="cpu") for _ in range(2)])
    meta = [t.detach().to("meta") for t in (theta0, x, y, real_x, real_y)]
    theta, x, y, real_x, real_y = meta
    plan = PackedPlan((4, 4), torch.zeros(8, dtype=torch.long, device="meta"), tuple(t.to("meta") for t in fields))
    for kind in ("adam", "sgd"):
        opt = InnerOptimizer(kind, 0.01)
        state = opt.init_state(theta)
        warm_up_step(fm, opt, x, y, theta, state, plan, 1, aug)
        out = window_grads(fm, opt.with_adam("higher"), x, y, True, theta, state, plan, aug, real_x, real_y, 5)
        assert [t.shape for t in out] == [torch.Size([]), x.shape, y.shape]


def fake_dataset(dtype: torch.dtype = torch.float32, device: str = "cpu") -> SimpleNamespace:
    """The parts of distillery.data.Dataset RaTBPTT uses (as tests/test_ratbptt.py's)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(C).repeat_interleave(20)
    x = (torch.randn(len(y), 1, *SIZE, generator=g) + y[:, None, None, None] * 0.5).to(device, dtype)
    y = y.to(device)
    class_indices = [torch.nonzero(y == c).flatten() for c in range(C)]

    def sample_real(c, k, generator):
        return x[class_indices[c][torch.randperm(20, generator=generator, device=generator.device)[:k]]]

    spec = SimpleNamespace(name="fake", channels=1, im_size=SIZE, num_classes=C, class_names=list("abc"),
                           default_model="ConvNetD2W4", rat_noise_init=False)
    preprocess = SimpleNamespace(meta=lambda: {"kind": "standardize"}, tensors=lambda: {})
    return SimpleNamespace(spec=spec, train=SimpleNamespace(x=x, y=y), class_indices=class_indices,
                           preprocess=preprocess, sample_real=sample_real)


def config(**kw) -> RaTBPTTConfig:
    base = dict(ipc=2, horizon=6, window=2, real_batch=16, inner_lr=0.01, lr=0.01, seed=3, learn_labels=True)
    return RaTBPTTConfig(**{**base, **kw})


def test_method_with_fast_on_trains_like_fast_off(monkeypatch, replay_on_cpu):
    """Three outer steps of RaTBPTT (learned labels, random window starts): the same images, labels and logs."""
    monkeypatch.setattr(capture, "Captured", replay_on_cpu)
    off, on = RaTBPTT(fake_dataset(), config()), RaTBPTT(fake_dataset(), config(fast="on"))
    assert off.graphed is None and on.graphed is not None
    for it in range(3):
        a, b = off.step(it), on.step(it)
        assert a["window_start"] == b["window_start"] and abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert_close(on.images.detach(), off.images.detach(), 1e-4)
    assert_close(on.labels.detach(), off.labels.detach(), 1e-4)


def test_fast_is_off_by_default_and_refused_on_cpu():
    from distillery.config.validate import check_fast

    assert RaTBPTTConfig().fast == "off"
    with pytest.raises(UserError, match="--fast on replays captured CUDA graphs but the device is cpu"):
        check_fast(dataclasses.asdict(config(fast="on")), "cpu")


@CUDA
@pytest.mark.parametrize("learned", [False, True])
def test_cuda_graphs_equal_plain(learned):
    """Real captures: three calls (starts 3, 0, 2) replay the two graphs and equal the plain path (float32)."""
    fm, theta0, x, y, real_x, real_y = problem(torch.float32, "cuda", learned)
    opt = InnerOptimizer("adam", 0.01)
    graphed = GraphedRat(fm, opt, opt.with_adam("higher"), Augment.rat(), Augment.rat(), 5)
    for seed, start in ((5, 3), (6, 0), (7, 2)):
        (plain, _), (fast, _) = both(fm, theta0, x, y, real_x, real_y, start, 2, opt, opt.with_adam("higher"),
                                     Augment.rat(), 5, graphed, seed)
        assert_close(fast[1], plain[1], 1e-4)
        if learned:
            assert_close(fast[2], plain[2], 1e-4)
    assert graphed.captures == 2


@CUDA
def test_cuda_method_fast_on_equals_off():
    off = RaTBPTT(fake_dataset(device="cuda"), config())
    on = RaTBPTT(fake_dataset(device="cuda"), config(fast="on"))
    for it in range(3):
        off.step(it), on.step(it)
    assert_close(on.images.detach(), off.images.detach(), 1e-3)
