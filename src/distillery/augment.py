"""Differentiable Siamese Augmentation (DSA, SPEC §3) with explicit generators, siamese draws and RaT's flip_rotate.

Randomness and application are split: `Augment.sample` draws an `AugParams` from a caller-owned `torch.Generator`
(the global RNG is never read or re-seeded, SPEC P11), and `Augment.apply` is a pure, batched, differentiable function
of the images and those parameters, so it can run under `torch.func` transforms and be replayed exactly (TESLA's two
passes, P9) or applied to several batches (siamese pairing, §3.4).

Ops (SPEC §3.2, same numbers as the reference `DiffAugment`):
  color   brightness x + (u - 1/2)·b, then saturation (x - m_pixel)·(u·s) + m_pixel, then contrast
          (x - m_image)·(u + c) + m_image; evaluated as the algebraically identical single affine map (float rounding)
  crop    integer translation by U{-p..p} px per axis, p = int(size·ratio_crop_pad + 0.5), zero fill (an index shift)
  cutout  zero a k×k square, k = int(size·ratio_cutout + 0.5), centre U{0..size - k mod 2}, clipped at the border
  flip    reverse the width axis with probability prob_flip
  scale   affine [[s_x, 0, 0], [0, s_y, 0]], s ~ U[1/r, r), bilinear grid_sample with zero padding
  rotate  affine [[cos φ, -sin φ, 0], [sin φ, cos φ, 0]], φ ~ U[-ratio_rotate, ratio_rotate) degrees

Mode 'S' applies one token per call, chosen uniformly for the whole batch, with per-image parameters; mode 'M' applies
every token in strategy order.

Composition (mode 'M', `compose=True`, the default; `compose=False` runs the reference's op-by-op sequence).
A run [crop [cutout]] (flip|scale|rotate)+ that contains scale or rotate becomes ONE grid_sample with the product of
the per-token affine matrices (the default strategy runs as color -> one warp):
  * flip is x -> -x in normalised coordinates and maps pixel centres onto pixel centres: exact.
  * crop is a translation of 2t/(W-1) normalised units per pixel for align_corners=True, 2t/W for False (with the
    other unit it is off by up to half a pixel); either lands on pixel centres. Bilinear sampling of the shifted,
    zero-filled image at p equals bilinear sampling of x at p + t once the pixels the crop drops are zeroed, so the
    crop window is applied as a mask on the run's input: exact up to float rounding (~1e-5 on unit-scale values).
  * a cutout right after the crop is the same mask with its square moved by the crop shift: exact.
  * scale followed by rotate (or the reverse) is where composing differs: the intermediate image is resampled once
    instead of twice (no second bilinear blur; identical for images linear in the coordinates), and the frame
    clipping between the two warps is reproduced by multiplying with the bilinear coverage of the intermediate
    frame. What remains is interpolation error, largest next to zero-filled edges (mean |Δ| ~1e-2 on unit-scale
    images, concentrated in a 1-2 px band along the frame). Use compose=False where bit-faithfulness matters.
Branch-free replay (for CUDA-graph capture, `methods/graphed.py`): `branch_free_fields` fills mode-'S' draws with
identity parameters for the tokens not drawn, and `apply_fields` runs color -> crop/cutout mask -> one grid_sample for
every draw, so the ops and shapes do not depend on which token was drawn (equal to `apply` up to float rounding).
For square images, align_corners changes flip/scale/rotate only by float rounding (both conventions map pixel
i to the same point about the centre); it matters for non-square images.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError

TOKENS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_IDENTITY_STRATEGIES = ("none", "None", "")
_RESAMPLING = frozenset({"scale", "rotate"})
# The tensor fields of AugParams in one fixed order: what a captured graph takes as its static DSA inputs.
PARAM_FIELDS = ("brightness", "saturation", "contrast", "translate", "cutout", "flip", "scale", "rotate")
# What a token that was not drawn leaves in each of those fields: (identity value, shape per image, dtype).
_IDENTITY = {"brightness": (0.0, (), torch.float32), "saturation": (1.0, (), torch.float32),
             "contrast": (1.0, (), torch.float32), "translate": (0, (2,), torch.int64), "cutout": (0, (4,), torch.int64),
             "flip": (False, (), torch.bool), "scale": (1.0, (2,), torch.float32), "rotate": (0.0, (), torch.float32)}


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the DSA ops, defaults of the reference `ParamDiffAug` (SPEC §3.1; aug_mode is `Augment(mode=)`)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    ratio_noise: float = 0.05  # defined by ParamDiffAug for parity; no DSA op uses it
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


@dataclass(frozen=True)
class AugParams:
    """One draw of augmentation parameters: leading dim = batch, or 1 for a shared (siamese) draw."""

    tokens: tuple[str, ...]  # ops to apply, in order (one token in mode 'S', none for the identity)
    im_size: tuple[int, int]  # (H, W) the draw is valid for
    batch: int | None  # images the draw is for; None: shared, broadcast to a batch of any size
    brightness: Tensor | None = None  # (n,) additive shift in [-b/2, b/2)
    saturation: Tensor | None = None  # (n,) factor in [0, s)
    contrast: Tensor | None = None  # (n,) factor in [c, c + 1)
    translate: Tensor | None = None  # (n, 2) int64 (rows, cols): out[i, j] = in[i + rows, j + cols], 0 outside
    cutout: Tensor | None = None  # (n, 4) int64 box [top, left, bottom, right) set to 0; may overhang the border
    flip: Tensor | None = None  # (n,) bool: reverse the width axis
    scale: Tensor | None = None  # (n, 2) (s_x, s_y) in [1/r, r)
    rotate: Tensor | None = None  # (n,) angle in radians

    @property
    def shared(self) -> bool:
        """Whether this is one draw meant for every image of any batch (siamese)."""
        return self.batch is None

    def to(self, device: torch.device | str) -> AugParams:
        """Copy of the parameters on `device` (e.g. to pair a CUDA batch with a CPU-drawn set)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {name: v.to(device) for name, v in values.items() if isinstance(v, Tensor)}
        return AugParams(self.tokens, self.im_size, self.batch, **moved)


