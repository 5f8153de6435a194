"""Distilled-set container: bit-exact save/load, prefixes, grids, clear errors."""

import pytest
import torch

from distillery.data.preprocess import make_preprocess
from distillery.errors import UserError
from distillery.synset import SyntheticSet, preprocess_record


def _set(label_kind="hard", zca=None):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=g)
    pre = make_preprocess([0.5, 0.4, 0.3], [0.2, 0.2, 0.2], zca).fit(torch.rand(64, 3, 8, 8, generator=g))
    images = pre.transform(images)
    labels = torch.arange(3).repeat_interleave(2) if label_kind == "hard" else torch.rand(6, 3, generator=g)
    return SyntheticSet(images, labels, label_kind, lr=0.0123456789, preprocess=preprocess_record(pre),
                        meta={"method": "mtt", "dataset": "toy", "num_classes": 3, "config": {"a": [1, 2]}})


@pytest.mark.parametrize("label_kind,zca", [("hard", None), ("soft", "kornia"), ("learned", "kip")])
def test_save_load_bit_exact(tmp_path, label_kind, zca):
    s = _set(label_kind, zca)
    s.save(tmp_path / "s.safetensors")
    t = SyntheticSet.load(tmp_path / "s.safetensors")
    assert torch.equal(s.images, t.images) and torch.equal(s.labels, t.labels)
    assert t.labels.dtype == s.labels.dtype and t.label_kind == label_kind and t.lr == s.lr
    for k, v in s.preprocess["tensors"].items():
        assert torch.equal(v, t.preprocess["tensors"][k])
    assert t.preprocess["meta"] == s.preprocess["meta"]
    assert t.meta["config"] == {"a": [1, 2]} and "library_version" in t.meta


def test_display_undoes_preprocessing(tmp_path):
    s = _set("hard", "kornia")
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(6, 3, 8, 8, generator=g)
    assert torch.allclose(s.display_images(), raw.clamp(0, 1), atol=1e-4)
    s.save_grid(tmp_path / "g.png")
    from PIL import Image

    img = Image.open(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size[0] > 8


def test_prefix_and_bad_ipc():
    s = _set()
    p = s.prefix(1)
    assert p.ipc == 1 and torch.equal(p.labels, torch.arange(3)) and torch.equal(p.images[1], s.images[2])
    with pytest.raises(UserError, match="images per class"):
        s.prefix(3)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SyntheticSet.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="not a distillery set"):
        SyntheticSet.load(bad)
