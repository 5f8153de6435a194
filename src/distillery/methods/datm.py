"""DATM, Difficulty-Aligned Trajectory Matching (Guo et al., ICLR 2024; SPEC §10.5): MTT with three changes.

1. The matching range. Start epochs are drawn from [min_start_epoch, upper(it)), where (DATM's "sequential
   generation") upper(it) = min(max_start_epoch, c + floor((max_start_epoch − c) · it / expansion_end_epoch)),
   c = current_max_start_epoch: early iterations match only early (easy) segments, later ones reach the late
   (hard) ones. Without current_max_start_epoch the range is [min_start_epoch, max_start_epoch) throughout.
2. Learned soft labels. The labels are logits z (N, C); the student trains on CE against softmax(z) (DATM's
   SoftCrossEntropy), and z is moved by its own SGD (lr_y, momentum_y). z starts as the experts' logits at epoch
   label_epoch: averaged over the experts that classify the image correctly (pix_init "correct"), else expert 0's.
   pix_init "correct" (and "auto", the default) picks, per class, the first images of a random order that expert 0 classifies correctly
   (then expert 1, ... if too few). The gradient of L with respect to z is the gradient with respect to the
   probabilities p = softmax(z) (MTT's gradient modes differentiate float labels) pulled back through softmax.
3. A loss threshold: an iteration whose loss is above `threshold` updates nothing (nor does a NaN loss).

Everything else (expert sampling, the unrolled / checkpointed / TESLA gradients, α and its guard, several segments
per iteration, torchrun) is MTT's (`mtt.py`). The distilled set stores softmax(z) as its learned labels, so that
`distillery evaluate` trains with soft cross-entropy against softmax(z): DATM's evaluation (it saves z itself).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..config.defaults import DataFacts, is_small
from ..distributed import broadcast_
from ..errors import UserError
from ..experts import ExpertStore
from ..config.options import option
from ..sets.synset import SyntheticSet
from .mtt import MTT, MTTConfig, expert_epochs_available
from .registry import register_method, register_presets
from .tesla import expert_logits

PIX_INITS = ("auto", "correct", "real", "noise")
LABELS = ("learned", "hard")
CHUNK = 256  # images per expert forward when picking and labelling images (DATM's batch_size there)


@dataclass
class DATMConfig(MTTConfig):
    """MTT's options plus DATM's (its config names: docs/PUBLISHED_FLAGS.md)."""

    pix_init: str = option("auto", choices=PIX_INITS,
                           help="initial images: correct (real images the experts classify correctly, DATM's "
                                "samples_predicted_correctly) | real | noise | auto (DATM's own choice: correct)")
    labels: str = option("learned", choices=LABELS,
                         help="learned (soft labels from the experts' logits, optimised) | hard (class ids)")
    min_start_epoch: int = option(0, low=0, help="start epochs drawn from [min_start_epoch, upper bound)")
    current_max_start_epoch: int | None = option(
        None, low=1, help="sequential generation: the upper bound of the start epoch at iteration 0, growing "
                          "linearly to max_start_epoch by iteration expansion_end_epoch; none: max_start_epoch "
                          "throughout (DATM's Sequential_Generation False)")
    expansion_end_epoch: int = option(3000, low=1, help="iteration at which the upper bound reaches max_start_epoch")
    lr_y: float = option(2.0, low=0, low_open=True, help="SGD learning rate of the label logits")
    momentum_y: float = option(0.9, low=0, high=1, high_open=True, help="SGD momentum of the label logits")
    threshold: float = option(1.0, low=0, low_open=True,
                              help="an iteration whose matching loss is above this updates nothing")
    label_epoch: int | None = option(None, low=0, help="expert epoch whose logits pick the images and initialise "
                                                       "the labels (DATM's Label_Model_Timestamp; none: the last)")


def start_upper_bound(it: int, max_start: int, current_max: int | None, expansion_end: int) -> int:
    """Exclusive upper bound of iteration `it`'s start epochs (DATM's sequential generation; module docstring)."""
    if current_max is None:
        return max_start
    return min(max_start, current_max + int((max_start - current_max) * it / expansion_end))


def softmax_pullback(logits: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    """∂L/∂z from ∂L/∂p for p = softmax(z) row-wise (the chain rule through softmax)."""
    z = logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.softmax(z, 1), z, grad_probs)
    return grad


def check_datm_options(config: dict[str, Any], expert_epochs: int, source: str) -> None:
    """UserError for DATM's own options that cannot work together (`expert_epochs`: those of the experts `source`
    names); `DATM.check_config` before any data is read, and `DATM` itself when built without `distill`."""
    low, high, current = config["min_start_epoch"], config["max_start_epoch"], config["current_max_start_epoch"]
    if low >= high:
        raise UserError(f"--min-start-epoch {low} must be below --max-start-epoch {high}; lower it")
    if current is not None and not low < current <= high:
        raise UserError(f"--current-max-start-epoch {current} must be in (--min-start-epoch {low}, "
                        f"--max-start-epoch {high}]; change it, or pass none for the whole range from the start")
    if config["labels"] == "learned" and config.get("fast") == "on":
        raise UserError("--fast on does not differentiate learned labels; use --fast off or --labels hard")
    label_epoch = config.get("label_epoch")
    if label_epoch is not None and label_epoch > expert_epochs:
        raise UserError(f"--label-epoch {label_epoch} is past the {expert_epochs} epochs of {source}; "
                        "lower it or pass none (the last epoch)")


@register_method("datm")
class DATM(MTT):
    """MTT with DATM's start-epoch range, learned soft labels and loss threshold (module docstring)."""

    config_class = DATMConfig
    derived_keys = (*MTT.derived_keys, "current_max_start_epoch", "expansion_end_epoch", "lr_y")

    @classmethod
    def derive_defaults(cls, facts: DataFacts, ipc: int) -> dict[str, Any]:
        """MTT's derived values, then DATM's range and label rate (docs/DEFAULTS.md).

        Small data (the CPU regime) keeps MTT's short range and grows it from its middle over the first half of the
        run; large data takes the range of DATM's CIFAR-10 IPC 10 row (20 epochs, growing from 10 over 1000
        iterations)."""
        out = super().derive_defaults(facts, ipc)
        if is_small(facts):
            out.update(current_max_start_epoch=max(1, out["max_start_epoch"] // 2),
                       expansion_end_epoch=max(1, out["iterations"] // 2), lr_y=2.0)
        else:
            out.update(max_start_epoch=20, current_max_start_epoch=10, expansion_end_epoch=1000, lr_y=2.0,
                       expert_epochs_train=max(50, out["expert_epochs_train"]))
        return out

    @classmethod
    def check_config(cls, config: dict[str, Any], facts: DataFacts) -> None:
        """MTT's checks, then DATM's own options against each other and the experts' epochs."""
        super().check_config(config, facts)
        check_datm_options(config, *expert_epochs_available(config))

    def __init__(self, dataset, store: ExpertStore, cfg: DATMConfig):
        check_datm_options(dataclasses.asdict(cfg), store.epochs, "the experts")  # also when built without distill
        super().__init__(dataset, store, cfg)  # picks the images through `initial_images`
        self.label_logits: torch.Tensor | None = None
        self.opt_y: torch.optim.Optimizer | None = None
        if cfg.labels == "learned":
            self.label_logits = broadcast_(self.initial_logits(self.images.detach())).requires_grad_(True)
            self.labels = torch.softmax(self.label_logits.detach(), 1)
            self.opt_y = torch.optim.SGD([self.label_logits], lr=cfg.lr_y, momentum=cfg.momentum_y)

    @property
    def picks_correct(self) -> bool:
        """Whether the set starts from real images the experts classify correctly (pix_init correct, or auto)."""
        return self.cfg.pix_init in ("auto", "correct")

    @property
    def label_epoch(self) -> int:
        """The expert epoch that picks the images and initialises the labels."""
        return self.store.epochs if self.cfg.label_epoch is None else self.cfg.label_epoch

    def expert_thetas(self):
        """Each expert's parameters at `label_epoch`, on the images' device, one at a time."""
        device = self.ds.train.x.device
        return (self.store.checkpoint(k, self.label_epoch).to(device) for k in range(self.store.num_experts))

    def initial_images(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """pix_init "correct": per class, in a random order, the first ipc images expert 0 classifies correctly
        (then expert 1's, ...); a class with too few such images is filled up in that order. Else MTT's."""
        if not self.picks_correct:
            return super().initial_images(gen)
        ds, ipc = self.ds, self.cfg.ipc
        picked = []
        for c in range(ds.spec.num_classes):
            idx = ds.class_indices[c]
            if ipc > len(idx):
                raise UserError(f"class {c} of {ds.spec.name} has only {len(idx)} training images, cannot draw {ipc}; "
                                "lower ipc or val_fraction")
            order = idx[torch.randperm(len(idx), generator=gen, device=gen.device).to(idx.device)]
            chosen: list[int] = []
            for theta in self.expert_thetas():
                for start in range(0, len(order), CHUNK):
                    part = order[start:start + CHUNK]
                    right = expert_logits(self.fm, theta, ds.train.x[part], CHUNK).argmax(1) == c
                    chosen += [i for i in part[right].tolist() if i not in chosen][:ipc - len(chosen)]
                    if len(chosen) == ipc:
                        break
                if len(chosen) == ipc:
                    break
            chosen += [i for i in order.tolist() if i not in chosen][:ipc - len(chosen)]
            picked.append(torch.tensor(chosen, device=idx.device))
        hard = torch.arange(ds.spec.num_classes, device=ds.train.x.device).repeat_interleave(ipc)
        return ds.train.x[torch.cat(picked)], hard

    @torch.no_grad()
    def initial_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The label logits DATM starts from: with pix_init "correct", per image the mean logits of the experts
        that classify it correctly (of all experts where none does); else expert 0's logits."""
        hard = torch.arange(self.ds.spec.num_classes, device=images.device).repeat_interleave(self.cfg.ipc)
        if not self.picks_correct:
            return expert_logits(self.fm, next(iter(self.expert_thetas())), images, CHUNK)
        right_sum = all_sum = count = None
        for theta in self.expert_thetas():
            logits = expert_logits(self.fm, theta, images, CHUNK)
            right = (logits.argmax(1) == hard).unsqueeze(1).to(logits.dtype)
            if right_sum is None:
                right_sum, all_sum, count = logits * right, logits.clone(), right.clone()
            else:
                right_sum += logits * right
                all_sum += logits
                count += right
        return torch.where(count > 0, right_sum / count.clamp_min(1), all_sum / self.store.num_experts)

    def start_range(self, it: int) -> tuple[int, int]:
        """[min_start_epoch, upper bound of iteration `it`)."""
        cfg = self.cfg
        return cfg.min_start_epoch, start_upper_bound(it, cfg.max_start_epoch, cfg.current_max_start_epoch,
                                                      cfg.expansion_end_epoch)

    def student_labels(self) -> torch.Tensor:
        """Learned labels: the probabilities softmax(z), as a tensor that asks MTT's gradient for its gradient."""
        if self.label_logits is None:
            return self.labels
        return torch.softmax(self.label_logits.detach(), 1).requires_grad_(True)

    def step(self, it: int) -> dict[str, float]:
        """One DATM iteration: MTT's gradient; above the threshold nothing moves, else images, α and the labels."""
        res, t = self.gradient(it)
        if not res.loss <= self.cfg.threshold:
            return {"loss": res.loss, "lr": self.lr.item(), "start_epoch": float(t), "alpha_pinned": 0.0,
                    "student_still": 0.0, "skipped": 1.0}
        logs = self.update(res, t, it)
        if self.label_logits is not None:
            self.label_logits.grad = softmax_pullback(self.label_logits, res.grad_labels)
            self.opt_y.step()
            self.labels = torch.softmax(self.label_logits.detach(), 1)
        return {**logs, "skipped": 0.0}

    def synset(self) -> SyntheticSet:
        """MTT's set, named DATM, with softmax(z) as learned labels."""
        s = super().synset()
        kind = "learned" if self.label_logits is not None else s.label_kind
        return dataclasses.replace(s, label_kind=kind, meta={**s.meta, "method": self.name})

    def init_from(self, s: SyntheticSet) -> None:
        """--init-from: the set's images and, when labels are learned, its labels (z = log p) or, for a set with
        class ids, the experts' logits on its images."""
        super().init_from(s)
        if self.label_logits is not None:
            with torch.no_grad():
                probs = s.labels.to(self.images.device)
                logits = probs.clamp_min(1e-30).log() if probs.ndim == 2 else self.initial_logits(self.images)
                self.label_logits.copy_(logits)
                self.labels = torch.softmax(self.label_logits.detach(), 1)

    def state_dict(self) -> dict[str, Any]:
        """MTT's state plus the label logits and their optimiser."""
        state = super().state_dict()
        if self.label_logits is not None:
            state.update(label_logits=self.label_logits.detach().cpu(), opt_y=self.opt_y.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (the label optimiser keeps this run's lr_y, as MTT's optimisers do)."""
        super().load_state_dict(state)
        if self.label_logits is not None:
            with torch.no_grad():
                self.label_logits.copy_(state["label_logits"].to(self.images.device))
            lrs = [group["lr"] for group in self.opt_y.param_groups]
            self.opt_y.load_state_dict(state["opt_y"])
            for group, lr in zip(self.opt_y.param_groups, lrs):
                group["lr"] = lr
            self.labels = torch.softmax(self.label_logits.detach(), 1)


def _datm(dataset: str, ipc: int, model: str, n: int, m: int, min_start: int, max_start: int, current: int | None,
          expansion_end: int, lr_img: float, lr_lr: float, lr_y: float, threshold: float, batch_syn: int | None,
          pix_init: str, source: str, grad: str = "unrolled") -> dict[str, Any]:
    """A DATM row from its config file `source` (NUS-HPC-AI-Lab/DATM at 97ae510); batch_syn None = the whole set.
    `grad` checkpointed (the same exact gradient) where the unroll needs more than one 80 GB GPU (docs/SCALING.md)."""
    return {"method": "datm", "dataset": dataset, "ipc": ipc, "model": model, "syn_steps": n, "expert_epochs": m,
            "min_start_epoch": min_start, "max_start_epoch": max_start, "current_max_start_epoch": current,
            "expansion_end_epoch": expansion_end, "lr_img": lr_img, "lr_lr": lr_lr, "lr_teacher": 0.01,
            "lr_y": lr_y, "momentum_y": 0.9, "threshold": threshold, "batch_syn": batch_syn, "pix_init": pix_init,
            "labels": "learned", "label_epoch": None, "grad": grad, "zca": "kornia", "iterations": 10000,
            "eval_every": 500, "eval_runs": 1, "eval_epochs": 1000, "num_experts": 100, "expert_epochs_train": 100,
            "expert_lr": 0.01,
            "note": f"DATM {source} (read at 97ae510); experts: 100 x 100 epochs at lr 0.01 per its README, but plain "
                    "SGD here where DATM trains FTD experts (GSAM, rho 0.01, alpha 0.3); DATM evaluates at batch 128, "
                    "we at 256 (same for sets of <= 128 images); unverified: no row reproduced here"}


# DATM's configs/<dataset>/ConvIN/IPC<n>.yaml (SPEC §10.5; flags in docs/PUBLISHED_FLAGS.md)
register_presets({
    "datm/cifar10-ipc1": _datm("cifar10", 1, "ConvNet", 80, 2, 0, 4, None, 3000, 100, 1e-7, 5.0, 1.1, None,
                               "correct", "configs/CIFAR-10/ConvIN/IPC1.yaml"),
    "datm/cifar10-ipc10": _datm("cifar10", 10, "ConvNet", 80, 2, 0, 20, 10, 1000, 100, 1e-5, 2.0, 1.0, None,
                                "correct", "configs/CIFAR-10/ConvIN/IPC10.yaml"),
    "datm/cifar10-ipc50": _datm("cifar10", 50, "ConvNet", 80, 2, 0, 40, 20, 2000, 1000, 1e-5, 2.0, 1.0, None,
                                "correct", "configs/CIFAR-10/ConvIN/IPC50.yaml", "checkpointed"),
    "datm/cifar100-ipc1": _datm("cifar100", 1, "ConvNet", 40, 3, 0, 20, 10, 1000, 1000, 1e-5, 10.0, 1.0, None,
                                "correct", "configs/CIFAR-100/ConvIN/IPC1.yaml (zca: its default True)"),
    "datm/cifar100-ipc10": _datm("cifar100", 10, "ConvNet", 80, 2, 0, 50, 30, 2000, 1000, 1e-5, 10.0, 1.0, None,
                                 "correct", "configs/CIFAR-100/ConvIN/IPC10.yaml", "checkpointed"),
    "datm/cifar100-ipc50": _datm("cifar100", 50, "ConvNet", 80, 2, 20, 70, None, 3000, 1000, 1e-5, 10.0, 1.0, 1000,
                                 "real", "configs/CIFAR-100/ConvIN/IPC50.yaml", "checkpointed"),
    "datm/tiny-imagenet-ipc1": _datm("tiny-imagenet", 1, "ConvNetD4", 40, 2, 0, 20, 15, 2000, 10000, 1e-4, 10.0, 1.0,
                                     None, "correct", "configs/TinyImageNet/ConvIN/IPC1.yaml", "checkpointed"),
    "datm/tiny-imagenet-ipc10": _datm("tiny-imagenet", 10, "ConvNetD4", 40, 2, 10, 50, None, 3000, 100, 1e-4, 10.0,
                                      1.0, 500, "correct", "configs/TinyImageNet/ConvIN/IPC10.yaml", "checkpointed"),
    "datm/tiny-imagenet-ipc50": _datm("tiny-imagenet", 50, "ConvNetD4", 20, 2, 40, 70, None, 3000, 100, 1e-4, 10.0,
                                      1.0, 1000, "correct", "configs/TinyImageNet/ConvIN/IPC50.yaml", "checkpointed"),
})