class Augment:
    """DSA augmentation: `sample` parameters from a generator, `apply` them differentiably, or `__call__` both."""

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        mode: str = "S",
        params: DSAParams = DSAParams(),
        align_corners: bool = True,
        compose: bool = True,
    ) -> None:
        """Parse and validate the strategy (tokens joined by '_'; 'none', 'None' or '' for the identity)."""
        if mode not in ("S", "M"):
            raise UserError(f"unknown augmentation mode '{mode}'; use 'S' (one token per call) or 'M' (all tokens)")
        self.strategy = strategy
        self.mode = mode
        self.params = params
        self.align_corners = align_corners
        self.compose = compose
        self.tokens = _parse_strategy(strategy)

    @classmethod
    def none(cls) -> Augment:
        """The identity augmentation."""
        return cls("none")

    @classmethod
    def rat(cls, strategy: str = "flip_rotate", params: DSAParams = DSAParams()) -> Augment:
        """RaT-BPTT's augmentation (SPEC §3.5; default flip or rotate): one token per call, per-image,
        align_corners=False."""
        return cls(strategy, mode="S", params=params, align_corners=False)

    def __repr__(self) -> str:
        """Constructor-style description for logs and configs."""
        return (
            f"Augment(strategy={self.strategy!r}, mode={self.mode!r}, params={self.params!r}, "
            f"align_corners={self.align_corners}, compose={self.compose})"
        )

    def sample(
        self,
        batch: int,
        generator: torch.Generator,
        im_size: int | Sequence[int],
        device: torch.device | str | None = None,
        shared: bool = False,
    ) -> AugParams:
        """Draw parameters for `batch` images (or ONE set if `shared`) using only `generator`; result on `device`."""
        h, w = (im_size, im_size) if isinstance(im_size, int) else (int(im_size[-2]), int(im_size[-1]))
        n = 1 if shared else batch
        gen_device = generator.device
        p = self.params

        def uniform() -> Tensor:
            return torch.rand(n, generator=generator, device=gen_device)

        def integers(low: int, high: int) -> Tensor:
            return torch.randint(low, high, (n,), generator=generator, device=gen_device)

        tokens = self.tokens
        if self.mode == "S" and tokens:
            tokens = (tokens[_choose_token(len(tokens), generator)],)
        drawn: dict[str, Tensor] = {}
        for token in tokens:
            if token == "color":
                drawn["brightness"] = (uniform() - 0.5) * p.brightness
                drawn["saturation"] = uniform() * p.saturation
                drawn["contrast"] = uniform() + p.contrast
            elif token == "crop":
                pad_h, pad_w = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
                drawn["translate"] = torch.stack([integers(-pad_h, pad_h + 1), integers(-pad_w, pad_w + 1)], 1)
            elif token == "cutout":
                k_h, k_w = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
                top = integers(0, h + 1 - k_h % 2) - k_h // 2
                left = integers(0, w + 1 - k_w % 2) - k_w // 2
                drawn["cutout"] = torch.stack([top, left, top + k_h, left + k_w], 1)
            elif token == "flip":
                drawn["flip"] = uniform() < p.prob_flip
            elif token == "scale":
                low, high = 1.0 / p.ratio_scale, p.ratio_scale
                drawn["scale"] = torch.stack([uniform() * (high - low) + low, uniform() * (high - low) + low], 1)
            elif token == "rotate":
                drawn["rotate"] = (uniform() - 0.5) * 2.0 * math.radians(p.ratio_rotate)
        out = AugParams(tokens, (h, w), None if shared else batch, **drawn)
        return out if device is None else out.to(device)

    def apply(self, x: Tensor, params: AugParams) -> Tensor:
        """Augment `x` (N, C, H, W) with `params`: differentiable in x, batched, no in-place ops, no .item()."""
        if x.dim() != 4:
            raise ValueError(f"augment expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != params.im_size:
            raise ValueError(f"parameters were drawn for size {params.im_size}, images are {tuple(x.shape[-2:])}")
        if not params.shared and params.batch != x.shape[0]:
            raise ValueError(f"parameters were drawn for {params.batch} images, got {x.shape[0]}; see shared=True")
        for stage in _stages(params.tokens, self.mode == "M" and self.compose):
            x = self._run_stage(x, stage, params)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Sample fresh per-image parameters from `generator` and apply them (ordinary, non-siamese DSA)."""
        return self.apply(x, self.sample(x.shape[0], generator, x.shape[-2:], device=x.device))

    def branch_free_fields(self, draws: Sequence[AugParams]) -> tuple[Tensor, ...]:
        """The fixed-shape DSA inputs of a captured graph: each PARAM_FIELDS field of the per-image mode-'S' `draws`,
        concatenated over them, with identity values (brightness 0, saturation and contrast 1, shift 0, an empty
        cutout box, no flip, scale 1, angle 0) where a draw did not draw that token; () for the identity strategy."""
        if not self.tokens:
            return ()
        columns = []
        for p in draws:
            if len(p.tokens) > 1 or not set(p.tokens) <= set(self.tokens):
                raise ValueError(f"branch-free DSA replays one drawn token of {self.tokens}, got {p.tokens}")
            n = 1 if p.shared else p.batch
            drawn = {name: getattr(p, name) for name in PARAM_FIELDS if getattr(p, name) is not None}
            device = next(iter(drawn.values())).device if drawn else torch.device("cpu")
            columns.append([drawn[name] if name in drawn else torch.full((n, *shape), value, dtype=dtype, device=device)
                            for name, (value, shape, dtype) in _IDENTITY.items()])
        return tuple(torch.cat(column) for column in zip(*columns))

    def apply_fields(self, x: Tensor, aug: Sequence[Tensor]) -> Tensor:
        """`apply` of mode-'S' draws given as `branch_free_fields` (for exactly x's images) as the same ops whatever
        was drawn: color, then the crop window and cutout as one mask, then one grid_sample with
        crop·flip·scale·rotate. Equal to `apply` up to float rounding (crop and flip as bilinear samples at shifted
        pixel centres: ~1e-5 in float32); x itself for ()."""
        if not aug:
            return x
        p = AugParams(self.tokens, tuple(x.shape[-2:]), len(x), **dict(zip(PARAM_FIELDS, aug)))
        if "color" in self.tokens:
            x = _color(x, *(_as(t, x) for t in (p.brightness, p.saturation, p.contrast)))
        if "crop" in self.tokens or "cutout" in self.tokens:
            x = _window_mask(x, p.translate, p.cutout)
        geometric = [token for token in ("crop", "flip", "scale", "rotate") if token in self.tokens]
        if geometric:
            matrix = self._matrix(geometric[0], x, p)
            for token in geometric[1:]:  # output -> input: crop · flip · scale · rotate (one of them moves)
                matrix = matrix @ self._matrix(token, x, p)
            x = _warp(x, matrix, self.align_corners)
        return x

    def _run_stage(self, x: Tensor, stage: tuple[str, ...], p: AugParams) -> Tensor:
        """Apply one stage: a single token, or ('warp', *tokens) composed into one resampling."""
        kind = stage[0]
        if kind == "color":
            return _color(x, *(_as(t, x) for t in (p.brightness, p.saturation, p.contrast)))
        if kind == "crop":
            return _translate(x, p.translate.to(x.device))
        if kind == "cutout":
            return x * (~_inside(p.cutout.to(x.device), x)).to(x.dtype).unsqueeze(1)
        if kind == "flip":
            return torch.where(p.flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
        if kind == "warp":
            return self._composed_warp(x, stage[1:], p)
        return _warp(x, self._matrix(kind, x, p), self.align_corners)

    def _composed_warp(self, x: Tensor, tokens: tuple[str, ...], p: AugParams) -> Tensor:
        """One grid_sample for a run [crop [cutout]] (flip|scale|rotate)+, zeroing what sequential ops would clip."""
        if tokens[0] == "crop":
            x = _window_mask(x, p.translate, p.cutout if "cutout" in tokens else None)
        geometric = [token for token in tokens if token != "cutout"]
        suffix: Tensor | None = None  # A_{j+1} ... A_last: output pixel -> point sampled in op j's output
        coverage: Tensor | None = None
        for token in reversed(geometric):
            if suffix is not None and token in _RESAMPLING:  # op j's output was clipped to the frame before op j+1
                c = _frame_coverage(suffix, x, self.align_corners)
                coverage = c if coverage is None else coverage * c
            a = self._matrix(token, x, p)
            suffix = a if suffix is None else a @ suffix
        y = _warp(x, suffix, self.align_corners)
        return y if coverage is None else y * coverage

    def _matrix(self, token: str, x: Tensor, p: AugParams) -> Tensor:
        """(n, 3, 3) homogeneous matrix mapping output to input normalised coordinates for one geometric token."""
        if token == "crop":
            h, w = x.shape[-2:]
            rows, cols = _as(p.translate, x).unbind(1)
            unit_h, unit_w = (2 / max(h - 1, 1), 2 / max(w - 1, 1)) if self.align_corners else (2 / h, 2 / w)
            one, zero = torch.ones_like(rows), torch.zeros_like(rows)
            return _homogeneous(one, zero, cols * unit_w, zero, one, rows * unit_h)
        if token == "flip":
            sign = 1.0 - 2.0 * _as(p.flip, x)
            one, zero = torch.ones_like(sign), torch.zeros_like(sign)
            return _homogeneous(sign, zero, zero, zero, one, zero)
        if token == "scale":
            sx, sy = _as(p.scale, x).unbind(1)
            zero = torch.zeros_like(sx)
            return _homogeneous(sx, zero, zero, zero, sy, zero)
        angle = _as(p.rotate, x)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        return _homogeneous(cos, -sin, zero, sin, cos, zero)


def _choose_token(n: int, generator: torch.Generator) -> int:
    """Mode S's token index in [0, n) without a host sync: drawn from a CPU generator (the stream the CPU path has
    always used), and for a device generator read from its host-side state (seed, offset), which every draw that
    follows advances. The token is then a function of the generator state that callers save: resume stays exact."""
    if generator.device.type == "cpu":
        return int(torch.randint(n, (1,), generator=generator))
    return _token_from_state(generator.get_state(), n)


def _token_from_state(state: Tensor, n: int) -> int:
    """A uniform index in [0, n) that is a fixed function of a generator state (a uint8 CPU tensor)."""
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def _parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split a strategy string into validated tokens; the identity strategies give ()."""
    if strategy in _IDENTITY_STRATEGIES:
        return ()
    tokens = tuple(strategy.split("_"))
    valid = ", ".join(TOKENS)
    for token in tokens:
        if token not in TOKENS:
            raise UserError(f"unknown augmentation token '{token}' in strategy '{strategy}'; use {valid} (or 'none')")
    if len(set(tokens)) != len(tokens):
        raise UserError(f"augmentation strategy '{strategy}' repeats a token; list each of {valid} at most once")
    return tokens


def _stages(tokens: tuple[str, ...], compose: bool) -> list[tuple[str, ...]]:
    """Group tokens into stages; with `compose`, a run [crop [cutout]] (flip|scale|rotate)+ that resamples is 1 warp."""
    if not compose:
        return [(token,) for token in tokens]
    stages: list[tuple[str, ...]] = []
    run: list[str] = []

    def flush() -> None:
        stages.extend([("warp", *run)] if _RESAMPLING.intersection(run) else [(token,) for token in run])
        run.clear()

    for token in tokens:
        if token in ("flip", "scale", "rotate") or (token == "cutout" and run == ["crop"]):
            run.append(token)
        else:
            flush()
            if token == "crop":  # a crop can only open a run: its window becomes a mask on the run's input
                run.append(token)
            else:
                stages.append((token,))
    flush()
    return stages


def _as(t: Tensor, x: Tensor) -> Tensor:
    """Parameter tensor on x's device in x's floating dtype."""
    return t.to(device=x.device, dtype=x.dtype)


def _color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    """Brightness, saturation, contrast in one pass: together c·s·x + c·(1-s)·m_pixel + (1-c)·m_image + b."""
    b, s, c = (v.view(-1, 1, 1, 1) for v in (brightness, saturation, contrast))
    pixel_mean = x.mean(dim=1, keepdim=True)  # saturation pivots on it; brightness shifts it by b
    image_mean = pixel_mean.mean(dim=(2, 3), keepdim=True)  # contrast pivots on it (+ b); saturation keeps it
    offset = c * (1 - s) * pixel_mean + ((1 - c) * image_mean + b)
    return torch.addcmul(offset, c * s, x)


def _translate(x: Tensor, shift: Tensor) -> Tensor:
    """Exact integer shift out[i, j] = x[i + rows, j + cols] with zero fill, by one gather from a 1-px zero border."""
    b, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).flatten(2)
    rows = (torch.arange(h, device=x.device) + shift[:, :1] + 1).clamp(0, h + 1)  # (n, H); 0 and H+1 are zero rows
    cols = (torch.arange(w, device=x.device) + shift[:, 1:] + 1).clamp(0, w + 1)
    index = (rows[:, :, None] * (w + 2) + cols[:, None, :]).flatten(1)
    return padded.gather(2, index[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


def _inside(box: Tensor, x: Tensor) -> Tensor:
    """(n, H, W) bool: pixel lies in the image's box [top, left, bottom, right) (the box may overhang the border)."""
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 2:3])
    in_cols = (cols >= box[:, 1:2]) & (cols < box[:, 3:4])
    return in_rows[:, :, None] & in_cols[:, None, :]


