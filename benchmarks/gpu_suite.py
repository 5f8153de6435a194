"""One call on the GPU machine: every speed row of benchmarks/RESULTS.md, fast paths on and off, plus a short MTT run.

    python benchmarks/gpu_suite.py --data DATA_DIR            # H100/H200: at most about 8 minutes
    python benchmarks/gpu_suite.py --smoke                    # the same code at tiny sizes on the CPU (CI)

DATA_DIR holds the CIFAR-10 JPEG copy as `distillery distill --data-dir` reads it; without --data the end-to-end
row is skipped. Rows (published H100 figures beside ours): MTT unrolled IPC 1/10/50 with N 50/30/30 and IPC 10 with
N 20 and 80; TESLA and checkpointed at IPC 50 N 30; DATM (learned labels, N 80) unrolled at IPC 10 and checkpointed
at IPC 50 with k = ceil(sqrt N) and k = 1; RaT-BPTT at the README setting (IPC 10, W 60, T 200, real
batch 5000; on CUDA also from captured CUDA graphs, `--fast on`); an expert epoch (45,000 images: the published loop's port, ours, on CUDA
also from captured CUDA graphs, `experts --fast on`); a
5 x 1000-epoch evaluation of a 100-image set (published port, ours, on CUDA
also from captured CUDA graphs, `--eval-fast on`); a short-schedule
CIFAR-10 IPC 10 MTT run end to end, experts included, with its test accuracy. "fast on" = distillery's default
paths (closed-form instance norm, chunked RaT meta-loss); "fast off" = nn.GroupNorm, unchunked. "CUDA graph on/off" rows time MTT IPC 10 N 30 (default paths) with the whole iteration
captured as one CUDA graph (`--fast on`, methods/graphed.py) against the plain unroll, each also with instance
norm's double backward as one Triton kernel (`--norm-kernel triton`); --smoke skips the CUDA-only rows and says so. Each timed row: one warm-up (not for the long evaluation rows), then alternating rounds
(3 for iterations, 2 for expert epochs, 1 for evaluations), min / median / max and
peak memory (allocated / reserved). The table is printed and written to `--rows-out` for RESULTS.md. Rows are
skipped (and say so) once `--budget` seconds have passed. A row that raises is marked failed with its error and the
suite goes on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from reference_loops import alternate, published_convnet, published_evaluate, published_expert_epoch, row

from distillery.augment import Augment
from distillery.cli import main as cli_main
from distillery.evaluation.dsa import train_runs
from distillery.evaluation.training import FlatSGD, plain_step
from distillery.io import atomic_write_text
from distillery.methods.graphed import GraphedGrad
from distillery.methods.bptt import InnerOptimizer, meta_gradient
from distillery.methods.datm import softmax_pullback
from distillery.methods.graphed import GraphedRat
from distillery.methods.tesla import tesla_grad
from distillery.methods.trajectory import checkpointed_grad, make_plan, unrolled_grad, unrolled_grads
from distillery.models import FunctionalModel
from distillery.models.convnet import ConvNet
from distillery.models.instancenorm import norm_kernel, triton_missing

GRADS = {"unrolled": unrolled_grad, "checkpointed": checkpointed_grad, "tesla": tesla_grad}
PUBLISHED_MTT = {(1, 50): "0.75 s, 1.6 GB", (10, 30): "0.53 s, 8.7 GB", (50, 30): "0.98 s, 42.5 GB",
                 (10, 20): "0.33 s, 5.9 GB", (10, 80): "1.07 s, 22.7 GB"}
DSA = "color_crop_cutout_flip_scale_rotate"


def sizes(smoke: bool) -> SimpleNamespace:
    """The suite's sizes: the issue's on a GPU, tiny ones for --smoke."""
    if smoke:
        return SimpleNamespace(width=8, mtt=[("unrolled", 1, 2), ("tesla", 1, 2), ("checkpointed", 1, 2)],
                               graph=(1, 2), datm=[("unrolled", 1, 2, None), ("checkpointed", 1, 2, None),
                                                   ("checkpointed", 1, 2, 1)],
                               rat=dict(ipc=1, window=2, horizon=4, real=64), expert_n=300, eval_runs=2,
                               eval_epochs=1, eval_model="ConvNetW8", rounds=1)
    return SimpleNamespace(width=128, mtt=[("unrolled", 1, 50), ("unrolled", 10, 30), ("unrolled", 50, 30),
                                           ("unrolled", 10, 20), ("unrolled", 10, 80), ("tesla", 50, 30),
                                           ("checkpointed", 50, 30)], graph=(10, 30),
                           datm=[("unrolled", 10, 80, None), ("checkpointed", 50, 80, None),
                                 ("checkpointed", 50, 80, 1)],
                           rat=dict(ipc=10, window=60, horizon=200, real=5000), expert_n=45000,
                           eval_runs=5, eval_epochs=1000, eval_model="ConvNet", rounds=3)


def convnet(width: int, fast: bool, device: str) -> torch.nn.Module:
    """ConvNet(width) for 3x32x32: distillery's InstanceNorm (fast) or the published nn.GroupNorm."""
    if width == 128 and not fast:
        return published_convnet(3, 10, (32, 32), 0).to(device)
    model = ConvNet(3, 10, (32, 32), width=width)
    if not fast:
        for i, layer in enumerate(model.features):
            if isinstance(layer, torch.nn.GroupNorm):
                model.features[i] = torch.nn.GroupNorm(layer.num_channels, layer.num_channels)
    return model.to(device)


