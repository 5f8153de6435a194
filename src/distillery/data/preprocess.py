"""Image preprocessing: per-channel standardization and the two ZCA whitening variants of SPEC §2.2.

Every `Preprocess` maps `[0,1]` images `(N, C, H, W)` into *model space* (`transform`) and back for display
(`inverse`). ZCA variants are fitted on the train split only and then applied unchanged to every other split
(SPEC P6). Fitted state is serialized as tensors plus JSON-able metadata kept apart, so it fits a safetensors
file with a JSON header:

    tensors, meta = pre.tensors(), pre.meta()          # dict[str, Tensor] (CPU, contiguous), dict of JSON values
    pre2 = Preprocess.from_state_dict({**meta, **tensors})

`fingerprint()` hashes the metadata: kind, parameters and, for ZCA, a sha256 of the exact train images it was fitted
on. Expert trajectories and distilled sets compare it to refuse data preprocessed differently. It deliberately does
not hash the float32 matrices: their low bits change with the BLAS, thread count and device of the fit (1 vs 2 CPU
threads already differ), which would make a refit of the same data on another machine look like a mismatch.
Features are flattened in torch's CHW order everywhere.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError

# Elements per chunk when streaming images through a D x D matrix (128 MiB of float32).
_CHUNK_ELEMS = 1 << 25


def make_preprocess(mean: Sequence[float], std: Sequence[float], zca: str | None) -> Preprocess:
    """Build the (unfitted) preprocessing that `load_dataset` asks for: standardize, or one ZCA variant."""
    if zca is None:
        return Standardize(mean, std)
    if zca == "kornia":
        return KorniaZCA()
    if zca == "kip":
        return KipZCA()
    raise UserError(f"unknown zca '{zca}'; use 'kornia' (MTT/TESLA), 'kip' (RaT-BPTT) or leave it unset")


def images_digest(x: Tensor) -> str:
    """sha256 of x's shape and float32 bytes, read in chunks: identifies the fit images on any device."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    flat = x.reshape(x.shape[0], -1)
    step = max(1, _CHUNK_ELEMS // flat.shape[1])
    for i in range(0, flat.shape[0], step):
        h.update(flat[i : i + step].float().cpu().contiguous().numpy())
    return h.hexdigest()


def _eigh_psd(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a covariance matrix, round-off negatives clamped to 0."""
    S, U = torch.linalg.eigh(cov)
    return S.clamp_min(0), U


class Preprocess(ABC):
    """A fitted, serializable map between [0,1] images and model space."""

    kind: str

    def fit(self, x01_train: Tensor) -> Preprocess:
        """Fit on the train images (N,C,H,W) in [0,1]; a no-op unless the preprocessing has statistics."""
        return self

    @abstractmethod
    def transform(self, x01: Tensor) -> Tensor:
        """Map [0,1] images (N,C,H,W) to float32 model space on the images' device."""

    @abstractmethod
    def inverse(self, x: Tensor) -> Tensor:
        """Map model-space images back to (roughly) [0,1] for display; not clamped."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON-able description: 'kind' plus parameters (no tensors)."""

    def tensors(self) -> dict[str, Tensor]:
        """Fitted tensors as contiguous CPU tensors (empty when nothing is fitted)."""
        return {}

    def to(self, device: str | torch.device) -> Preprocess:
        """Move fitted tensors to `device` in place (like `nn.Module.to`) and return self."""
        return self

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> Preprocess:
        """Rebuild a preprocessing from `{**meta(), **tensors()}` (read back from disk)."""
        tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        meta = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
        kinds: dict[str, type[Preprocess]] = {"standard": Standardize, "zca-kornia": KorniaZCA, "zca-kip": KipZCA}
        if meta.get("kind") not in kinds:
            raise ValueError(f"unknown preprocessing kind {meta.get('kind')!r}; expected one of {sorted(kinds)}")
        return kinds[meta["kind"]]._from_parts(tensors, meta)

    @classmethod
    @abstractmethod
    def _from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Preprocess:
        """Subclass constructor from the two halves of a state dict."""

    def fingerprint(self) -> str:
        """Short sha256 (16 hex chars) of meta(): kind, parameters and, for ZCA, the digest of the fit images."""
        return hashlib.sha256(json.dumps(self.meta(), sort_keys=True).encode()).hexdigest()[:16]


class Standardize(Preprocess):
    """Per-channel (x - mean) / std, the default when ZCA is off; exact inverse."""

    kind = "standard"

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std shaped (1,C,1,1) on x's device, after checking the channel count."""
        if x.dim() != 4 or x.shape[1] != len(self.mean):
            raise ValueError(f"expected images (N,{len(self.mean)},H,W), got shape {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def transform(self, x01: Tensor) -> Tensor:
        """(x - mean) / std per channel."""
        mean, std = self._stats(x01)
        return (x01.float() - mean) / std

    def inverse(self, x: Tensor) -> Tensor:
        """x * std + mean per channel (exact inverse)."""
        mean, std = self._stats(x)
        return x.float() * std + mean

    def meta(self) -> dict[str, Any]:
        """Kind and the per-channel constants (SPEC P7: record them with every artifact)."""
        return {"kind": self.kind, "mean": self.mean, "std": self.std}

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Standardize:
        """Rebuild from the recorded constants."""
        return cls(meta["mean"], meta["std"])


class _ZCA(Preprocess):
    """Shared machinery of the ZCA variants: fitted D x D matrices W, W_inv applied in chunks to flat CHW images."""

    param: str  # the name of the variant's one JSON parameter, its eigenvalue regularizer (eps or reg)

    def __init__(self) -> None:
        self.shape: list[int] | None = None  # [C, H, W] of the images fitted on
        self.fit_data: str | None = None  # sha256 of the fit images (see images_digest)
        self.W: Tensor | None = None
        self.W_inv: Tensor | None = None

    @property
    def _params(self) -> dict[str, Any]:
        """The variant's JSON parameter by name."""
        return {self.param: getattr(self, self.param)}

    def _fitted_tensors(self) -> dict[str, Tensor | None]:
        """The variant's fitted tensors by name, on their current device (None before fit)."""
        return {"W": self.W, "W_inv": self.W_inv}

    def _require_fitted(self) -> None:
        """Raise if fit() (or from_state_dict) has not set the matrices."""
        if self.W is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(train_images) first")

    def _flat(self, x: Tensor) -> Tensor:
        """Check x against the fitted shape and view it as (N, D)."""
        self._require_fitted()
        if x.dim() != 4 or list(x.shape[1:]) != self.shape:
            raise ValueError(f"expected images (N,{','.join(map(str, self.shape))}), got shape {tuple(x.shape)}")
        return x.flatten(1)  # also for an empty split (--val-fraction 0), where reshape(0, -1) is ambiguous

    @staticmethod
    def _chunked(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Apply a row-wise fn to x (N, D) in float32 chunks, bounding the temporary memory."""
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        step = max(1, _CHUNK_ELEMS // x.shape[1])
        for i in range(0, x.shape[0], step):
            out[i : i + step] = fn(x[i : i + step].float())
        return out

    def _check_fit_input(self, x01: Tensor) -> Tensor:
        """Validate train images (N,C,H,W) in [0,1] and return them flattened to (N, D)."""
        if x01.dim() != 4 or x01.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 images (N,C,H,W), got shape {tuple(x01.shape)}")
        lo, hi = x01.aminmax()
        if lo < 0 or hi > 1:
            raise ValueError(f"ZCA is fitted on [0,1] images (not standardized), got range [{lo:.3g}, {hi:.3g}]")
        self.shape = list(x01.shape[1:])
        self.fit_data = images_digest(x01)
        return x01.reshape(x01.shape[0], -1)

    def _set_matrices(self, U: Tensor, d: Tensor) -> None:
        """Store W = U diag(d^-1/2) U^T and W_inv = U diag(d^1/2) U^T (computed in float64) as float32."""
        self.W = ((U * d.rsqrt()) @ U.T).float()
        self.W_inv = ((U * d.sqrt()) @ U.T).float()

    def tensors(self) -> dict[str, Tensor]:
        """Fitted matrices as contiguous CPU float32 tensors; raises if not fitted."""
        self._require_fitted()
        return {k: v.detach().cpu().contiguous() for k, v in self._fitted_tensors().items()}

    def meta(self) -> dict[str, Any]:
        """Kind, parameters, fitted image shape, feature order and the digest of the fit images; raises if not fitted."""
        self._require_fitted()
        return {"kind": self.kind, **self._params, "shape": self.shape, "features": "chw", "fit_data": self.fit_data}

    def to(self, device: str | torch.device) -> _ZCA:
        """Move the fitted tensors to device in place."""
        for name, t in self._fitted_tensors().items():
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> _ZCA:
        """Rebuild from the parameter, the fitted shape and digest, and the fitted tensors."""
        pre = cls(meta[cls.param])
        pre.shape, pre.fit_data = list(meta["shape"]), meta["fit_data"]
        for name in pre._fitted_tensors():
            setattr(pre, name, tensors[name])
        return pre


def _gram(x: Tensor, rows: Callable[[Tensor], Tensor]) -> Tensor:
    """Σ rows(c)^T rows(c) over float64 row chunks c of x (N, D): a covariance without a float64 copy of x."""
    step = max(1, _CHUNK_ELEMS // x.shape[1])
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], step):
        c = rows(x[i : i + step].double())
        cov.addmm_(c.T, c)
    return cov


class KorniaZCA(_ZCA):
    """SPEC §2.2(a), MTT/TESLA: x_zca = (x - mu) W, W = U (S+eps)^-1/2 U^T of the unbiased covariance of [0,1] images.

    The inverse x = x_zca W_inv + mu is exact (up to float32 round-off). Input images are NOT mean/std normalized.
    """

    kind = "zca-kornia"
    param = "eps"  # absolute eigenvalue regularizer

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = float(eps)
        self.mu: Tensor | None = None

    def _fitted_tensors(self) -> dict[str, Tensor | None]:
        """mu (D,), W, W_inv."""
        return {"mu": self.mu, "W": self.W, "W_inv": self.W_inv}

    def fit(self, x01_train: Tensor) -> KorniaZCA:
        """Per-feature mean and unbiased covariance in float64 (chunked), then eigh; matrices stored as float32."""
        x = self._check_fit_input(x01_train)
        n, dim = x.shape
        step = max(1, _CHUNK_ELEMS // dim)
        mu = torch.zeros(dim, dtype=torch.float64, device=x.device)
        for i in range(0, n, step):
            mu += x[i : i + step].double().sum(0)
        mu /= n
        S, U = _eigh_psd(_gram(x, lambda c: c - mu) / (n - 1))
        self._set_matrices(U, S + self.eps)
        self.mu = mu.float()
        return self

    def transform(self, x01: Tensor) -> Tensor:
        """(x - mu) W with the train-fitted mu and W."""
        x = self._flat(x01)
        mu, W = self.mu.to(x.device), self.W.to(x.device)
        return self._chunked(x, lambda c: (c - mu) @ W).view(x01.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """x W_inv + mu: exact inverse of transform."""
        flat = self._flat(x)
        mu, W_inv = self.mu.to(x.device), self.W_inv.to(x.device)
        return self._chunked(flat, lambda c: c @ W_inv + mu).view(x.shape)


class KipZCA(_ZCA):
    """SPEC §2.2(b), RaT-BPTT (KIP/FRePo style): per-image centering and L2 normalization, then x_norm W.

    W = V (lam + reg * mean(lam))^-1/2 V^T of the biased covariance X_norm^T X_norm / N. Centering and
    normalization per image make the input scale irrelevant, so [0,1] images give the reference's result on
    raw uint8. The reference flattens HWC; we flatten CHW. A feature permutation P gives W' = P^T W P, hence
    x' W' = (x W) P, so the result reshaped to CHW is identical. Not exactly invertible: `inverse` undoes the
    whitening and then min-max scales each image to [0,1] for display (its mean and norm are lost).
    """

    kind = "zca-kip"
    param = "reg"  # regularizer as a fraction of the mean eigenvalue

    def __init__(self, reg: float = 0.1) -> None:
        super().__init__()
        self.reg = float(reg)

    @staticmethod
    def _normalize(x: Tensor) -> Tensor:
        """Subtract each row's mean and divide by its L2 norm (constant images become zero)."""
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def fit(self, x01_train: Tensor) -> KipZCA:
        """Biased covariance of the per-image normalized train set in float64 (chunked), then eigh."""
        x = self._check_fit_input(x01_train)
        S, U = _eigh_psd(_gram(x, self._normalize) / len(x))
        self._set_matrices(U, S + self.reg * S.mean())
        return self

    def transform(self, x01: Tensor) -> Tensor:
        """normalize(x) W with the train-fitted W (each image normalized by its own statistics)."""
        x = self._flat(x01)
        W = self.W.to(x.device)
        return self._chunked(x, lambda c: self._normalize(c) @ W).view(x01.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """x W_inv (the normalized image), then per-image min-max to [0,1]: for display only, not exact."""
        flat = self._flat(x)
        W_inv = self.W_inv.to(x.device)

        def undo(c: Tensor) -> Tensor:
            y = c @ W_inv
            lo, hi = y.min(1, keepdim=True).values, y.max(1, keepdim=True).values
            return (y - lo) / (hi - lo).clamp_min(1e-12)

        return self._chunked(flat, undo).view(x.shape)


def zca_flag(kind: str | None) -> str | None:
    """The `--zca` value (kornia, kip, or None for mean/std) whose preprocessing has this `kind`."""
    return {KorniaZCA.kind: "kornia", KipZCA.kind: "kip"}.get(kind)


def check_fitted(pre: Preprocess, like: Preprocess, shape: Sequence[int], fit_data: str) -> None:
    """Raise ValueError unless `pre` (read back from a cache) is `like`'s kind and parameters, fitted on images of
    `shape` whose digest is `fit_data`, with finite float32 (D,) or (D, D) tensors, D = prod(shape)."""
    if type(pre) is not type(like) or not isinstance(pre, _ZCA) or pre._params != like._params:
        raise ValueError(f"it holds another preprocessing ({pre.kind})")
    if list(pre.shape) != list(shape) or pre.fit_data != fit_data:
        raise ValueError("it was fitted on other images")
    dim = 1
    for n in shape:
        dim *= int(n)
    for name, t in pre._fitted_tensors().items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or tuple(t.shape) not in ((dim,), (dim, dim)) \
                or (name != "mu" and t.dim() != 2):
            raise ValueError(f"{name} is not a float32 matrix of size {dim}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN/inf")