def _window_mask(x: Tensor, shift: Tensor, cutout: Tensor | None) -> Tensor:
    """x with the pixels a crop by `shift` drops zeroed, and those of a following `cutout` box moved by the shift:
    a crop (and cutout) that opens a composed warp, as one mask on the warp's input."""
    shift = shift.to(x.device)
    rows, cols = shift.unbind(1)
    keep = _inside(torch.stack([rows, cols, rows + x.shape[-2], cols + x.shape[-1]], 1), x)
    if cutout is not None:
        keep = keep & ~_inside(cutout.to(x.device) + shift.repeat(1, 2), x)
    return x * keep.to(x.dtype).unsqueeze(1)


def _frame_coverage(matrix: Tensor, x: Tensor, align_corners: bool) -> Tensor:
    """(n, 1, H, W) bilinear weight that sampling at matrix·(output grid) puts on in-frame pixels (1 well inside)."""
    h, w = x.shape[-2:]
    gx, gy = _sampling_points(matrix, h, w, align_corners).unbind(1)
    return (_axis_coverage(gx, w, align_corners) * _axis_coverage(gy, h, align_corners)).unsqueeze(1)


def _axis_coverage(coord: Tensor, size: int, align_corners: bool) -> Tensor:
    """Along one axis, the bilinear weight on pixels 0..size-1 at normalised coordinate `coord`."""
    pixels_per_unit = (size - 1) / 2 if align_corners else size / 2
    return ((size + 1) / 2 - coord.abs() * pixels_per_unit).clamp(0, 1)  # 1 - distance beyond the outer pixel centre


