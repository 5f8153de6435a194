"""Expert trajectories: recipe, store format, validation on open, corruption and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from distillery.experts import train as experts
from distillery.data import load_dataset
from distillery.errors import UserError
from distillery.experts import ExpertStore, epoch_lr, expert_seed, train_experts
from distillery.models import FunctionalModel, create_model, init_seeded

MODEL = "ConvNetD2W16"
EPOCHS = 2
SETTINGS = dict(num_experts=2, epochs=EPOCHS, lr=0.1, batch=128, seed=3, progress=False)


@pytest.fixture(scope="module")
def ds():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(ds, tmp_path_factory):
    return train_experts(ds, MODEL, out_dir=tmp_path_factory.mktemp("experts"), **SETTINGS)


@pytest.fixture()
def store_copy(trained, tmp_path):
    shutil.copytree(trained.root, tmp_path / "store")
    return tmp_path / "store"


def _fm(ds, model=MODEL):
    spec = ds.spec
    return FunctionalModel(create_model(model, spec.channels, spec.num_classes, spec.im_size))


def test_trajectory_shape_and_seeded_init(ds, trained):
    spec = ds.spec
    assert trained.num_experts == 2 and trained.epochs == EPOCHS
    for k in range(2):
        traj = trained.trajectory(k)
        assert traj.shape == (EPOCHS + 1, _fm(ds).num_params) and traj.dtype == torch.float32
        init = init_seeded(MODEL, spec.channels, spec.num_classes, spec.im_size, expert_seed(SETTINGS["seed"], k))
        assert torch.equal(traj[0], _fm(ds).flatten(init).detach())
    assert not torch.equal(trained.checkpoint(0, 0), trained.checkpoint(1, 0))


def test_experts_learn(ds, trained):
    fm = _fm(ds)
    for k, entry in enumerate(trained.experts):
        assert entry["val_acc"] > 0.3  # chance is 0.1
        with torch.no_grad():
            losses = [F.cross_entropy(fm(trained.checkpoint(k, e), ds.train.x), ds.train.y).item()
                      for e in range(EPOCHS + 1)]
            val_acc = (fm(trained.checkpoint(k, EPOCHS), ds.val.x).argmax(1) == ds.val.y).float().mean().item()
        assert losses[-1] < losses[0]
        assert val_acc == pytest.approx(entry["val_acc"])
        assert 0 <= entry["test_acc"] <= 1


def test_manifest_round_trip(ds, trained):
    fm = _fm(ds)
    store = ExpertStore.open(trained.root, expect_dataset=ds.spec.name, expect_model=MODEL,
                             expect_fingerprint=ds.preprocess.fingerprint(), expect_layout=fm, cache=False)
    m = json.loads((trained.root / "manifest.json").read_text())
    assert store.manifest == m
    assert (m["dataset"], m["model"], m["epochs"], m["lr"], m["batch"], m["seed"]) == (
        ds.spec.name, MODEL, EPOCHS, SETTINGS["lr"], SETTINGS["batch"], SETTINGS["seed"])
    assert m["dsa_strategy"] == ds.spec.dsa_strategy and m["im_size"] == list(ds.spec.im_size)
    assert m["preprocess"] == {"kind": ds.preprocess.kind, "fingerprint": ds.preprocess.fingerprint()}
    assert m["layout"]["names"] == fm.names and m["layout"]["num_params"] == fm.num_params
    assert [e["index"] for e in m["experts"]] == [0, 1]
    cached = ExpertStore.open(trained.root, cache=True)
    for k in range(2):
        full = cached.trajectory(k)
        for e in range(EPOCHS + 1):
            assert torch.equal(store.checkpoint(k, e), full[e])
        start, end = store.pair(k, 0, EPOCHS)
        assert torch.equal(start, full[0]) and torch.equal(end, full[EPOCHS])


@pytest.mark.parametrize("kwarg, value, words", [
    ("expect_dataset", "mnist", "dataset 'digits'"),
    ("expect_model", "ConvNetD2W32", "'ConvNetD2W16' models"),
    ("expect_fingerprint", "0123456789abcdef", "fingerprint"),
    ("expect_layout", "ConvNetD2W32", "do not fit the model"),
])
def test_mismatch_refused(ds, trained, kwarg, value, words):
    if kwarg == "expect_layout":
        value = _fm(ds, value)
    with pytest.raises(UserError, match=words) as err:
        ExpertStore.open(trained.root, **{kwarg: value})
    assert "distillery experts" in str(err.value) and "\n" not in str(err.value)


def test_missing_store_refused(tmp_path):
    with pytest.raises(UserError, match="no expert store"):
        ExpertStore.open(tmp_path / "nowhere")


def test_corrupt_shard_refused(store_copy):
    shard = store_copy / "expert_0001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="expert_0001.safetensors is corrupt.*retrain"):
        ExpertStore.open(store_copy)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a bit flip inside the tensor data: the header is fine, the hash is not
    shard.write_bytes(bytes(flipped))
    store = ExpertStore.open(store_copy)
    with pytest.raises(UserError, match="expert_0001.safetensors is corrupt.*sha256"):
        store.checkpoint(1, 0)


def test_manifest_without_a_recipe_key_refused(store_copy):
    """Every manifest holds every recipe key (`store_recipe` and resume read them directly)."""
    manifest = json.loads((store_copy / "manifest.json").read_text())
    del manifest["momentum"]
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json is damaged: it lacks momentum; retrain"):
        ExpertStore.open(store_copy)


def test_resume_trains_only_missing_expert(ds, store_copy, monkeypatch):
    before = ExpertStore.open(store_copy)
    old_first = (store_copy / "expert_0000.safetensors").read_bytes()
    old_last = before.trajectory(1)
    (store_copy / "expert_0001.safetensors").unlink()
    trained_now = []
    real_train_expert = experts._train_expert

    def spy(fm, init, train, augment, k, *rest):
        trained_now.append(k)
        return real_train_expert(fm, init, train, augment, k, *rest)

    monkeypatch.setattr(experts, "_train_expert", spy)
    after = train_experts(ds, MODEL, out_dir=store_copy, **SETTINGS)
    assert trained_now == [1]
    assert (store_copy / "expert_0000.safetensors").read_bytes() == old_first
    torch.testing.assert_close(after.trajectory(1), old_last, rtol=1e-4, atol=1e-5)
    assert after.num_experts == 2


def test_interrupted_run_resumes_from_last_epoch(ds, trained, tmp_path, monkeypatch):
    real_save = experts._save_epoch

    def save_then_die(out, k, epoch, flat, gen, *momentum):
        real_save(out, k, epoch, flat, gen, *momentum)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(experts, "_save_epoch", save_then_die)
    settings = {**SETTINGS, "num_experts": 1}
    with pytest.raises(KeyboardInterrupt):
        train_experts(ds, MODEL, out_dir=tmp_path, **settings)
    assert not (tmp_path / "expert_0000.safetensors").exists()
    epochs_saved = []

    def spy(out, k, epoch, *rest):
        epochs_saved.append(epoch)
        real_save(out, k, epoch, *rest)

    monkeypatch.setattr(experts, "_save_epoch", spy)
    resumed = train_experts(ds, MODEL, out_dir=tmp_path, **settings)
    assert epochs_saved == list(range(2, EPOCHS + 1))  # only the epochs after the last saved one are trained
    assert torch.equal(resumed.trajectory(0), trained.trajectory(0))
    assert not (tmp_path / ".partial").exists()


def test_resume_with_other_settings_refused(ds, store_copy):
    with pytest.raises(UserError, match="lr=0.1"):
        train_experts(ds, MODEL, out_dir=store_copy, **{**SETTINGS, "lr": 0.05})


def test_batchnorm_model_refused(ds, tmp_path):
    with pytest.raises(UserError, match="BatchNorm"):
        train_experts(ds, "ConvNetD2W16BN", out_dir=tmp_path, **SETTINGS)


def test_decay_schedule_matches_buffer_py():
    assert [epoch_lr(1.0, e, 50, decay=False) for e in (0, 49)] == [1.0, 1.0]
    assert epoch_lr(1.0, 26, 50, decay=True) == 1.0  # 0-based epoch 26 = 50 // 2 + 1 still at the full lr
    assert epoch_lr(1.0, 27, 50, decay=True) == pytest.approx(0.1)