def mtt_iteration(mode: str, ipc: int, steps: int, width: int, fast: bool, device: str,
                  graphed: bool = False, kernel: str = "torch") -> Callable[[], object]:
    """One MTT/TESLA outer iteration on random CIFAR-sized tensors (speed does not depend on their values); with
    `graphed`, the unrolled gradient replays one captured CUDA graph (`--fast on`); `kernel`: `--norm-kernel`."""
    g = torch.Generator(device=device).manual_seed(0)
    fm = FunctionalModel(convnet(width, fast, device))
    theta0 = fm.flatten(fm.module).detach()
    target = theta0 + 0.01 * torch.randn(theta0.shape, generator=g, device=device)
    images = torch.randn(10 * ipc, 3, 32, 32, generator=g, device=device).requires_grad_(True)
    labels = torch.arange(10, device=device).repeat_interleave(ipc)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    opt = torch.optim.SGD([images, lr], lr=1e-5, momentum=0.5)
    augment = Augment()
    graph = GraphedGrad(unrolled_grads, fm, augment) if graphed else None

    def run() -> None:
        plan = make_plan(len(images), steps, None, augment, g, (32, 32), device)
        with norm_kernel(kernel):
            if graph is not None:
                res = graph(images, labels, lr, theta0, target, plan)
            else:
                res = GRADS[mode](fm, images, labels, lr, theta0, target, plan, augment)
        images.grad, lr.grad = res.grad_images, res.grad_lr
        opt.step()

    return run


def datm_iteration(mode: str, ipc: int, steps: int, every: int | None, width: int,
                   device: str) -> Callable[[], object]:
    """One DATM outer iteration (`--method datm`, learned labels) on random CIFAR-sized tensors: the student trains
    on softmax(z), and images, α and the logits z move (`every`: --grad-checkpoint-every)."""
    g = torch.Generator(device=device).manual_seed(0)
    fm = FunctionalModel(convnet(width, True, device))
    theta0 = fm.flatten(fm.module).detach()
    target = theta0 + 0.01 * torch.randn(theta0.shape, generator=g, device=device)
    images = torch.randn(10 * ipc, 3, 32, 32, generator=g, device=device).requires_grad_(True)
    logits = torch.randn(10 * ipc, 10, generator=g, device=device).requires_grad_(True)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    opt = torch.optim.SGD([images, lr, logits], lr=1e-5, momentum=0.5)
    augment = Augment()
    kwargs = {"every": every} if mode == "checkpointed" else {}

    def run() -> None:
        plan = make_plan(len(images), steps, None, augment, g, (32, 32), device)
        probs = torch.softmax(logits.detach(), 1).requires_grad_(True)
        res = GRADS[mode](fm, images, probs, lr, theta0, target, plan, augment, **kwargs)
        images.grad, lr.grad = res.grad_images, res.grad_lr
        logits.grad = softmax_pullback(logits, res.grad_labels)
        opt.step()

    return run


