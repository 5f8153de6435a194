"""MTT, Matching Training Trajectories (Cazenavette et al., CVPR 2022; SPEC §4).

One outer iteration: sample an expert k and a start epoch t < max_start_epoch, start a student at the expert's
checkpoint θ*_t, train it for N steps on synthetic minibatches with the learnable step size α, and move the images
and α so that the student lands near θ*_{t+M}:  L = ||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||².

The gradient of L can be computed three ways (`grad`): `unrolled` (exact, memory ∝ N), `checkpointed` (exact,
memory ∝ √N, one extra forward per step), `tesla` (TESLA's two-pass gradient, memory independent of N, first-order
in the parameter path: not MTT's exact gradient, SPEC §5.2). TESLA is this class with `grad="tesla"` and,
optionally, soft labels read off the experts.

Step-size guard (SPEC P1): with `lr_guard="clamp"` (default) α is clamped to [lr_min, lr_max] after every update,
so it can neither turn negative nor explode; `lr_guard="none"` is the faithful unconstrained mode, and the run
stops with a clear message if α becomes non-positive or non-finite.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..augment import Augment
from ..errors import UserError
from ..experts import ExpertStore
from ..models import FunctionalModel, create_model, has_batchnorm
from ..run import Diverged
from ..synset import SyntheticSet, preprocess_record
from .tesla import expert_soft_labels, tesla_grad
from .trajectory import checkpointed_grad, make_plan, unrolled_grad

GRADS = {"unrolled": unrolled_grad, "checkpointed": checkpointed_grad, "tesla": tesla_grad}
LABELS = ("hard", "expert", "frozen")


@dataclass
class MTTConfig:
    """Hyperparameters of SPEC §4.6 / §5.4 (names follow the reference code)."""

    ipc: int = 1
    model: str | None = None
    syn_steps: int = 20            # N student steps per iteration
    expert_epochs: int = 2         # M: the target is M epochs after the start
    max_start_epoch: int = 10      # start epoch t in [0, max_start_epoch), exclusive as in the reference code
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01       # α₀
    batch_syn: int | None = None   # None: the whole set in every student step
    pix_init: str = "real"         # real | noise
    grad: str = "unrolled"         # unrolled | checkpointed | tesla
    grad_checkpoint_every: int | None = None  # --grad checkpointed: keep θ every k steps (default ceil(sqrt(N)))
    labels: str = "hard"           # hard | expert (TESLA: target checkpoint, every iteration) | frozen (one expert)
    temperature: float = 1.0
    label_expert: int = 0
    dsa: bool = True
    lr_guard: str = "clamp"        # clamp | none
    lr_min: float = 1e-6
    lr_max: float = 1.0
    seed: int = 0


class MTT:
    """The MTT / TESLA method object for the shared run loop (`distillery.run`)."""

    name = "mtt"

    def __init__(self, dataset, store: ExpertStore, cfg: MTTConfig):
        self.ds, self.store, self.cfg = dataset, store, cfg
        spec = dataset.spec
        device = dataset.train.x.device
        if cfg.grad not in GRADS:
            raise UserError(f"unknown --grad '{cfg.grad}'; use one of {', '.join(GRADS)}")
        if cfg.labels not in LABELS:
            raise UserError(f"unknown --labels '{cfg.labels}'; use one of {', '.join(LABELS)}")
        if cfg.pix_init not in ("real", "noise"):
            raise UserError(f"unknown --pix-init '{cfg.pix_init}'; use real or noise")
        if store.epochs < cfg.max_start_epoch - 1 + cfg.expert_epochs:
            raise UserError(f"experts have {store.epochs} epochs but max_start_epoch {cfg.max_start_epoch} + "
                            f"expert_epochs {cfg.expert_epochs} needs {cfg.max_start_epoch - 1 + cfg.expert_epochs}; "
                            "train longer experts or lower --max-start-epoch")
        model = create_model(cfg.model or spec.default_model, spec.channels, spec.num_classes, spec.im_size)
        if has_batchnorm(model):
            raise UserError(f"model {cfg.model} has BatchNorm, whose running statistics cannot be unrolled; "
                            "distil with an instance-norm or norm-free model (e.g. ConvNet) and evaluate on BN later")
        self.fm = FunctionalModel(model.to(device))
        self.augment = Augment(spec.dsa_strategy if cfg.dsa else "none")
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)       # minibatches, augmentation
        self.cpu_gen = torch.Generator().manual_seed(cfg.seed + 1)           # expert and start-epoch draws

        n = cfg.ipc * spec.num_classes
        if cfg.pix_init == "real":
            images, hard = dataset.random_set(cfg.ipc, self.gen)
        else:
            hard = torch.arange(spec.num_classes, device=device).repeat_interleave(cfg.ipc)
            images = torch.randn((n, spec.channels, *spec.im_size), generator=self.gen, device=device)
        self.images = images.clone().requires_grad_(True)
        self.labels = hard
        if cfg.labels == "frozen":
            theta = store.checkpoint(cfg.label_expert, store.epochs).to(device)
            self.labels = expert_soft_labels(self.fm, theta, self.images.detach(), cfg.temperature)
        self.lr = torch.tensor(float(cfg.lr_teacher), device=device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.lr], lr=cfg.lr_lr, momentum=0.5)

    def step(self, it: int) -> dict[str, float]:
        """One outer iteration: sample an expert segment, match it, update images and α."""
        cfg, device = self.cfg, self.images.device
        k = int(torch.randint(self.store.num_experts, (1,), generator=self.cpu_gen))
        t = int(torch.randint(cfg.max_start_epoch, (1,), generator=self.cpu_gen))
        theta_start, theta_target = (p.to(device) for p in self.store.pair(k, t, t + cfg.expert_epochs))
        if cfg.labels == "expert":  # TESLA: soft labels from the target checkpoint of this iteration's expert
            self.labels = expert_soft_labels(self.fm, theta_target, self.images.detach(), cfg.temperature)
        plan = make_plan(len(self.images), cfg.syn_steps, cfg.batch_syn, self.augment, self.gen,
                         self.ds.spec.im_size, device)
        kwargs = {"every": cfg.grad_checkpoint_every} if cfg.grad == "checkpointed" else {}
        res = GRADS[cfg.grad](self.fm, self.images, self.labels, self.lr, theta_start, theta_target, plan,
                              self.augment, **kwargs)
        self.images.grad = res.grad_images
        self.lr.grad = res.grad_lr
        self.opt_img.step()
        self.opt_lr.step()
        with torch.no_grad():
            if cfg.lr_guard == "clamp":
                self.lr.clamp_(cfg.lr_min, cfg.lr_max)
            elif not self.lr.item() > 0:
                raise Diverged(f"step size α became {self.lr.item():.3g} at iteration {it} (--lr-guard none); "
                               "the last good checkpoint is kept: lower --lr-lr or use --lr-guard clamp")
        return {"loss": res.loss, "lr": self.lr.item(), "start_epoch": float(t)}

    def synset(self) -> SyntheticSet:
        """The current distilled set, with α as its training learning rate."""
        spec = self.ds.spec
        kind = "hard" if self.cfg.labels == "hard" else "soft"
        meta = {"method": "tesla" if self.cfg.grad == "tesla" else "mtt", "dataset": spec.name,
                "ipc": self.cfg.ipc, "num_classes": spec.num_classes, "class_names": list(spec.class_names),
                "model": self.cfg.model or spec.default_model, "dsa_strategy": self.augment.strategy,
                "config": asdict(self.cfg), "seed": self.cfg.seed}
        return SyntheticSet(self.images.detach().clone(), self.labels.detach().clone(), kind, self.lr.item(),
                            preprocess_record(self.ds.preprocess), meta)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume."""
        return {"images": self.images.detach().cpu(), "labels": self.labels.cpu(), "lr": self.lr.detach().cpu(),
                "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict(),
                "gen": self.gen.get_state(), "cpu_gen": self.cpu_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output."""
        device = self.images.device
        with torch.no_grad():
            self.images.copy_(state["images"].to(device))
            self.lr.copy_(state["lr"].to(device))
        self.labels = state["labels"].to(device)
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.gen.set_state(state["gen"])
        self.cpu_gen.set_state(state["cpu_gen"])
