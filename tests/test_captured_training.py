"""Evaluation training from captured CUDA graphs (`evaluation.training.train_captured`, `evaluate_set(fast=True)`).

CPU: the flat SGD that gets captured, run eagerly (`capture=False`), trains one network like `dsa.train_model`
(float64, with DSA, a short last batch and the lr decay), and the captured step under emulated replays trains like it
too. Meta device: the captured
functions (this step, MTT's unroll, TESLA's two passes) run on tensors without data, so none of them reads a value
back to the host or builds a shape from data (what capture forbids). CUDA (skipped without a GPU): the replayed
graphs equal the eager step, and `evaluate_set(fast=True)` equals the plain evaluation.
"""

from __future__ import annotations

import pytest
import torch

from distillery.augment import Augment
from distillery.errors import UserError
from distillery.evaluation.dsa import train_model, train_runs
from distillery.evaluation.training import capturable, plain_step, sgd_static, train_captured
from distillery.methods.tesla import tesla_grads
from distillery.methods.trajectory import PackedPlan, make_plan, unrolled_grads
from distillery.models import FunctionalModel, init_seeded

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
MODEL, CHANNELS, CLASSES, SIZE = "ConvNetD2W8", 3, 3, (16, 16)
DSA = "color_crop_cutout_flip_scale_rotate"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def data(dtype: torch.dtype, device: str = "cpu", n: int = 10):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, CHANNELS, *SIZE, generator=gen, dtype=dtype)
    return x.to(device), (torch.arange(n) % CLASSES).to(device)


def captured(x, y, seeds, strategy, epochs=3, batch=4, capture=False):
    """Flat weights after `train_captured` of one network per seed."""
    template = init_seeded(MODEL, CHANNELS, CLASSES, SIZE, 0).to(x.device, x.dtype)
    fm = FunctionalModel(template)
    return [train_captured(template, fm.flatten(init_seeded(MODEL, CHANNELS, CLASSES, SIZE, s)).detach().to(x.device),
                           x, y, epochs, 0.05, batch, Augment(strategy), torch.Generator(device=x.device).manual_seed(s),
                           capture=capture) for s in seeds]


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("strategy", [DSA, "none"])
def test_eager_captured_step_trains_like_train_model(strategy):
    """One network, 10 images in batches of 4, 4 and 2, 4 passes with the decay after the third: float64."""
    x, y = data(torch.float64)
    (got,) = captured(x, y, [7], strategy)
    model = train_model(MODEL, x, y, CHANNELS, CLASSES, epochs=3, lr=0.05, batch=4, strategy=strategy, seed=7)
    ref = FunctionalModel(model).flatten(model).detach()
    assert not torch.equal(ref, FunctionalModel(model).flatten(init_seeded(MODEL, CHANNELS, CLASSES, SIZE, 7)))
    assert_close(got, ref, 1e-9)


