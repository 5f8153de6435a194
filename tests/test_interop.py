"""Export to and import from the published codes' formats: pt, imagefolder, eccv2024, RaT-BPTT .h5, MTT buffers."""

import json

import numpy as np
import pytest
import torch

from distillery.cli import main
from distillery.data import load_dataset
from distillery.data.preprocess import Standardize
from distillery.errors import UserError
from distillery.experts import ExpertStore
from distillery.sets.export import ECCV2024, export_set
from distillery.sets.imports import import_experts, import_set
from distillery.models import FunctionalModel, create_model, init_seeded
from distillery.sets.synset import SyntheticSet, preprocess_record


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def synset(digits):
    """A 2-per-class digits set with soft-ish learned values, a learned lr and the dataset's preprocessing."""
    gen = torch.Generator().manual_seed(0)
    x, y = digits.random_set(2, gen)
    x = x + 0.1 * torch.randn(x.shape, generator=gen)  # not exactly real images
    return SyntheticSet(x, y, "hard", 0.0123, preprocess_record(digits.preprocess),
                        {"dataset": "digits", "num_classes": 10, "class_names": list(digits.spec.class_names)})


def test_pt_export_import_round_trip(tmp_path, synset):
    export_set(synset, "pt", tmp_path / "pt")
    images = torch.load(tmp_path / "pt" / "images_best.pt", weights_only=True)
    assert torch.equal(images, synset.images)  # the published codes' tensors, in the set's model space
    assert torch.equal(torch.load(tmp_path / "pt" / "labels_best.pt", weights_only=True), synset.labels)
    assert torch.load(tmp_path / "pt" / "lr_best.pt", weights_only=True).item() == pytest.approx(0.0123)
    back = import_set(tmp_path / "pt" / "images_best.pt", "digits")
    torch.testing.assert_close(back.images, synset.images)
    assert torch.equal(back.labels, synset.labels) and back.label_kind == "hard"
    assert back.lr == pytest.approx(synset.lr)
    assert back.preprocess["meta"]["fingerprint"] == synset.preprocess["meta"]["fingerprint"]
    assert back.meta["source"]["space"] == "standard"


def test_import_reorders_hard_labels_into_class_blocks_and_reads_soft_labels(tmp_path, synset):
    perm = torch.randperm(len(synset.images), generator=torch.Generator().manual_seed(1))
    torch.save(synset.images[perm], tmp_path / "images_5000.pt")
    torch.save(synset.labels[perm], tmp_path / "labels_5000.pt")
    back = import_set(tmp_path / "images_5000.pt", "digits", lr=0.5)
    assert back.label_kind == "hard" and back.lr == 0.5
    assert torch.equal(back.labels, torch.arange(10).repeat_interleave(2))
    for c in range(10):  # each class block holds that class's images (in their original relative order)
        want = synset.images[perm][synset.labels[perm] == c]
        torch.testing.assert_close(back.images[2 * c:2 * c + 2], want)
    soft = torch.nn.functional.one_hot(synset.labels, 10).float() * 0.8 + 0.02
    torch.save(synset.images, tmp_path / "images_soft.pt")
    torch.save(soft, tmp_path / "labels_soft.pt")
    back = import_set(tmp_path / "images_soft.pt", "digits")
    assert back.label_kind == "soft" and torch.equal(back.labels, soft) and back.lr is None


def test_import_refuses_wrong_shape_before_loading(tmp_path):
    torch.save(torch.zeros(10, 3, 32, 32), tmp_path / "images_best.pt")
    with pytest.raises(UserError, match=r"shape \(10, 3, 32, 32\).*digits"):
        import_set(tmp_path / "images_best.pt", "digits")
    torch.save(torch.zeros(10, 1, 8, 8), tmp_path / "images_x.pt")
    torch.save(torch.tensor([0] * 9 + [1]), tmp_path / "labels_x.pt")
    with pytest.raises(UserError, match="same number of images"):
        import_set(tmp_path / "images_x.pt", "digits")


def test_ratbptt_h5_import(tmp_path, synset):
    h5py = pytest.importorskip("h5py", reason="h5py (the `h5` extra) is not installed")
    learned = torch.nn.functional.one_hot(synset.labels, 10).float() * 0.9 + 0.05 * torch.rand(20, 10)
    with h5py.File(tmp_path / "rat.h5", "w") as f:
        f["data"] = synset.images.reshape(20, -1).numpy()  # RaT-BPTT keeps images as (n, c*h*w) rows
        f["label"] = learned.numpy()
    back = import_set(tmp_path / "rat.h5", "digits")
    assert back.label_kind == "learned" and back.lr is None
    torch.testing.assert_close(back.images, synset.images)
    torch.testing.assert_close(back.labels, learned)


