"""DATM (methods/datm.py): one iteration's gradients equal a port of DATM's iteration, the start-epoch schedule,
the initial images and labels, the threshold, the set it writes, and the config checks.

The port (`datm_iteration`) is written from DATM's distill/DATM.py algorithm: a flat-parameter student, N SGD steps
on synthetic minibatches with `create_graph`, SoftCrossEntropy against softmax(label logits) (or CE on class ids),
the loss ‖θ_N − θ*‖² / ‖θ_0 − θ*‖² (its MSE sums over num_params cancel) and one `backward()` into the leaves.
Data are CIFAR-shaped (3x32x32, 10 classes) on a width-4 ConvNet, on the CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from distillery.data.dataset import Dataset, Split
from distillery.data.preprocess import Standardize
from distillery.data.registry import get_spec
from distillery.errors import UserError
from distillery.experts import train_experts
from distillery.methods import mtt as mtt_module
from distillery.methods.datm import DATM, DATMConfig, check_datm_options, softmax_pullback, start_upper_bound
from distillery.sets.synset import SyntheticSet

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

MODEL = "ConvNetW4"   # ConvNet depth 3, width 4: CIFAR-shaped but cheap
PER_CLASS = 6


def tiny_cifar() -> Dataset:
    """Random CIFAR-shaped data (10 classes x 6 train images) with the CIFAR-10 spec."""
    spec = get_spec("cifar10")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(spec.num_classes).repeat_interleave(PER_CLASS)
    x = torch.randn(len(y), 3, 32, 32, generator=gen) + 0.5 * y.view(-1, 1, 1, 1) / spec.num_classes
    split = Split(x, y)
    return Dataset(spec, Standardize(spec.mean, spec.std), split, split, split, "memory")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = tiny_cifar()
    store = train_experts(ds, MODEL, 2, epochs=4, lr=0.01, batch=16, out_dir=tmp_path_factory.mktemp("experts"),
                          progress=False)
    return ds, store


def config(**kw) -> DATMConfig:
    base = dict(ipc=1, model=MODEL, syn_steps=3, expert_epochs=1, max_start_epoch=3, lr_img=100.0, lr_lr=1e-5,
                batch_syn=5, min_start_epoch=0, current_max_start_epoch=2, expansion_end_epoch=4, lr_y=2.0)
    return DATMConfig(**{**base, **kw})


def soft_cross_entropy(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DATM's SoftCrossEntropy: sum(−log_softmax(inputs) · softmax(target)) / batch."""
    return torch.sum(-F.log_softmax(inputs, dim=1) * F.softmax(target, dim=1)) / inputs.shape[0]


def datm_iteration(fm, image_syn, label_syn, syn_lr, starting_params, target_params, plan, augment, soft: bool):
    """DATM's iteration (distill/DATM.py, the loop body): returns loss and the .grad of images, step size, labels."""
    image_syn = image_syn.detach().clone().requires_grad_(True)
    syn_lr = syn_lr.detach().clone().requires_grad_(True)
    label_syn = label_syn.detach().clone().requires_grad_(soft)
    criterion = soft_cross_entropy if soft else F.cross_entropy
    student_params = [starting_params.detach().clone().requires_grad_(True)]
    for step in range(plan.steps):
        these_indices = plan.indices[step]
        x = augment.apply(image_syn[these_indices], plan.aug[step])
        this_y = label_syn[these_indices]
        ce_loss = criterion(fm(student_params[-1], x), this_y)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = starting_params.numel()
    param_loss = F.mse_loss(student_params[-1], target_params, reduction="sum") / num_params
    param_dist = F.mse_loss(starting_params, target_params, reduction="sum") / num_params
    grand_loss = param_loss / param_dist
    grand_loss.backward()
    return float(grand_loss.detach()), image_syn.grad, syn_lr.grad, label_syn.grad if soft else None


def captured_gradient(method: DATM, it: int, monkeypatch):
    """`method.gradient(it)`, recording the inputs its gradient mode was called with."""
    seen = {}
    mode = mtt_module.GRADS[method.cfg.grad]

    def spy(fm, images, labels, lr, theta_start, theta_target, plan, augment, **kw):
        seen.update(theta_start=theta_start, theta_target=theta_target, plan=plan)
        return mode(fm, images, labels, lr, theta_start, theta_target, plan, augment, **kw)

    monkeypatch.setitem(mtt_module.GRADS, method.cfg.grad, spy)
    res, _ = method.gradient(it)
    return res, seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("labels", ["learned", "hard"])
