"""Ports of the published training loops (MTT `buffer.py` experts, `distill.py`'s iteration, `utils.evaluate_synset`)
and a timing helper.

The ports keep the published structure on purpose: an `nn.Module` with `nn.GroupNorm(C, C)`, `torch.optim.SGD`,
`loss.backward()`, DSA on every batch, and the per-batch `loss.item()` / accuracy read of `utils.epoch` (a host
sync per batch on a GPU). They run on distillery's tensors and DSA ops, so a side-by-side ratio in one process
measures the loop, not the data pipeline.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distillery.augment import Augment
from distillery.methods.trajectory import StepPlan
from distillery.models import FunctionalModel, init_seeded


def published_convnet(channels: int, num_classes: int, im_size: tuple[int, int], seed: int,
                      model: str = "ConvNet") -> nn.Module:
    """ConvNet-128 as the published code builds it: nn.GroupNorm(C, C) instance norm (not distillery's Function)."""
    net = init_seeded(model, channels, num_classes, im_size, seed)
    for i, layer in enumerate(net.features):
        if isinstance(layer, nn.GroupNorm):
            plain = nn.GroupNorm(layer.num_channels, layer.num_channels, affine=True)
            plain.load_state_dict(layer.state_dict())
            net.features[i] = plain
    return net


def published_expert_epoch(net: nn.Module, x: torch.Tensor, y: torch.Tensor, strategy: str, batch: int = 256,
                           lr: float = 0.01, seed: int = 0) -> float:
    """One epoch of buffer.py: SGD(lr, momentum 0, wd 0), DSA per batch, per-batch loss/accuracy reads; mean loss."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    augment = Augment(strategy, compose=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0, weight_decay=0)
    order = torch.randperm(len(x), generator=gen, device=x.device)
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch):
        idx = order[i:i + batch]
        img = augment(x[idx], gen)
        out = net(img)
        loss = F.cross_entropy(out, y[idx])
        loss_sum += loss.item() * len(idx)
        correct += int((out.argmax(1) == y[idx]).sum().cpu())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss_sum / len(x)


def published_mtt_iteration(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                            start: torch.Tensor, target: torch.Tensor, plan: StepPlan, strategy: str) -> float:
    """One outer iteration of distill.py: unroll `plan.steps` student steps from `start` (autograd.grad with
    create_graph through the nn.GroupNorm net), the normalised parameter loss, `.backward()` into images and syn_lr.

    The plan's minibatches and DSA draws stand in for distill.py's torch.randperm chunks and DiffAugment calls, so
    the gradients can be compared with distillery's on the same plan. Returns the loss (grads land in `.grad`)."""
    fm = FunctionalModel(net)
    augment = Augment(strategy, compose=False)
    student_params = [start.detach().clone().requires_grad_(True)]
    for i in range(plan.steps):
        x = images[plan.indices[i]]
        if plan.aug[i] is not None:
            x = augment.apply(x, plan.aug[i])
        ce_loss = F.cross_entropy(fm(student_params[-1], x), labels[plan.indices[i]])
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = start.numel()
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
    param_dist = F.mse_loss(start, target, reduction="sum") / num_params
    grand_loss = param_loss / param_dist
    images.grad, syn_lr.grad = None, None
    grand_loss.backward()
    return grand_loss.item()


def published_evaluate(x: torch.Tensor, y: torch.Tensor, channels: int, num_classes: int, epochs: int,
                       strategy: str, lr: float = 0.01, batch: int = 256, seed: int = 0,
                       model: str = "ConvNet") -> nn.Module:
    """utils.evaluate_synset's training: SGD momentum 0.9, wd 5e-4, lr / 10 after epoch epochs // 2 (rebuilt)."""
    net = published_convnet(channels, num_classes, tuple(x.shape[2:]), seed, model).to(x.device)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    augment = Augment(strategy, compose=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    for ep in range(epochs + 1):
        order = torch.randperm(len(x), generator=gen, device=x.device)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            out = net(augment(x[idx], gen))
            loss = F.cross_entropy(out, y[idx])
            loss.item()
            int((out.argmax(1) == y[idx]).sum().cpu())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if ep == epochs // 2 + 1:
            optimizer = torch.optim.SGD(net.parameters(), lr=lr * 0.1, momentum=0.9, weight_decay=0.0005)
    return net


def measure(fn: Callable[[], object], device: str) -> tuple[float, float, float | None, float | None]:
    """(wall s, process CPU s, peak MiB allocated, peak MiB reserved) of fn(); memory is None off CUDA.

    CPU seconds are what to compare on a CPU shared with other jobs, where wall time mostly measures the neighbours.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - start, time.process_time() - cpu, torch.cuda.max_memory_allocated() / 2**20,
                torch.cuda.max_memory_reserved() / 2**20)
    return time.perf_counter() - start, time.process_time() - cpu, None, None


def alternate(fns: dict[str, Callable[[], object]], rounds: int, device: str,
              warmup: bool = True) -> dict[str, dict]:
    """Run each fn once as warm-up, then `rounds` alternating rounds; per name min/median/max s and peak memory."""
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    memory: dict[str, tuple[float | None, float | None]] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu_s, alloc, reserved = measure(fn, device)
            times[name].append(wall)
            cpu[name].append(cpu_s)
            memory[name] = (alloc, reserved)
    return {name: {"min": min(t), "median": statistics.median(t), "max": max(t),
                   "cpu_median": statistics.median(cpu[name]), "alloc_mib": memory[name][0],
                   "reserved_mib": memory[name][1]} for name, t in times.items()}


def row(name: str, stats: dict, published: str = "—") -> str:
    """One Markdown table row: name, min/median/max s, peak allocated/reserved MiB (n/a off CUDA), published."""
    mem = (f"n/a (CPU; CPU-time median {stats['cpu_median']:.3f} s)" if stats["alloc_mib"] is None
           else f"{stats['alloc_mib']:.0f} / {stats['reserved_mib']:.0f}")
    return f"| {name} | {stats['min']:.3f} / {stats['median']:.3f} / {stats['max']:.3f} | {mem} | {published} |"


HEADER = "| what | s: min / median / max | peak MiB allocated / reserved | published (H100) |\n|---|---|---|---|"