def _rat_pth(path, data, labels=None, epoch=7):
    """The checkpoint RaT-BPTT's base.py saves beside its .h5 (data, Adam state, and labels for a --train_y run)."""
    emb = torch.nn.Embedding(*data.shape)
    emb.weight.data = data.clone()
    params = [emb.weight]
    if labels is not None:
        lab = torch.nn.Embedding(*labels.shape)
        lab.weight.data = labels.clone()
        params.append(lab.weight)
    opt = torch.optim.Adam(params, lr=0.001)
    sum(q.sum() for q in params).backward()
    opt.step()
    ck = {"epoch": epoch, "model_state_dict": {"module.data.weight": data.clone()},
          "optimizer_state_dict": opt.state_dict()}
    if labels is not None:
        ck["label_state_dict"] = {"module.label.weight": labels.clone()}
    torch.save(ck, path)


def test_ratbptt_final_h5_takes_the_learned_labels_from_the_pth(tmp_path, synset, capsys):
    """RaT-BPTT's last .h5 write keeps only data and grad; a --train_y run's labels are in the .pth beside it."""
    h5py = pytest.importorskip("h5py", reason="h5py (the `h5` extra) is not installed")
    rows = synset.images.reshape(20, -1)
    learned = torch.nn.functional.one_hot(synset.labels, 10).float() * 0.7 + 0.03 * torch.rand(20, 10)
    with h5py.File(tmp_path / "IPC_2.h5", "w") as f:
        f.create_dataset("grad", data=np.zeros(5, np.float32))
        f.create_dataset("data", data=rows.numpy())
    assert main(["import-set", str(tmp_path / "IPC_2.h5"), "--dataset", "digits",
                 "--out", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "labels: class-blocked hard labels: no label in the .h5 and no IPC_2.pth beside it" in out
    assert "lr: none: RaT-BPTT saves none; `distillery evaluate` trains it with --lr, default 0.01" in out
    _rat_pth(tmp_path / "IPC_2.pth", rows, learned)
    back = import_set(tmp_path / "IPC_2.h5", "digits")
    assert back.label_kind == "learned" and torch.equal(back.labels, learned)
    assert back.meta["source"]["labels"] == "learned labels from IPC_2.pth"
    _rat_pth(tmp_path / "IPC_2.pth", rows + 1, learned)  # saved at an earlier evaluation than the final data
    assert "images differ from the .h5's" in import_set(tmp_path / "IPC_2.h5", "digits").meta["source"]["labels"]
    _rat_pth(tmp_path / "IPC_2.pth", rows)  # a run without --train_y
    back = import_set(tmp_path / "IPC_2.h5", "digits")
    assert back.label_kind == "hard" and "none in IPC_2.pth (a run without --train_y)" in back.meta["source"]["labels"]
    _rat_pth(tmp_path / "IPC_2.pth", rows, learned[:, :4])
    with pytest.raises(UserError, match=r"labels of shape \(20, 4\) do not fit 20 images of 10 classes"):
        import_set(tmp_path / "IPC_2.h5", "digits")
    nan = learned.clone()
    nan[3, 3] = float("nan")
    _rat_pth(tmp_path / "IPC_2.pth", rows, nan)
    with pytest.raises(UserError, match="IPC_2.pth: 1 of the 200 values of the soft labels are NaN"):
        import_set(tmp_path / "IPC_2.h5", "digits")
    (tmp_path / "IPC_2.pth").write_bytes(b"damaged")
    with pytest.raises(UserError, match="cannot read .*IPC_2.pth.*move it away"):
        import_set(tmp_path / "IPC_2.h5", "digits")


def test_import_says_where_labels_and_lr_came_from(tmp_path, synset):
    torch.save(synset.images, tmp_path / "images_best.pt")  # MTT and TESLA: no lr file; here no labels file either
    back = import_set(tmp_path / "images_best.pt", "digits")
    assert back.lr is None and back.label_kind == "hard"
    assert back.meta["source"]["labels"] == "class-blocked hard labels: no labels file beside images_best.pt"
    assert back.meta["source"]["lr"].startswith("none: no lr file beside images_best.pt (MTT and TESLA save none)")
    assert "default 0.01" in back.meta["source"]["lr"]
    torch.save(torch.tensor(0.03), tmp_path / "lr_best.pt")
    assert import_set(tmp_path / "images_best.pt", "digits").meta["source"]["lr"] == "lr from lr_best.pt"


def test_datm_logit_labels_become_the_softmax_targets(tmp_path, synset):
    """DATM saves learned soft labels as logits and trains on their softmax; non-negative labels are kept as they are."""
    logits = 3 * torch.nn.functional.one_hot(synset.labels, 10).float() + torch.randn(20, 10)
    torch.save(synset.images, tmp_path / "images_best.pt")
    torch.save(logits, tmp_path / "labels_best.pt")
    torch.save(torch.tensor(0.01), tmp_path / "lr_best.pt")  # DATM saves its learned lr
    back = import_set(tmp_path / "images_best.pt", "digits")
    torch.testing.assert_close(back.labels, torch.softmax(logits, 1))
    assert back.label_kind == "soft" and back.lr == pytest.approx(0.01) and "softmax applied" in \
        back.meta["source"]["labels"]


def test_whole_number_float_pixels_are_preprocessed(tmp_path, digits):
    x = torch.randint(0, 256, (10, 1, 8, 8)).float()  # pixels saved as float 0..255, not model-space values
    torch.save(x, tmp_path / "images_px.pt")
    back = import_set(tmp_path / "images_px.pt", "digits")
    torch.testing.assert_close(back.images, digits.preprocess.transform(x / 255))
    assert back.meta["source"]["images"].startswith("raw pixels 0..255")


def test_imagefolder_export_reads_back(tmp_path, synset):
    from PIL import Image

    export_set(synset, "imagefolder", tmp_path / "f")
    side = json.loads((tmp_path / "f" / "labels.json").read_text())
    assert side["lr"] == pytest.approx(0.0123) and side["preprocessing"]["kind"] == "standard"
    display = synset.display_images()
    assert len(side["images"]) == 20
    for i, rec in enumerate(side["images"]):
        assert rec["file"].startswith(f"{rec['class']:03d}_") and rec["label"] == synset.labels[i].item()
        png = np.asarray(Image.open(tmp_path / "f" / rec["file"]), dtype=np.float32) / 255
        assert png.shape == (8, 8)  # native resolution
        assert np.abs(png - display[i, 0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_eccv2024_export_layout(tmp_path):
    name, mean, std = ECCV2024["cifar100"]
    x01 = torch.rand(100, 3, 32, 32)
    pre = Standardize([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])
    s = SyntheticSet(pre.transform(x01), torch.arange(100), preprocess=preprocess_record(pre),
                     meta={"dataset": "cifar100", "num_classes": 100})
    export_set(s, "eccv2024", tmp_path / "res")
    images = torch.load(tmp_path / "res" / name, weights_only=True)
    want = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="cifar100 and tiny-imagenet"):
        export_set(SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), meta={"dataset": "digits"}),
                   "eccv2024", tmp_path / "no")


def _mtt_buffer(model: str, experts: int, epochs: int, seed: int) -> list:
    """A replay buffer as MTT's buffer.py saves it: experts x (epochs + 1) x parameter lists."""
    out = []
    for k in range(experts):
        net = init_seeded(model, 1, 10, (8, 8), seed + k)
        traj = []
        for e in range(epochs + 1):
            traj.append([p.detach().clone() + 0.01 * e for p in net.parameters()])
        out.append(traj)
    return out


def test_mtt_buffer_import_gives_same_pairs(tmp_path):
    buffers = [_mtt_buffer("ConvNetD1W8", 2, 4, 0), _mtt_buffer("ConvNetD1W8", 1, 4, 10)]
    for n, b in enumerate(buffers):
        torch.save(b, tmp_path / f"replay_buffer_{n}.pt")
    store = import_experts(tmp_path, "digits", "ConvNetD1W8", tmp_path / "store")
    assert store.num_experts == 3 and store.epochs == 4
    flat = [traj for b in buffers for traj in b]
    for k in range(3):
        for t, m in ((0, 2), (1, 3), (2, 2)):
            start, target = store.pair(k, t, t + m)
            assert torch.equal(start, torch.cat([p.reshape(-1) for p in flat[k][t]]))
            assert torch.equal(target, torch.cat([p.reshape(-1) for p in flat[k][t + m]]))
    fm = FunctionalModel(create_model("ConvNetD1W8", 1, 10, (8, 8)))
    ExpertStore.open(tmp_path / "store", expect_dataset="digits", expect_model="ConvNetD1W8", expect_layout=fm)
    assert all(0 <= e["test_acc"] <= 1 for e in store.experts)


def test_mtt_buffer_with_other_layout_is_refused(tmp_path):
    torch.save(_mtt_buffer("ConvNetD1W4", 1, 2, 0), tmp_path / "replay_buffer_0.pt")
    with pytest.raises(UserError, match=r"parameter 0 has shape \(4, 1, 3, 3\).*features.0.weight is \(8, 1, 3, 3\)"):
        import_experts(tmp_path, "digits", "ConvNetD1W8", tmp_path / "store")
    assert not (tmp_path / "store").exists()
    torch.save([[[torch.zeros(3)], [torch.ones(3)]]], tmp_path / "replay_buffer_0.pt")
    with pytest.raises(UserError, match="another model"):
        import_experts(tmp_path, "digits", "ConvNetD1W8", tmp_path / "store")


def test_cli_export_and_import(tmp_path, synset, capsys):
    synset.save(tmp_path / "s.safetensors")
    assert main(["export", str(tmp_path / "s.safetensors"), "--format", "pt", "--out", str(tmp_path / "pt")]) == 0
    assert main(["import-set", str(tmp_path / "pt" / "images_best.pt"), "--dataset", "digits",
                 "--out", str(tmp_path / "back.safetensors")]) == 0
    assert "standard space" in capsys.readouterr().out
    back = SyntheticSet.load(tmp_path / "back.safetensors")
    torch.testing.assert_close(back.images, synset.images)
    assert main(["import-experts", str(tmp_path), "--dataset", "digits", "--model", "ConvNet",
                 "--out", str(tmp_path / "e")]) == 2
    assert "no replay_buffer" in capsys.readouterr().err