def rat_step(width: int, ipc: int, window: int, horizon: int, real: int, fast: bool,
             device: str, graphed: bool = False) -> Callable[[], object]:
    """One RaT-BPTT meta-gradient (window start fixed mid-way, start = (T - W) // 2) on random tensors; `graphed`:
    from captured CUDA graphs (`GraphedRat`, `--fast on`)."""
    g = torch.Generator(device=device).manual_seed(0)
    fm = FunctionalModel(convnet(width, fast, device))
    theta0 = fm.flatten(fm.module).detach()
    images = torch.randn(10 * ipc, 3, 32, 32, generator=g, device=device).requires_grad_(True)
    labels = torch.arange(10, device=device).repeat_interleave(ipc)
    real_x = torch.randn(real, 3, 32, 32, generator=g, device=device)
    real_y = torch.randint(0, 10, (real,), generator=g, device=device)
    augment = Augment.rat()
    chunk = 1000 if fast else None
    if graphed:
        opt = InnerOptimizer("adam", 1e-3)
        rat = GraphedRat(fm, opt, opt, augment, augment, chunk)
        return lambda: rat(images, labels, theta0, (horizon - window) // 2, window, real_x, real_y, g, num_classes=10)
    return lambda: meta_gradient(fm, images, labels, theta0, InnerOptimizer("adam", 1e-3), (horizon - window) // 2,
                                 window, real_x, real_y, augment, augment, g, num_classes=10, real_chunk=chunk)


def expert_epochs(n: int, width: int, device: str) -> dict[str, Callable[[], object]]:
    """One expert epoch on n random images: the published loop's port, ours, ours from captured CUDA graphs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    net = convnet(width, False, device)
    fns: dict[str, Callable[[], object]] = {"expert epoch, published loop": lambda: published_expert_epoch(net, x, y,
                                                                                                          DSA)}
    fm = FunctionalModel(convnet(width, True, device))
    flat = fm.flatten(fm.module).detach()
    eager = FlatSGD(plain_step(fm), Augment(DSA), x, y, flat.clone(), None, 0.0, 0.0)
    fns["expert epoch, ours"] = lambda: eager.epoch(torch.Generator(device=device).manual_seed(0), 256, 0.01)
    if device == "cuda":  # `experts --fast on`: the first (warm-up) call captures, later calls replay
        sgd = FlatSGD(plain_step(fm), Augment(DSA), x, y, flat.clone(), None, 0.0, 0.0, capture=True, option="--fast")
        fns["expert epoch, ours, CUDA graphs"] = lambda: sgd.epoch(torch.Generator(device=device).manual_seed(0),
                                                                   256, 0.01)
    return fns


def evaluations(runs: int, epochs: int, model: str, device: str) -> dict[str, Callable[[], object]]:
    """A runs x epochs evaluation of a 100-image set: published port, ours; on CUDA also ours from captured CUDA
    graphs (`--eval-fast on`)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, 32, 32, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(10).to(device)

    def ours(fast: bool) -> Callable[[], object]:
        return lambda: train_runs(model, x, y, 3, 10, epochs, 0.01, 256, DSA, list(range(runs)), None, fast)

    label = f"evaluation {runs} x {epochs} ep"
    fns = {f"{label}, published loop":
           lambda: [published_evaluate(x, y, 3, 10, epochs, DSA, seed=s, model=model) for s in range(runs)],
           f"{label}, ours": ours(False)}
    if device == "cuda":
        fns[f"{label}, ours, CUDA graphs"] = ours(True)
    return fns


def end_to_end(data: str | None, smoke: bool, device: str) -> tuple[str, float, str]:
    """A short MTT run through the CLI, experts included: (what, wall seconds, test accuracy text)."""
    if smoke:
        flags = ["--preset", "mtt/digits-ipc1", "--num-experts", "1", "--expert-epochs-train", "3",
                 "--max-start-epoch", "1", "--syn-steps", "2", "--iterations", "2", "--eval-every", "2",
                 "--eval-runs", "1", "--final-eval-runs", "1", "--eval-epochs", "2", "--threads", "1"]
        what = "end to end, digits IPC 1 (smoke sizes)"
    else:
        flags = ["--preset", "mtt/cifar10-ipc10", "--data-dir", data, "--num-experts", "5", "--expert-epochs-train",
                 "10", "--max-start-epoch", "8", "--iterations", "200", "--eval-every", "200", "--eval-runs", "1",
                 "--final-eval-runs", "3", "--eval-epochs", "300"]
        what = "end to end, CIFAR-10 IPC 10 MTT (5 experts x 10 ep, 200 it., 3 x 300-ep eval)"
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.environ.get("DISTILLERY_CACHE")
        os.environ["DISTILLERY_CACHE"] = f"{tmp}/cache"  # fresh experts: they are part of the timed run
        start = time.perf_counter()
        try:
            code = cli_main(["distill", "--method", "mtt", "--out", f"{tmp}/run", "--device", device, "--no-progress",
                             *flags])
        finally:
            if cache is None:
                del os.environ["DISTILLERY_CACHE"]
            else:
                os.environ["DISTILLERY_CACHE"] = cache
        wall = time.perf_counter() - start
        if code != 0:
            return what, wall, f"failed with exit code {code} (see the error above)"
        best = json.loads(Path(f"{tmp}/run/result.json").read_text())["best"]
        return what, wall, f"{100 * best['test_mean']:.2f} ± {100 * best['test_std']:.2f} % test (best on val)"


def main() -> None:
    """Run every row within the budget, print one table, write the rows file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="data dir with the CIFAR-10 JPEG copy (end-to-end row)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the suite runs")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which rows are skipped")
    parser.add_argument("--rows-out", default="benchmarks/gpu_suite_rows.md", help="where to write the table")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        torch.set_num_threads(1)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    s = sizes(args.smoke)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"Device {name}, torch {torch.__version__}, {date.today()}, command `python benchmarks/gpu_suite.py "
             f"{' '.join(sys.argv[1:])}`, commit: see git log of this date.", "",
             "| what | s: min / median / max | peak MiB allocated / reserved | published (H100) |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)

    failed: dict[str, str] = {}  # label -> the error of a row that raised

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    def timed(fns: dict[str, Callable[[], object]], published: dict[str, str], rounds: int,
              warmup: bool = True) -> None:
        if time.perf_counter() - t0 > args.budget:
            for label in fns:
                emit(f"| {label} | skipped: budget of {args.budget:.0f} s used | | |")
            return

        def guarded(label: str, fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:  # one broken path must not cost the rest of the table (and the GPU minutes)
                if label not in failed:
                    try:
                        fn()
                    except Exception as err:  # noqa: BLE001 - recorded in the table; the exit code is 1
                        failed[label] = f"{type(err).__name__}: {err}".splitlines()[0][:160].replace("|", "/")
            return run

        stats = alternate({label: guarded(label, fn) for label, fn in fns.items()}, rounds, device, warmup)
        for label, st in stats.items():
            emit(f"| {label} | failed: {failed[label]} | | |" if label in failed
                 else row(label, st, published.get(label, "—")))

    for mode, ipc, steps in s.mtt:
        fns = {f"{mode} IPC {ipc} N {steps}, fast {f}": mtt_iteration(mode, ipc, steps, s.width, f == "on", device)
               for f in ("off", "on")}
        pub = PUBLISHED_MTT.get((ipc, steps), "—") if mode == "unrolled" else "—"
        timed(fns, {label: pub for label in fns if label.endswith("off")}, s.rounds)
    for mode, ipc, steps, every in s.datm:
        label = f"DATM {mode}{'' if every is None else f' every {every}'} IPC {ipc} N {steps}, learned labels"
        timed({label: datm_iteration(mode, ipc, steps, every, s.width, device)}, {}, 1)  # seconds each: 1 round
    ipc, steps = s.graph  # the first call captures: the warm-up round keeps capture out of the timings
    kernels = ("torch", "triton") if device == "cuda" and triton_missing() is None else ("torch",)
    graph_rows = {f"unrolled IPC {ipc} N {steps}, CUDA graph {f}" + (", norm kernel triton" if k == "triton" else ""):
                  (f == "on", k) for f in ("off", "on") for k in kernels if f == "off" or device == "cuda"}
    timed({label: mtt_iteration("unrolled", ipc, steps, s.width, True, device, graphed, kernel)
           for label, (graphed, kernel) in graph_rows.items()},
          {label: PUBLISHED_MTT.get((ipc, steps), "—") for label in graph_rows if label.endswith("off")}, s.rounds)
    if device != "cuda":
        emit(f"| unrolled IPC {ipc} N {steps}, CUDA graph on | not run: capture needs CUDA (device {device}) | | |")
    if len(kernels) == 1:
        why = triton_missing() if device == "cuda" else f"the kernel needs CUDA (device {device})"
        emit(f"| unrolled IPC {ipc} N {steps}, norm kernel triton | not run: {why} | | |")
    r = s.rat
    rat = f"RaT-BPTT IPC {r['ipc']} W {r['window']} T {r['horizon']} real {r['real']}"
    rat_rows = {f"{rat}, fast {f}": (f == "on", False) for f in ("off", "on")}
    if device == "cuda":
        rat_rows[f"{rat}, CUDA graphs (--fast on)"] = (True, True)
    timed({label: rat_step(s.width, r["ipc"], r["window"], r["horizon"], r["real"], fast, device, graphed)
           for label, (fast, graphed) in rat_rows.items()}, {}, s.rounds)
    if device != "cuda":
        emit(f"| {rat}, CUDA graphs (--fast on) | not run: capture needs CUDA (device {device}) | | |")
    timed(expert_epochs(s.expert_n, s.width, device), {"expert epoch, published loop": "2.6 s"},
          max(1, s.rounds - 1))
    if device != "cuda":
        emit(f"| expert epoch, ours, CUDA graphs | not run: capture needs CUDA (device {device}) | | |")
    timed(evaluations(s.eval_runs, s.eval_epochs, s.eval_model, device), {}, 1, warmup=False)  # long: no warm-up
    if device != "cuda":
        emit(f"| evaluation, CUDA graphs (--eval-fast on) | not run: capture needs CUDA (device {device}) | | |")
    if args.data is None and not args.smoke:
        emit("| end to end, CIFAR-10 IPC 10 MTT | skipped: no --data | | 65.3 ± 0.7 % (full schedule) |")
    elif time.perf_counter() - t0 > args.budget:
        emit(f"| end to end | skipped: budget of {args.budget:.0f} s used | | |")
    else:
        what, wall, acc = end_to_end(args.data, args.smoke, device)
        emit(f"| {what} | {wall:.1f} (one run) | {acc} | 65.3 ± 0.7 % (full schedule) |")
    emit("")
    emit(f"Suite wall time {time.perf_counter() - t0:.1f} s.")
    atomic_write_text(Path(args.rows_out), "\n".join(lines) + "\n")
    print(f"rows written to {args.rows_out}")
    if failed:
        sys.exit(f"{len(failed)} row(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
