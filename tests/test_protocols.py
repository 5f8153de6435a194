"""Evaluation protocols (issue 9): RaT-BPTT's published test() as the `rat` protocol, the protocol a set records,
selection of the step count on validation, --val-fraction 0, the cross-architecture table, --init-from, the cctype 1
plateau curriculum and budgets in the published units."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillery.augment import Augment
from distillery.cli import main
from distillery.data import load_dataset
from distillery.errors import UserError
from distillery.sets.init_from import load_init_set
from distillery.methods import Method
from distillery.methods.bptt import sample_batch
from distillery.methods.ratbptt import Plateau, RaTBPTT, RaTBPTTConfig
from distillery.models.convnet import ConvNet
from distillery.evaluation.protocol import rat_protocol
from distillery.evaluation.rat import train_rat
from distillery.run.config import LoopConfig
from distillery.run.loop import run_distillation
from distillery.evaluation.score import evaluate_synset, resolve_protocol, set_protocols
from distillery.sets.synset import SyntheticSet

C, IPC = 4, 3
D = torch.float64
AUG = Augment("flip_rotate", mode="S", align_corners=False)


def published_test_loop(net, x, y, counts, inner_opt, lr, nc, bpc, seed):
    """A port of base.py test() / distill_higher.py init_train for one network: (parameters, optimiser) after each
    cumulative count. Batches and augmentation are replayed from the same generator stream as ours."""
    net = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    if inner_opt == "adam":
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    start_epoch, snapshots = 0, []
    for count in counts:  # for train_time in range(len(epoch_list)): init_train(epoch_list[t] - start_epoch)
        net.train()
        for _ in range(count - start_epoch):
            optimizer.zero_grad()
            idx = sample_batch(C, IPC, nc, bpc, gen)  # subsample()
            imgs = AUG(x[idx], gen)  # syn_intervention(imgs, dtype='syn')
            loss = F.cross_entropy(net(imgs), y[idx])  # learned labels: probability targets
            loss.backward()
            optimizer.step()
        snapshots.append([p.detach().clone() for p in net.parameters()])
        start_epoch = count
    return snapshots, net, optimizer


@pytest.mark.parametrize("inner_opt,nc,bpc", [("adam", C, IPC), ("adam", 2, 2), ("sgd", 3, 1)])
def test_rat_protocol_trains_exactly_as_the_published_test_loop(inner_opt, nc, bpc):
    torch.manual_seed(0)  # test code only
    net = ConvNet(channels=1, num_classes=C, im_size=(8, 8), width=4, depth=2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(C * IPC, 1, 8, 8, generator=g, dtype=D)
    y = F.one_hot(torch.arange(C).repeat_interleave(IPC), C).to(D) + 0.3 * torch.rand(C * IPC, C, generator=g,
                                                                                      dtype=D)
    counts, lr = (5, 12, 20), 1e-2
    ref, ref_net, ref_opt = published_test_loop(net, x, y, counts, inner_opt, lr, nc, bpc, seed=3)
    ours_net = copy.deepcopy(net)
    seen = []
    proto = rat_protocol("ConvNetD2", 1, 0, inner_opt, lr, "flip_rotate", counts, nc, bpc)
    opt = train_rat(ours_net, x, y, C, proto, torch.Generator().manual_seed(3),
                    lambda count, m: seen.append((count, [p.detach().clone() for p in m.parameters()])))
    assert [c for c, _ in seen] == list(counts)
    for (_, ours), theirs in zip(seen, ref):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for p_ours, p_ref in zip(ours_net.parameters(), ref_net.parameters()):  # the optimiser states too
        s_ours, s_ref = opt.state[p_ours], ref_opt.state[p_ref]
        assert s_ours.keys() == s_ref.keys()
        assert all(torch.equal(torch.as_tensor(s_ours[k]), torch.as_tensor(s_ref[k])) for k in s_ref)
    # the comparison can fail: another learning rate gives other weights
    other, _, _ = published_test_loop(net, x, y, counts, inner_opt, 2 * lr, nc, bpc, seed=3)
    assert not all(torch.equal(a, b) for a, b in zip(seen[-1][1], other[-1]))


def _split(n, g, shift=0.0):
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(C, (n,), generator=g)
    return SimpleNamespace(x=x + shift * y.view(-1, 1, 1, 1).float(), y=y)


def fake_dataset(val: int = 40):
    """A tiny separable 4-class dataset in memory (class-dependent brightness)."""
    g = torch.Generator().manual_seed(0)
    spec = SimpleNamespace(name="fake", channels=1, num_classes=C, im_size=(8, 8), default_model="ConvNetD2",
                           dsa_strategy="flip")
    return SimpleNamespace(spec=spec, train=_split(80, g, 0.5), val=_split(val, g, 0.5), test=_split(60, g, 0.5))


def rat_set(ds, steps=(2, 5, 9)):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(C * IPC, 1, 8, 8, generator=g) + 0.5 * torch.arange(C).repeat_interleave(IPC).view(-1, 1, 1, 1)
    meta = {"method": "ratbptt", "dataset": "fake", "num_classes": C, "model": "ConvNetD2", "protocol": "rat",
            "rat_eval": {"inner_opt": "adam", "inner_lr": 1e-2, "strategy": "flip", "task_sampler_nc": None,
                         "batch_per_class": None, "steps": list(steps)}}
    return SyntheticSet(x, torch.arange(C).repeat_interleave(IPC), "hard", None, {}, meta)


def test_rat_step_count_is_chosen_on_validation_never_on_test():
    ds = fake_dataset()
    s = rat_set(ds)
    own = set_protocols(s, ds.spec)[0][0].replace(runs=2, seed=1)
    res = evaluate_synset(s, ds, own)
    assert res.protocol == "rat" and res.model == "ConvNetD2" and res.steps in (2, 5, 9)
    best = max(res.val_by_steps.values())
    assert res.steps == min(c for c, v in res.val_by_steps.items() if v == best)
    # scrambling the test labels changes the test accuracy but not the choice
    scrambled = SimpleNamespace(**{**vars(ds), "test": SimpleNamespace(x=ds.test.x, y=ds.test.y.flip(0))})
    res2 = evaluate_synset(s, scrambled, own)
    assert res2.steps == res.steps and res2.val_by_steps == res.val_by_steps
    # no validation split: nothing to choose on, the longest count
    res3 = evaluate_synset(s, fake_dataset(val=0), own.replace(runs=1))
    assert res3.steps == 9 and res3.val_by_steps is None
    # --protocol dsa overrides the set's own
    dsa, _ = resolve_protocol(s, ds.spec, "dsa", {"--runs": ("runs", 1), "--epochs": ("epochs", 2)})
    assert evaluate_synset(s, ds, dsa).protocol == "dsa"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.1)


def tiny_rat(ds, **kw):
    base = dict(ipc=1, model="ConvNetD1", horizon=4, window=2, real_batch=512, syn_strategy="none",
                real_strategy="none", lr=0.01, rat_eval_steps="2,4")
    return RaTBPTT(ds, RaTBPTTConfig(**{**base, **kw}))


def test_rat_set_records_its_protocol_and_init_from(digits, tmp_path):
    m = tiny_rat(digits, learn_labels=True)
    s = m.synset()
    assert s.meta["protocol"] == "rat"
    assert set_protocols(s, digits.spec)[0][0] == rat_protocol("ConvNetD1", 5, 0, augment="none", steps=(2, 4))
    s.images.add_(1.0)
    s.labels.mul_(0.5)
    s.save(tmp_path / "s.safetensors")
    other = tiny_rat(digits, learn_labels=True, seed=7)
    init = load_init_set(str(tmp_path / "s.safetensors"), {"method": "ratbptt", "dataset": "digits", "ipc": 1})
    other.init_from(init)
    assert torch.equal(other.images.detach(), s.images) and torch.equal(other.labels.detach(), s.labels)
    assert other.images.requires_grad
    with pytest.raises(UserError, match="images per class"):
        load_init_set(str(tmp_path / "s.safetensors"), {"method": "mtt", "dataset": "digits", "ipc": 2})
    with pytest.raises(UserError, match="distilled on digits"):
        load_init_set(str(tmp_path / "s.safetensors"), {"method": "mtt", "dataset": "mnist", "ipc": 1})
    plain = Method(digits, None)  # the default: images only
    plain.images = torch.zeros_like(s.images).requires_grad_(True)
    plain.init_from(init)
    assert torch.equal(plain.images.detach(), s.images)


def test_plateau_curriculum_moves_the_window_and_stops_at_the_cap():
    p = Plateau(start=0, cap=4, window=2, patience=3)
    assert not p.observe(0, 1.0) and p.start == 0
    assert not p.observe(2, 1.5) and p.start == 0          # worse, but within the patience
    assert not p.observe(3, 1.2) and p.start == 2          # 3 epochs without improvement: start += W
    assert not p.observe(4, 0.5) and p.start == 2          # improved
    assert not p.observe(7, 0.9) and p.start == 4          # capped at T - W
    assert p.observe(10, 0.9)                              # a plateau at the cap ends the run
    q = Plateau(0, 4, 2, 3)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()


def test_plateau_method_uses_the_eval_train_loss(digits):
    m = tiny_rat(digits, window_mode="plateau", plateau_patience=1, min_start=0)
    assert m.wants_eval_train_loss and m._window_start(0) == 0
    spe = m.consts.steps_per_epoch
    assert not m.observe_eval(0, 1.0)
    assert not m.observe_eval(spe, 2.0) and m._window_start(spe) == 2   # horizon 4 - window 2 = the cap
    assert m.observe_eval(2 * spe, 2.0)


def test_val_fraction_zero_best_is_last_and_says_so(tmp_path, capsys):
    assert len(load_dataset("digits", zca="kip", val_fraction=0.0).val.y) == 0  # ZCA of an empty split works too
    ds = load_dataset("digits", val_fraction=0.0)
    m = tiny_rat(ds)
    loop = LoopConfig(iterations=2, eval_every=1, eval_runs=1, eval_epochs=2, final_eval_runs=1,
                      eval_models="ConvNetD1,MLP")
    result = run_distillation(m, ds, tmp_path / "run", loop, progress=False)
    out = capsys.readouterr().out
    assert "nothing to select on" in out and "best = last" in out
    assert result["selection"].startswith("none") and result["best"] == result["last"]
    assert result["best"]["iteration"] == 2 and result["best"]["val_acc"] is None
    assert [r["protocol"] for r in result["best"]["by_protocol"]] == ["rat", "dsa"]
    assert set(result["best"]["models"]) == {"ConvNetD1", "MLP"}
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["selection"] == result["selection"]
    assert "MLP " in out and "ConvNetD1 " in out  # the cross-architecture table, one row per model


def test_evaluate_prints_one_row_per_model(digits, tmp_path, capsys):
    s = tiny_rat(digits).synset()
    path = tmp_path / "set.safetensors"
    s.save(path)
    args = [str(path), "--eval-models", "ConvNetD2,ConvNet,AlexNet", "--runs", "1", "--eval-epochs", "2",
            "--protocol", "dsa", "--no-progress", "--threads", "1"]
    assert main(["evaluate", *args, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [ln for ln in lines if ln.split() and ln.split()[0] in ("ConvNetD2", "ConvNet", "AlexNet")]
    assert [r.split()[0] for r in rows] == ["ConvNetD2", "ConvNet", "AlexNet"]
    assert all("±" in r and "dsa protocol" in r for r in rows)
    assert set(json.loads(lines[-1])["models"]) == {"ConvNetD2", "ConvNet", "AlexNet"}
    # a model that cannot take 8x8 images: one line, before any training
    assert main(["evaluate", str(path), "--eval-models", "ConvNet,VGG11", "--no-progress"]) == 2
    assert "VGG11" in capsys.readouterr().err


def test_presets_state_budgets_in_published_units(capsys):
    assert main(["presets", "--method", "ratbptt"]) == 0
    out = capsys.readouterr().out
    block = out.split("ratbptt/cifar10-ipc10\n")[1].split("\nratbptt/")[0]
    assert "published --epochs 60000" in block and f"= {60000 * 10} outer steps" in block
    assert '"window_resample": "epoch"' in block and '"inner_adam": "higher"' in block
    assert out.count("budget:") == out.count("source:")


def test_distill_epochs_budget_and_init_from_through_the_cli(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    init = tiny_rat(digits).synset()
    init.images.add_(0.25)
    init.save(tmp_path / "init.safetensors")
    out = tmp_path / "run"
    code = main(["distill", "--method", "ratbptt", "--dataset", "digits", "--ipc", "1", "--model", "ConvNetD1",
                 "--out", str(out), "--epochs", "1", "--real-batch", "512", "--horizon", "4",
                 "--window", "2", "--rat-eval-steps", "2", "--eval-every", "100", "--eval-runs", "1",
                 "--eval-epochs", "1", "--final-eval-runs", "1", "--init-from", str(tmp_path / "init.safetensors"),
                 "--threads", "1", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0
    steps = -(-len(digits.train.y) // 512)  # one pass over the real data
    assert f"budget: --real-epochs 1 x {steps} outer steps" in stdout and f"= {steps} iterations" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["last"]["iteration"] == steps
    last = SyntheticSet.load(out / "last.safetensors")  # 3 Adam steps at the preset's lr 0.01 from the given set;
    assert float((last.images - init.images).abs().max()) < 0.05  # without --init-from it would be 0.25 away
    assert json.loads((out / "config.json").read_text())["init_from"] == str(tmp_path / "init.safetensors")


def test_run_loop_feeds_the_plateau_and_stops_when_it_says_so(digits, tmp_path, capsys):
    m = tiny_rat(digits, window_mode="plateau", plateau_patience=1)
    seen = []

    def observe(it, loss):
        seen.append((it, loss))
        return it == 2

    m.observe_eval = observe
    loop = LoopConfig(iterations=6, eval_every=1, eval_runs=1, eval_epochs=1, final_eval_runs=1)
    result = run_distillation(m, digits, tmp_path / "run", loop, progress=False)
    assert [it for it, _ in seen] == [0, 1, 2] and all(loss > 0 for _, loss in seen)  # the train-split CE
    assert result["last"]["iteration"] == 2 and "plateau curriculum ended the run at iteration 2" in \
        capsys.readouterr().out


def test_rat_set_stores_its_preprocessing_fingerprint(tmp_path, capsys):
    """A RaT-BPTT set records the fingerprint of its preprocessing, so `evaluate` refuses other preprocessing (an
    image folder's mean/std are fitted on the train split, which --val-fraction changes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(tmp_path / split / c / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.25)
    s = tiny_rat(ds, real_batch=8).synset()
    assert s.preprocess["meta"]["fingerprint"] == ds.preprocess.fingerprint()
    s.save(tmp_path / "rat.safetensors")
    assert main(["evaluate", str(tmp_path / "rat.safetensors"), "--val-fraction", "0.5", "--runs", "1"]) == 2
    assert "preprocessed differently" in capsys.readouterr().err
