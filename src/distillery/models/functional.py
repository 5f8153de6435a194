"""Call a model with an explicit flat parameter vector: what unrolled and vmapped training needs (SPEC §4.5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


class FunctionalModel:
    """Wraps a template module so `fm(flat, x)` runs it with the parameters packed in the 1-D tensor `flat`.

    The packing order is `module.parameters()` order, the order expert snapshots are saved in. Buffers (e.g.
    BatchNorm running statistics) are not part of `flat`; they are taken from the template unchanged.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """Concatenate the parameters of `module` (built like the template) into one vector."""
        return torch.cat([p.reshape(-1) for p in module.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split `flat` into named views with the template's shapes."""
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of the template module run with parameters `flat` on input `x`."""
        state = self.unflatten(flat)
        state.update(dict(self.module.named_buffers()))
        return functional_call(self.module, state, (x,))

    def load_into(self, flat: torch.Tensor, module: nn.Module | None = None) -> nn.Module:
        """Copy `flat` into the parameters of `module` (default: the template) and return it."""
        module = self.module if module is None else module
        with torch.no_grad():
            for p, v in zip(module.parameters(), self.unflatten(flat.detach()).values()):
                p.copy_(v)
        return module