def test_gradients_equal_datm_port(setup, labels, monkeypatch):
    ds, store = setup
    method = DATM(ds, store, config(labels=labels))
    res, seen = captured_gradient(method, 3, monkeypatch)
    soft = labels == "learned"
    targets = method.label_logits if soft else method.labels
    loss, g_img, g_lr, g_y = datm_iteration(method.fm, method.images, targets, method.lr, seen["theta_start"],
                                            seen["theta_target"], seen["plan"], method.augment, soft)
    assert res.loss == pytest.approx(loss, rel=1e-5)
    assert rel(res.grad_images, g_img) < 1e-5
    assert float(res.grad_lr) == pytest.approx(float(g_lr), rel=1e-4, abs=1e-9)
    if soft:
        assert rel(softmax_pullback(method.label_logits, res.grad_labels), g_y) < 1e-5
    else:
        assert res.grad_labels is None


def test_checkpointed_equals_unrolled(setup):
    ds, store = setup
    unrolled = DATM(ds, store, config(syn_steps=5)).gradient(3)[0]
    checkpointed = DATM(ds, store, config(syn_steps=5, grad="checkpointed")).gradient(3)[0]
    assert checkpointed.loss == pytest.approx(unrolled.loss, rel=1e-6)
    for a, b in ((checkpointed.grad_images, unrolled.grad_images), (checkpointed.grad_labels, unrolled.grad_labels),
                 (checkpointed.grad_lr.view(1), unrolled.grad_lr.view(1))):
        assert rel(a, b) < 1e-6


def test_tesla_mode_differentiates_the_labels(setup):
    ds, store = setup
    res = DATM(ds, store, config(grad="tesla")).gradient(3)[0]
    assert res.grad_labels is not None and res.grad_labels.shape == (10, 10) and res.grad_labels.abs().sum() > 0


def test_start_epoch_schedule():
    # DATM: Upper_Bound = c + int((max - c) * it / expansion_end), capped at max; randint(min, Upper_Bound)
    assert [start_upper_bound(it, 20, 10, 1000) for it in (0, 99, 100, 500, 1000, 5000)] == [10, 10, 11, 15, 20, 20]
    assert start_upper_bound(7, 20, None, 1000) == 20


def test_start_epochs_stay_in_range(setup, monkeypatch):
    ds, store = setup
    method = DATM(ds, store, config(min_start_epoch=1, current_max_start_epoch=2, max_start_epoch=3,
                                    expansion_end_epoch=1000))
    starts = {method.gradient(it)[1] for it in range(6)}
    assert starts == {1}  # [1, 2) at the first iterations


def test_initial_images_and_labels(setup):
    ds, store = setup
    method = DATM(ds, store, config(ipc=2))
    images, logits = method.images.detach(), method.label_logits.detach()
    hard = torch.arange(10).repeat_interleave(2)
    thetas = list(method.expert_thetas())
    from distillery.methods.tesla import expert_logits

    per_expert = torch.stack([expert_logits(method.fm, t, images) for t in thetas])
    right = per_expert.argmax(2) == hard
    for i in range(len(images)):  # every image is a train image of its class
        match = (ds.train.x == images[i]).flatten(1).all(1).nonzero().flatten()
        assert len(match) == 1 and int(ds.train.y[match]) == int(hard[i])
        want = per_expert[right[:, i], i].mean(0) if right[:, i].any() else per_expert[:, i].mean(0)
        assert torch.allclose(logits[i], want, atol=1e-6)
    # a class whose train images expert 0 classifies correctly at least twice gets two such images
    train_right = expert_logits(method.fm, thetas[0], ds.train.x).argmax(1) == ds.train.y
    for c in range(10):
        if int(train_right[ds.train.y == c].sum()) >= 2:
            assert bool(right[0, 2 * c:2 * c + 2].all()), c
    assert 0 < int(right.sum()) < right.numel()  # the experts are right on some images, wrong on others
    assert torch.allclose(method.labels, torch.softmax(logits, 1))


def test_threshold_skips_the_update(setup):
    ds, store = setup
    method = DATM(ds, store, config(threshold=1e-9))
    before = (method.images.detach().clone(), method.label_logits.detach().clone(), method.lr.item())
    logs = method.step(0)
    assert logs["skipped"] == 1.0
    assert torch.equal(method.images.detach(), before[0]) and torch.equal(method.label_logits.detach(), before[1])
    assert method.lr.item() == before[2]
    logs = DATM(ds, store, config()).step(0)
    assert logs["skipped"] == 0.0


