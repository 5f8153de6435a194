"""MTT buffer.py's expert recipe options (--mom, --l2, --decay) and distill.py's --max_files / --max_experts:
the update equals torch.optim.SGD rebuilt at the lr decay as buffer.py does, the manifest records the recipe, a
resumed run continues exactly, and the store is limited as MTT reads its files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from distillery.augment import Augment
from distillery.cli import build_parser, main
from distillery.data import Split, load_dataset
from distillery.distill import given_from_args, resolve_config
from distillery.methods.mtt import experts_for
from distillery.errors import UserError
from distillery.experts import ExpertStore, expert_seed, limit_experts, train_experts
from distillery.models import init_seeded

MODEL, EPOCHS, LR, BATCH = "ConvNetD2", 5, 0.01, 256


@pytest.fixture(scope="module")
def digits():
    """Digits with a 512-image train split: two minibatches of 256 per expert epoch."""
    ds = copy.copy(load_dataset("digits"))
    ds.train = Split(ds.train.x[:512], ds.train.y[:512])
    return ds


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))


def buffer_py_reference(ds, k: int, seed: int, momentum: float, l2: float, decay: bool) -> torch.Tensor:
    """Expert k trained the way MTT's buffer.py does it: torch.optim.SGD(momentum, weight_decay) on a module, a new
    optimiser with lr x0.1 once epoch `EPOCHS // 2 + 1` is done; the same init, data order and DSA draws as ours."""
    spec = ds.spec
    s = expert_seed(seed, k)
    net = init_seeded(MODEL, spec.channels, spec.num_classes, spec.im_size, s)
    gen = torch.Generator().manual_seed(s)
    augment = Augment(spec.dsa_strategy)
    lr = LR
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=l2)
    rows = [torch.cat([p.detach().flatten() for p in net.parameters()])]
    for e in range(EPOCHS):
        order = torch.randperm(len(ds.train.x), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            with torch.no_grad():
                xb = augment(ds.train.x[idx], gen)
            opt.zero_grad()
            F.cross_entropy(net(xb), ds.train.y[idx]).backward()
            opt.step()
        rows.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        if e in [EPOCHS // 2 + 1] and decay:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=l2)
    return torch.stack(rows)


def test_recipe_matches_buffer_py_and_is_recorded(digits, tmp_path):
    store = train_experts(digits, MODEL, 1, EPOCHS, LR, BATCH, out_dir=tmp_path / "m", seed=3, progress=False,
                          momentum=0.9, weight_decay=5e-3, decay=True)
    ours = store.trajectory(0)
    reference = buffer_py_reference(digits, 0, 3, 0.9, 5e-3, True)
    assert torch.allclose(ours, reference, atol=2e-5, rtol=0), (ours - reference).abs().max()
    plain = buffer_py_reference(digits, 0, 3, 0.0, 0.0, False)
    assert (ours[-1] - plain[-1]).abs().max() > 100 * 2e-5  # the options change the trajectory: the test can fail
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert (manifest["momentum"], manifest["weight_decay"], manifest["decay"]) == (0.9, 5e-3, True)

    with pytest.raises(UserError, match="already holds experts trained with momentum=0.9 \\(this call: 0.0\\)"):
        train_experts(digits, MODEL, 1, EPOCHS, LR, BATCH, out_dir=tmp_path / "m", seed=3, progress=False,
                      weight_decay=5e-3, decay=True)
    with pytest.raises(UserError, match="momentum must be in \\[0, 1\\)"):
        train_experts(digits, MODEL, 1, EPOCHS, LR, BATCH, out_dir=tmp_path / "x", momentum=1.0, progress=False)


def test_resume_with_momentum_is_exact(digits, tmp_path, monkeypatch):
    """A run killed after epoch 2 resumes with the saved momentum buffers and ends where an unbroken run ends."""
    import distillery.experts.train as experts_module

    whole = train_experts(digits, MODEL, 1, EPOCHS, LR, BATCH, out_dir=tmp_path / "whole", progress=False,
                          momentum=0.5).trajectory(0)
    real_save = experts_module._save_epoch

    def save_then_die(out, k, epoch, *args, **kwargs):
        real_save(out, k, epoch, *args, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(experts_module, "_save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_experts(digits, MODEL, 1, EPOCHS, LR, BATCH, out_dir=tmp_path / "cut", progress=False, momentum=0.5)
    monkeypatch.setattr(experts_module, "_save_epoch", real_save)
    resumed = train_experts(digits, MODEL, 1, EPOCHS, LR, BATCH, out_dir=tmp_path / "cut", progress=False,
                            momentum=0.5).trajectory(0)
    assert torch.equal(resumed, whole)


def fake_store(tmp_path, indices: list[int]) -> ExpertStore:
    """A store object over a manifest of unfinished-looking entries (limit_experts reads only the manifest)."""
    manifest = {"epochs": 1, "layout": {"num_params": 1},
                "experts": [{"index": i, "file": f"expert_{i:04d}.safetensors", "sha256": ""} for i in indices]}
    return ExpertStore(tmp_path, manifest, cache=False)


def test_max_files_and_max_experts(tmp_path):
    store = fake_store(tmp_path, list(range(25)))
    index = lambda s: [e["index"] for e in s.experts]  # noqa: E731
    assert limit_experts(store) is store
    assert index(limit_experts(store, max_files=1)) == list(range(10))
    assert index(limit_experts(store, max_files=2, max_experts=3)) == [0, 1, 2, 10, 11, 12]
    limited = limit_experts(store, max_experts=2)
    assert index(limited) == [0, 1, 10, 11, 20, 21] and limited.num_experts == 6
    assert limited._files[3].name == "expert_0011.safetensors"  # position 3 reads expert 11's shard
    assert limit_experts(store, max_files=5).num_experts == 25
    with pytest.raises(UserError, match="leave none of the 3 experts"):
        limit_experts(fake_store(tmp_path, [10, 11, 12]), max_files=1)


def test_distill_flags_reach_the_experts(digits, tmp_path):
    args = build_parser().parse_args(["distill", "--method", "mtt", "--preset", "mtt/digits-ipc1", "--out",
                                      str(tmp_path / "run"), "--expert-momentum", "0.5", "--expert-l2", "1e-4",
                                      "--expert-decay", "true", "--max-experts", "1"])
    config = resolve_config("mtt", given_from_args(args), args.preset)
    assert (config["expert_momentum"], config["expert_l2"], config["expert_decay"]) == (0.5, 1e-4, True)
    assert (config["max_experts"], config["max_files"]) == (1, None)
    config.update(num_experts=2, expert_epochs_train=2)
    store = experts_for(config, digits, torch.device("cpu"), progress=False)
    assert store.num_experts == 1 and store.experts[0]["index"] == 0  # 2 trained, 1 used
    assert store.root.name.endswith("-m0.5-wd0.0001-decay1")  # its own cache entry, not the published recipe's
    assert (store.manifest["momentum"], store.manifest["weight_decay"], store.manifest["decay"]) == (0.5, 1e-4, True)
    for bad in (["--max-files", "0"], ["--expert-momentum", "1"]):
        args = build_parser().parse_args(["distill", "--method", "mtt", "--preset", "mtt/digits-ipc1", "--out",
                                          str(tmp_path / "run2"), *bad])
        with pytest.raises(UserError, match=f"{bad[0]} .* is out of range"):
            resolve_config("mtt", given_from_args(args), args.preset)


def test_experts_command_options(tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["experts", "--dataset", "digits", "--momentum", "1.5", "--out", str(out), "--no-progress"]) == 2
    assert "--momentum 1.5 is out of range: it must be >= 0 and < 1" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written or read
    assert main(["experts", "--dataset", "digits", "--model", MODEL, "--num-experts", "1", "--train-epochs", "2",
                 "--mom", "0.5", "--l2", "1e-4", "--decay", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    recipe = (manifest["momentum"], manifest["weight_decay"], manifest["decay"], manifest["epochs"])
    assert recipe == (0.5, 1e-4, True, 2)


def test_config_records_the_given_store_not_the_recipe_it_would_have_trained(digits, tmp_path):
    """A preset asking for 5 experts x 6 epochs, run on a given 1 x 2 store: config.json says 1 x 2 (and the
    store's lr), as does everything that reads it (the report)."""
    store = tmp_path / "store"
    train_experts(digits, MODEL, 1, epochs=2, lr=0.02, out_dir=store, progress=False)
    args = build_parser().parse_args(["distill", "--method", "mtt", "--preset", "mtt/digits-ipc1", "--out",
                                      str(tmp_path / "run"), "--experts", str(store), "--max-start-epoch", "1",
                                      "--expert-epochs", "1"])
    config = resolve_config(args.method, given_from_args(args), args.preset)
    assert (config["num_experts"], config["expert_epochs_train"], config["expert_lr"]) == (1, 2, 0.02)
    args.max_experts = 1
    args.max_files = 1
    assert resolve_config(args.method, given_from_args(args), args.preset)["num_experts"] == 1