def _homogeneous(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    """Stack per-image entries into (n, 3, 3) matrices [[a, b, c], [d, e, f], [0, 0, 1]]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).view(-1, 3, 3)


def _sampling_points(matrix: Tensor, h: int, w: int, align_corners: bool) -> Tensor:
    """(n, 2, H, W) x and y planes of matrix·(output pixel centres): F.affine_grid, several times faster on CPU."""

    def axis(size: int) -> Tensor:
        """Normalised coordinates of the pixel centres along one axis."""
        if align_corners:
            end = 1.0 if size > 1 else 0.0  # F.affine_grid puts a unit-size axis at 0
            return torch.linspace(-end, end, size, dtype=matrix.dtype, device=matrix.device)
        return (2 * torch.arange(size, dtype=matrix.dtype, device=matrix.device) + 1) / size - 1

    linear, offset = matrix[:, :2, :2, None, None], matrix[:, :2, 2, None, None]
    return linear[:, :, 0] * axis(w).view(1, 1, 1, w) + linear[:, :, 1] * axis(h).view(1, 1, h, 1) + offset


def _warp(x: Tensor, matrix: Tensor, align_corners: bool) -> Tensor:
    """Bilinear resampling of x at matrix·(output grid), zero padding; one grid_sample for the whole batch."""
    grid = _sampling_points(matrix, x.shape[-2], x.shape[-1], align_corners).permute(0, 2, 3, 1).contiguous()
    grid = grid.expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