def test_step_moves_labels_and_set_records_them(setup, tmp_path):
    ds, store = setup
    method = DATM(ds, store, config())
    start = method.label_logits.detach().clone()
    method.step(0)
    assert not torch.equal(method.label_logits.detach(), start)
    s = method.synset()
    assert s.label_kind == "learned" and s.meta["method"] == "datm" and s.labels.shape == (10, 10)
    assert torch.allclose(s.labels.sum(1), torch.ones(10))
    s.save(tmp_path / "set.safetensors")
    assert torch.equal(SyntheticSet.load(tmp_path / "set.safetensors").labels, s.labels)
    again = DATM(ds, store, config())  # resume: the same logits and label optimiser state
    again.load_state_dict(method.state_dict())
    assert torch.equal(again.label_logits.detach(), method.label_logits.detach())
    fresh = DATM(ds, store, config())  # --init-from: z = log p gives back the set's probabilities
    fresh.init_from(s)
    assert torch.allclose(fresh.labels, s.labels, atol=1e-6)


def test_config_checks():
    base = dataclasses.asdict(config())
    check_datm_options(base, 10, "the experts")
    for change, flag in (({"min_start_epoch": 3}, "--min-start-epoch"),
                         ({"current_max_start_epoch": 4}, "--current-max-start-epoch"),
                         ({"fast": "on"}, "--fast"), ({"label_epoch": 11}, "--label-epoch")):
        with pytest.raises(UserError, match=flag):
            check_datm_options({**base, **change}, 10, "the experts")


@pytest.mark.parametrize("n_train, channels, size, classes, ipc", [
    (60, 1, 8, 3, 1), (1078, 1, 8, 10, 1), (45000, 3, 32, 10, 10), (45000, 3, 32, 100, 10)])
def test_derived_defaults_pass_every_check(n_train, channels, size, classes, ipc):
    from distillery.config.defaults import DataFacts
    from distillery.distill import config_classes
    from distillery.config.validate import check_config as check_all

    facts = DataFacts("toy", channels, (size, size), classes, n_train, max(ipc, n_train // classes),
                      "color_crop_cutout_flip_scale_rotate", None)
    config = {f.name: f.default for cls in config_classes("datm") for f in dataclasses.fields(cls)}
    config.update(method="datm", experts=None, **DATM.derive_defaults(facts, ipc))
    check_all(config, config_classes("datm"), facts)
    DATM.check_config(config, facts)
    assert config["min_start_epoch"] < config["current_max_start_epoch"] < config["max_start_epoch"]


def test_presets_pass_every_check():
    from distillery.distill import resolve_config
    from distillery.config.presets import PRESETS, list_presets

    names = list_presets("datm")
    assert {PRESETS[n]["dataset"] for n in names} == {"cifar10", "cifar100", "tiny-imagenet"}
    for name in names:
        config = resolve_config("datm", {}, name)  # every declared, cross-option and data check
        assert config["method"] == "datm" and config["syn_steps"] == PRESETS[name]["syn_steps"]
        assert "configs/" in PRESETS[name]["note"] and "unverified" in PRESETS[name]["note"]


@pytest.mark.slow
def test_cli_run_writes_a_learned_label_set_that_evaluate_uses(tmp_path, monkeypatch, capsys):
    import json

    from distillery.cli import main

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["distill", "--method", "datm", "--dataset", "digits", "--ipc", "2", "--out", str(out),
                 "--num-experts", "2", "--expert-epochs-train", "4", "--max-start-epoch", "3",
                 "--current-max-start-epoch", "2", "--expansion-end-epoch", "3", "--syn-steps", "4",
                 "--grad", "checkpointed", "--iterations", "4", "--eval-every", "2", "--eval-runs", "1",
                 "--final-eval-runs", "1", "--eval-epochs", "5", "--threads", "1", "--no-progress"]) == 0
    s = SyntheticSet.load(out / "best.safetensors")
    assert s.meta["method"] == "datm" and s.label_kind == "learned" and s.labels.shape == (20, 10)
    best = json.loads((out / "result.json").read_text())["best"]
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.safetensors"), "--runs", "1", "--eval-epochs", "5", "--threads", "1",
                 "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["label_kind"] == "learned"
    assert evaluated["mean"] == pytest.approx(best["test_mean"])  # the run's final test used the same labels
