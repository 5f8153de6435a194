"""DM, Distribution Matching (Zhao & Bilen, WACV 2023; `[DC-code] main_DM.py`, SPEC §10.5).

One outer iteration: a freshly initialised network (seeded from (seed, iteration), parameters frozen, train mode);
for every class c, `batch_real` random real images of c and the IPC synthetic images of c, both augmented with ONE
shared DSA draw (siamese); the loss sums over classes the squared distance between the mean embeddings
(`model.embed`, the features before the classifier) of the real and the synthetic images, the real side held fixed:

    L = Σ_c ‖ mean(embed(A_c(x_real,c))) − mean(embed(A_c(x_syn,c))) ‖²

and one SGD step (lr_img, momentum 0.5) moves the images. Real and synthetic images go through the network in one
forward each (all classes together): for networks without BatchNorm that equals the reference's per-class forwards,
for BatchNorm networks it is the reference's own choice. DM reads no experts and learns no labels or step size;
its sets are evaluated under the dsa protocol with the default learning rate.

Every draw (network, real images, augmentation) comes from a stream keyed by (seed, iteration), so a resumed run
continues exactly as an uninterrupted one; the state is the images and the optimiser's momentum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..augment import Augment
from ..config.defaults import DataFacts, is_small
from ..models import init_seeded
from ..config.options import option
from ..streams import stream_generator
from ..sets.synset import SyntheticSet, preprocess_record
from .registry import Method, MethodConfig, register_method, register_presets

# Purposes of the random streams (first key after the seed in `stream_generator`).
_INIT, _STEP = 0, 1


@dataclass
class DMConfig(MethodConfig):
    """Hyperparameters of SPEC §10.5 (reference flag in brackets)."""

    lr_img: float = option(1.0, low=0, low_open=True, resumable=True,
                           help="SGD learning rate of the images, momentum 0.5 [--lr_img]")
    batch_real: int = option(256, low=1, help="real images per class and iteration (all of a smaller class) "
                                              "[--batch_real]")
    dsa: bool = option(True, help="siamese DSA: one draw per class shared by its real and synthetic images")


def dm_loss(net: nn.Module, real: Sequence[Tensor], syn: Sequence[Tensor]) -> Tensor:
    """Σ_c ‖mean embed(real[c]) − mean embed(syn[c])‖², the real embeddings held fixed (one forward per side)."""
    with torch.no_grad():
        real_emb = net.embed(torch.cat(list(real))).split([len(r) for r in real])
    syn_emb = net.embed(torch.cat(list(syn))).split([len(s) for s in syn])
    return sum(((r.mean(0) - s.mean(0)) ** 2).sum() for r, s in zip(real_emb, syn_emb))


@register_method("dm")
class DM(Method):
    """The DM method object for the shared run loop (`distillery.run`)."""

    config_class = DMConfig
    derived_keys = ("lr_img", "batch_real")
    divergence_fix = "a lower --lr-img"

    @classmethod
    def derive_defaults(cls, facts: DataFacts, ipc: int) -> dict[str, Any]:
        """Small data: a short CPU run (iteration count chosen on the validation split of digits); large: the
        published 20000 iterations, evaluated every 2000 (SPEC §10.5). DM works on unwhitened data."""
        small = is_small(facts)
        return {**super().derive_defaults(facts, ipc), "zca": None, "lr_img": 1.0, "batch_real": 256,
                "iterations": 200 if small else 20000, "eval_every": 50 if small else 2000,
                "eval_epochs": 300 if small else 1000, "eval_runs": 3, "final_eval_runs": 5}

    @classmethod
    def oom_advice(cls, config: dict[str, Any]) -> str:
        """Fewer real images per class, or fewer synthetic ones."""
        return (f"lower --batch-real (now {config.get('batch_real')}: real images per class and iteration), or "
                "use fewer images per class")

    def __init__(self, dataset, cfg: DMConfig):
        super().__init__(dataset, cfg)
        spec = dataset.spec
        self.device = dataset.train.x.device
        self.model_name = cfg.model or spec.default_model
        # the reference's DiffAugment: affine_grid with PyTorch's default align_corners (False), SPEC §3.2
        self.augment = Augment(spec.dsa_strategy, align_corners=False) if cfg.dsa else None
        images, self.labels = self.initial_images(stream_generator(cfg.seed, _INIT, device=self.device))
        self.images = images.detach().clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=0.5)

    def step(self, it: int) -> dict[str, float]:
        """One outer iteration: fresh network, per-class siamese batches, mean-embedding loss, one image step."""
        cfg, spec, ds = self.cfg, self.ds.spec, self.ds
        gen = stream_generator(cfg.seed, _STEP, it, device=self.device)
        net_seed = int(torch.randint(2 ** 62, (1,), generator=gen, device=self.device))
        net = init_seeded(self.model_name, spec.channels, spec.num_classes, spec.im_size, net_seed).to(self.device)
        net.train().requires_grad_(False)
        real, syn = [], []
        for c, x_syn in enumerate(self.images.split(cfg.ipc)):
            x_real = ds.sample_real(c, min(cfg.batch_real, len(ds.class_indices[c])), gen)
            if self.augment is not None:
                shared = self.augment.sample(1, gen, spec.im_size, device=self.device, shared=True)
                x_real, x_syn = self.augment.apply(x_real, shared), self.augment.apply(x_syn, shared)
            real.append(x_real)
            syn.append(x_syn)
        loss = dm_loss(net, real, syn)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def synset(self) -> SyntheticSet:
        """The current distilled set (hard labels, no learned step size: the dsa protocol's default lr)."""
        spec = self.ds.spec
        meta = {"method": self.name, "dataset": spec.name, "ipc": self.cfg.ipc, "num_classes": spec.num_classes,
                "class_names": list(spec.class_names), "model": self.model_name,
                "dsa_strategy": self.augment.strategy if self.augment else "none", "config": asdict(self.cfg),
                "seed": self.cfg.seed}
        return SyntheticSet(self.images.detach().clone(), self.labels.clone(), "hard", None,
                            preprocess_record(self.ds.preprocess), meta)

    def state_dict(self) -> dict[str, Any]:
        """The images and the optimiser (every draw comes from a keyed stream: no generator state)."""
        return {"images": self.images.detach().cpu(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output, keeping the configured learning rate (--resume may change it)."""
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr_img


def _dm(ipc: int, published: float) -> dict[str, Any]:
    """DM's CIFAR-10 row (SPEC §10.5, `[DC-code] main_DM.py` defaults): 20000 iterations, evaluated every 2000."""
    return {"method": "dm", "dataset": "cifar10", "ipc": ipc, "model": "ConvNet", "zca": None, "pix_init": "real",
            "lr_img": 1.0, "batch_real": 256, "dsa": True, "iterations": 20000, "eval_every": 2000,
            "eval_epochs": 1000, "note": f"SPEC §10.5 ([DC-code] main_DM.py); published {published} (ConvNet, "
                                         "DM row of [PAD-T1], SPEC §8.3)"}


register_presets({
    "dm/cifar10-ipc1": _dm(1, 26.0),
    "dm/cifar10-ipc10": _dm(10, 48.9),
    "dm/cifar10-ipc50": _dm(50, 63.0),
})