def test_soft_labels_and_divergence():
    """Per-image probability vectors train like train_model; a diverging run raises FloatingPointError."""
    x, _ = data(torch.float64)
    y = torch.softmax(torch.randn(len(x), CLASSES, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    (got,) = captured(x, y, [0], DSA, epochs=2)
    model = train_model(MODEL, x, y, CHANNELS, CLASSES, epochs=2, lr=0.05, batch=4, strategy=DSA, seed=0)
    assert_close(got, FunctionalModel(model).flatten(model).detach(), 1e-9)
    with pytest.raises(FloatingPointError, match="non-finite"):
        captured(x * 1e300, y, [0], "none", epochs=1)


def test_what_can_be_captured_and_where():
    """BatchNorm statistics live outside the flat state: not capturable; fast evaluation needs CUDA."""
    plain = init_seeded(MODEL, CHANNELS, CLASSES, SIZE, 0)
    assert capturable(plain)
    assert not capturable(init_seeded("ConvNetBN", CHANNELS, CLASSES, SIZE, 0))
    x, y = data(torch.float32)
    with pytest.raises(UserError, match="--eval-fast off"):
        train_runs(MODEL, x, y, CHANNELS, CLASSES, 1, 0.01, 4, DSA, [0], fast=True)
    with pytest.raises(ValueError, match="mode-'S'"):
        train_captured(plain, FunctionalModel(plain).flatten(plain).detach(), x, y, 1, 0.01, 4,
                       Augment(DSA, mode="M"), torch.Generator())


def meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def test_captured_evaluation_step_runs_on_meta_tensors():
    """On the meta device .item(), nonzero and CPU tensors mixed in all fail: the step needs no host read."""
    augment = Augment(DSA)
    template = init_seeded(MODEL, CHANNELS, CLASSES, SIZE, 0)
    step = plain_step(FunctionalModel(template.to("meta")))
    draws = [augment.sample(4, torch.Generator().manual_seed(0), SIZE)]
    flat = torch.zeros(FunctionalModel(template).num_params, device="meta")
    x, y = data(torch.float32)
    loss = sgd_static(step, augment, meta(x), meta(y), flat, torch.zeros_like(flat), meta(torch.tensor(0.1)),
                      meta(torch.randint(10, (4,))), tuple(meta(t) for t in augment.branch_free_fields(draws)))
    assert loss.device.type == "meta" and loss.shape == ()


def test_mtt_captured_functions_run_on_meta_tensors():
    augment = Augment(DSA)
    fm = FunctionalModel(init_seeded(MODEL, CHANNELS, CLASSES, SIZE, 0).to("meta"))
    x, y = data(torch.float32, n=6)
    packed = make_plan(6, 3, 4, augment, torch.Generator().manual_seed(0), SIZE, "cpu").packed(augment)
    plan = PackedPlan(packed.sizes, meta(packed.indices), tuple(meta(t) for t in packed.aug))
    theta = torch.zeros(fm.num_params, device="meta")
    for grads in (unrolled_grads, tesla_grads):
        out = grads(fm, meta(x), meta(y), meta(torch.tensor(0.01)), theta, theta, plan, augment)
        assert [t.device.type for t in out] == ["meta"] * 3 and out[1].shape == x.shape


@CUDA
def test_replayed_graphs_equal_the_eager_step():
    x, y = data(torch.float32, "cuda")
    for a, b in zip(captured(x, y, [0, 1], DSA, capture=True), captured(x, y, [0, 1], DSA, capture=False)):
        assert_close(a, b, 1e-4)


@CUDA
def test_fast_train_runs_equal_plain():
    x, y = data(torch.float32, "cuda")
    args = (MODEL, x, y, CHANNELS, CLASSES, 3, 0.05, 4, DSA, [0, 1])
    for fast, plain in zip(train_runs(*args, fast=True), train_runs(*args)):
        assert_close(FunctionalModel(fast).flatten(fast).detach(), FunctionalModel(plain).flatten(plain).detach(), 1e-4)


def test_capture_warm_up_leaves_the_state_as_it_was(fake_cuda_graphs):
    """Warm-up calls run the step for real; the state they moved is put back before the capture (conftest's fake
    `torch.cuda.graph` runs the captured call too)."""
    from distillery.capture import Captured

    weights, calls = torch.zeros(3), []

    def step(w, inc):
        calls.append(1)
        w.add_(inc)
        return w.sum()

    Captured(step, [torch.ones(3)], [weights], warmup=3)
    assert len(calls) == 4 and torch.equal(weights, torch.ones(3))  # 3 warm-ups undone, then the captured call


class _CallEachTime:
    """`capture.Captured` without graph semantics: every call runs the captured function on the given inputs."""

    def __init__(self, fn, inputs, state=(), warmup=3, option="--fast") -> None:
        self.fn, self.state = fn, list(state)

    def __call__(self, inputs):
        return self.fn(*self.state, *inputs)


def test_training_loop_with_replay_semantics_trains_like_plain(monkeypatch, replay_on_cpu):
    """The loop around the graphs (static buffers, state updated in place, the momentum restart) under emulated
    replays: the same weights as calling the captured step directly, so capture adds nothing but the graph itself;
    and those equal the eager epochs (ordinary DSA) up to float rounding."""
    import distillery.evaluation.training as gt

    x, y = data(torch.float64)
    monkeypatch.setattr(gt, "Captured", replay_on_cpu)
    replayed = captured(x, y, [4, 5], DSA, capture=True)
    monkeypatch.setattr(gt, "Captured", _CallEachTime)
    for a, b, c in zip(replayed, captured(x, y, [4, 5], DSA, capture=True), captured(x, y, [4, 5], DSA)):
        assert torch.equal(a, b)
        assert_close(a, c, 1e-9)


@pytest.mark.parametrize("k,momentum,weight_decay,decay", [(0, 0.0, 0.0, False), (1, 0.0, 0.0, True),
                                                          (1, 0.9, 5e-4, True)])
def test_experts_from_captured_steps_equal_plain(monkeypatch, replay_on_cpu, tmp_path, k, momentum, weight_decay,
                                                 decay):
    """`--fast on` experts (`_train_expert` with captured FlatSGD steps under emulated replays): the same snapshots,
    momentum buffers and final weights as the eager epochs, with the buffer.py recipes."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    import distillery.evaluation.training as gt
    from distillery.experts import train as experts

    monkeypatch.setattr(gt, "Captured", replay_on_cpu)
    template = init_seeded(MODEL, CHANNELS, CLASSES, SIZE, 0).to(torch.float64)
    x, y = data(torch.float64)
    fm = FunctionalModel(template)

    def init(s: int) -> torch.Tensor:
        return fm.flatten(init_seeded(MODEL, CHANNELS, CLASSES, SIZE, s)).detach().to(torch.float64)

    finals = {}
    for fast in (False, True):
        out = tmp_path / str(fast)
        finals[fast] = experts._train_expert(fm, init, (x, y), Augment(DSA), k, 0, 3, 0.05, 4, decay, out,
                                             tqdm(disable=True), momentum, weight_decay, fast)
    assert_close(finals[True], finals[False], 1e-9)
    plain = sorted(p.relative_to(tmp_path / "False") for p in (tmp_path / "False").rglob("*.safetensors"))
    assert plain == sorted(p.relative_to(tmp_path / "True") for p in (tmp_path / "True").rglob("*.safetensors"))
    for rel in plain:
        a, b = load_file(tmp_path / "True" / rel), load_file(tmp_path / "False" / rel)
        assert a.keys() == b.keys(), rel  # no momentum buffer saved where the recipe has none
        for key in a:
            if a[key].is_floating_point() and b[key].abs().max() > 0:
                assert_close(a[key], b[key], 1e-9)
            else:
                assert torch.equal(a[key], b[key]), (rel, key)  # generator states: the same draws


def test_fast_experts_need_cuda(tmp_path):
    from distillery.data import load_dataset
    from distillery.experts import train_experts

    with pytest.raises(UserError, match="--fast on replays captured CUDA graphs but the device is cpu"):
        train_experts(load_dataset("digits"), MODEL, 1, epochs=1, out_dir=tmp_path / "e", device="cpu", fast=True,
                      progress=False)
    assert not (tmp_path / "e").exists()
