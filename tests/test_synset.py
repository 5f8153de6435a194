"""Distilled-set container: bit-exact save/load, prefixes, grids, clear errors."""

import pytest
import torch

from distillery.data.preprocess import make_preprocess
from distillery.errors import UserError
from distillery.sets.synset import SyntheticSet, preprocess_record


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
    assert torch.equal(s.display_images(), t.display_images())  # ZCA: from the stored pixels, no matrices
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


def test_zca_set_file_is_small_and_self_describing(tmp_path):
    """A set does not carry its ZCA matrices (2 x D^2 floats): the file is about twice the images' size, yet it
    displays identically from the stored pixels and records the fingerprint evaluation checks; images bit-exact."""
    g = torch.Generator().manual_seed(0)
    pre = make_preprocess([0.5] * 3, [0.2] * 3, "kornia").fit(torch.rand(800, 3, 16, 16, generator=g))
    raw = torch.rand(10, 3, 16, 16, generator=g)
    s = SyntheticSet(pre.transform(raw), torch.arange(10), preprocess=preprocess_record(pre), meta={"num_classes": 10})
    s.save(tmp_path / "s.safetensors")
    size = (tmp_path / "s.safetensors").stat().st_size
    assert size < 3 * raw.numel() * 4 + 10_000 < sum(t.numel() * 4 for t in pre.tensors().values())
    t = SyntheticSet.load(tmp_path / "s.safetensors")
    assert torch.equal(t.images, s.images) and torch.equal(t.display_images(), s.display_images())
    assert t.preprocess["meta"]["fingerprint"] == pre.fingerprint() and not t.preprocess["tensors"]
    assert torch.allclose(t.display_images(), raw, atol=1e-4)
    t.prefix(1).save(tmp_path / "p.safetensors")  # a loaded set saves again, pixels and all
    assert torch.equal(SyntheticSet.load(tmp_path / "p.safetensors").display_images(), t.display_images())
