"""Preprocessing: standardize and both ZCA variants (SPEC §2.2, §10.2 item 7, P6): math, train-only fit, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distillery.data.preprocess import KipZCA, KorniaZCA, Preprocess, Standardize, make_preprocess
from distillery.errors import UserError

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
SHAPE = (3, 4, 4)  # D = 48: tiny, but with a non-trivial covariance
ZCA_KINDS = ["kornia", "kip"]


def images(n: int, seed: int) -> torch.Tensor:
    """Correlated [0,1] images (n, 3, 4, 4): sigmoid of Gaussians mixed by a fixed random matrix."""
    d = int(np.prod(SHAPE))
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix
    return torch.sigmoid(2 * z).view(n, *SHAPE)


def uint8_hwc(n: int, seed: int) -> np.ndarray:
    """Raw uint8 (n, H, W, C) images as the RaT reference reads them."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, SHAPE[1], SHAPE[2], SHAPE[0]), dtype=np.uint8)


def to_float01(raw: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float [0,1] CHW, as the data loader does."""
    return torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255


def test_standardize_round_trip():
    x = images(10, 1)
    pre = make_preprocess(MEAN, STD, None)
    assert isinstance(pre, Standardize) and pre.kind == "standard"
    assert pre.fit(x) is pre
    y = pre.transform(x)
    expected = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(pre.inverse(y), x, rtol=0, atol=1e-6)


def test_kornia_round_trip():
    train, test = images(300, 1), images(50, 2)
    pre = make_preprocess(MEAN, STD, "kornia").fit(train)
    assert pre.kind == "zca-kornia"
    for x in (train, test):
        z = pre.transform(x)
        assert z.dtype == torch.float32 and z.shape == x.shape
        torch.testing.assert_close(pre.inverse(z), x, rtol=0, atol=1e-5)


def test_kornia_matches_formula_and_whitens_to_s_over_s_plus_eps():
    train = images(300, 1)
    z = make_preprocess(MEAN, STD, "kornia").fit(train).transform(train).double().flatten(1)
    x = train.double().flatten(1).numpy()
    xc = x - x.mean(0)
    S, U = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    W = U @ np.diag((S + 0.1) ** -0.5) @ U.T
    np.testing.assert_allclose(z.numpy(), xc @ W, atol=1e-5)
    # whitened covariance in the train eigenbasis is diag(S / (S + eps)) (SPEC §10.2 item 7)
    zc = z.numpy() - z.numpy().mean(0)
    cov_eig = U.T @ (zc.T @ zc / (len(x) - 1)) @ U
    np.testing.assert_allclose(cov_eig, np.diag(S / (S + 0.1)), atol=1e-5)


def test_kip_matches_reference_formula_on_uint8_hwc():
    """Direct float64 numpy version of SPEC §2.2b as the RaT code runs it (uint8, HWC-flattened)."""
    raw_train, raw_test = uint8_hwc(200, 1), uint8_hwc(30, 2)

    def normalize(a: np.ndarray) -> np.ndarray:
        a = a.reshape(len(a), -1).astype(np.float64)
        a = a - a.mean(1, keepdims=True)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    tr, te = normalize(raw_train), normalize(raw_test)
    lam, V = np.linalg.eigh(tr.T @ tr / len(tr))
    W = V @ np.diag((lam + 0.1 * lam.mean()) ** -0.5) @ V.T

    pre = make_preprocess(MEAN, STD, "kip").fit(to_float01(raw_train))
    assert pre.kind == "zca-kip"
    for raw, xn in ((raw_train, tr), (raw_test, te)):
        ref = (xn @ W).reshape(raw.shape).transpose(0, 3, 1, 2)  # HWC -> CHW, as the reference does
        torch.testing.assert_close(pre.transform(to_float01(raw)), torch.from_numpy(ref).float(), rtol=1e-4, atol=1e-4)


def test_kip_inverse_is_per_image_min_max_of_unwhitened():
    raw = uint8_hwc(100, 1)
    x = to_float01(raw)
    pre = make_preprocess(MEAN, STD, "kip").fit(x)
    back = pre.inverse(pre.transform(x)).flatten(1)
    flat = x.flatten(1)
    expected = (flat - flat.min(1, keepdim=True).values) / (flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values)
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("zca", ZCA_KINDS)
def test_test_split_uses_train_fit(zca):
    train, test = images(300, 1), images(200, 2)
    pre = make_preprocess(MEAN, STD, zca).fit(train)
    before = {k: v.clone() for k, v in pre.tensors().items()}
    z_test = pre.transform(test)
    assert all(torch.equal(before[k], v) for k, v in pre.tensors().items())
    refit_on_test = make_preprocess(MEAN, STD, zca).fit(test).transform(test)
    assert (z_test - refit_on_test).abs().max() > 1e-2
    torch.testing.assert_close(z_test[:7], pre.transform(test[:7]))  # per-image: independent of the batch


@pytest.mark.parametrize("zca", [None, *ZCA_KINDS])
def test_state_round_trip_through_safetensors_is_bit_exact(zca, tmp_path):
    train, test = images(300, 1), images(40, 2)
    pre = make_preprocess(MEAN, STD, zca).fit(train)
    path = tmp_path / "pre.safetensors"
    save_file(pre.tensors(), str(path), metadata={"preprocess": json.dumps(pre.meta())})
    with safe_open(str(path), framework="pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["preprocess"])
    pre2 = Preprocess.from_state_dict({**meta, **loaded})
    assert type(pre2) is type(pre) and pre2.fingerprint() == pre.fingerprint()
    z = pre.transform(test)
    assert torch.equal(pre2.transform(test), z)
    assert torch.equal(pre2.inverse(z), pre.inverse(z))
    assert Preprocess.from_state_dict({**pre.meta(), **pre.tensors()}).fingerprint() == pre.fingerprint()


def test_fingerprints_differ_between_kinds_and_fits():
    a, b = images(300, 1), images(300, 2)
    fps = {
        "standard": make_preprocess(MEAN, STD, None).fingerprint(),
        "standard-cifar100": make_preprocess([0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762], None).fingerprint(),
        "kornia-a": KorniaZCA().fit(a).fingerprint(),
        "kornia-b": KorniaZCA().fit(b).fingerprint(),
        "kornia-a-eps": KorniaZCA(eps=0.01).fit(a).fingerprint(),
        "kip-a": KipZCA().fit(a).fingerprint(),
        "kip-b": KipZCA().fit(b).fingerprint(),
    }
    assert len(set(fps.values())) == len(fps)
    assert KorniaZCA().fit(a).fingerprint() == fps["kornia-a"]  # deterministic refit
    assert all(len(f) == 16 for f in fps.values())


def test_bad_inputs():
    with pytest.raises(UserError, match="unknown zca"):
        make_preprocess(MEAN, STD, "pca")
    with pytest.raises(RuntimeError, match="not fitted"):
        KorniaZCA().transform(images(2, 1))
    with pytest.raises(RuntimeError, match="not fitted"):
        KipZCA().fingerprint()
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        KorniaZCA().fit(images(10, 1) * 2 - 1)
    with pytest.raises(ValueError, match="expected images"):
        KipZCA().fit(images(10, 1)).transform(torch.rand(2, 3, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("zca", ZCA_KINDS)
def test_to_cuda_matches_cpu(zca):
    train, test = images(300, 1), images(40, 2)
    pre = make_preprocess(MEAN, STD, zca).fit(train)
    z = pre.transform(test)
    pre.to("cuda")
    z_gpu = pre.transform(test.cuda())
    assert z_gpu.device.type == "cuda"
    torch.testing.assert_close(z_gpu.cpu(), z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pre.inverse(z_gpu).cpu(), pre.to("cpu").inverse(z), rtol=1e-4, atol=1e-4)
