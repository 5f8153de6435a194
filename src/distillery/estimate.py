"""`distillery distill ... --estimate`: a pre-flight run of 3 iterations and one evaluation epoch, then a projection.

Prints seconds per iteration, peak memory and the projected wall time of the whole run: distillation (iterations x
s/iteration) plus every evaluation the loop will do (validation every `eval_every` iterations with `eval_runs`
networks, the final test evaluation with `final_eval_runs`, each `eval_epochs + 1` passes). Nothing is written to
the run directory. A CUDA out-of-memory error becomes a UserError naming the setting to lower (`oom_advice`).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import torch

from .errors import UserError
from .evaluation.dsa import train_model
from .methods import get_method


def oom_advice(config: dict[str, Any]) -> str:
    """The settings that lower this run's GPU memory, in the order to try them (the method's `oom_advice`)."""
    return get_method(config["method"]).oom_advice(config)


def out_of_memory(config: dict[str, Any], where: str) -> UserError:
    """The one-line error for a CUDA out-of-memory error during `where`."""
    return UserError(f"CUDA ran out of memory during {where}; {oom_advice(config)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> str:
    """Peak GPU memory allocated / reserved, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved (GPU)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return f"{rss:.0f} MiB peak resident (process, CPU)"


def _duration(seconds: float) -> str:
    """Seconds as 'h:mm:ss' (or 's' below a minute)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def estimate_run(method, ds, config: dict[str, Any], device: torch.device, iterations: int = 3) -> dict[str, Any]:
    """Time `iterations` outer steps and one evaluation epoch; print and return the projection of the whole run."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for it in range(iterations):
            _sync(device)
            start = time.perf_counter()
            method.step(it)
            _sync(device)
            times.append(time.perf_counter() - start)
        s = method.synset()
        model = config.get("eval_model") or s.meta.get("model") or ds.spec.default_model
        lr = s.lr if s.lr is not None else 0.01
        _sync(device)
        start = time.perf_counter()
        train_model(model, s.images.to(device), s.labels.to(device), ds.spec.channels, ds.spec.num_classes,
                    epochs=1, lr=lr, strategy=ds.spec.dsa_strategy)  # 2 passes (epochs + 1)
        _sync(device)
        epoch_s = (time.perf_counter() - start) / 2
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(config, "the estimate") from None
    per_it = statistics.median(times[1:]) if len(times) > 1 else times[0]  # the first includes warm-up
    passes = config["eval_epochs"] + 1
    evals = config["iterations"] // config["eval_every"]
    eval_s = (evals * config["eval_runs"] + config["final_eval_runs"]) * passes * epoch_s
    distill_s = config["iterations"] * per_it
    result = {"seconds_per_iteration": per_it, "first_iteration_s": times[0], "eval_epoch_s": epoch_s,
              "peak_memory": _peak_memory(device), "projected_distill_s": distill_s, "projected_eval_s": eval_s,
              "projected_total_s": distill_s + eval_s}
    print(f"estimate from {iterations} iterations on {device}: {per_it:.3f} s/iteration (first {times[0]:.3f} s), "
          f"peak memory {result['peak_memory']}")
    print(f"  distillation: {config['iterations']} iterations -> {_duration(distill_s)}")
    plain = " of the plain path; --eval-fast on is not timed here" if config.get("eval_fast") == "on" else ""
    print(f"  evaluations: {evals} x {config['eval_runs']} + final {config['final_eval_runs']} networks x {passes} "
          f"epochs at {1000 * epoch_s:.1f} ms/epoch{plain} ({model}) -> {_duration(eval_s)}")
    print(f"  projected wall time of the run: {_duration(distill_s + eval_s)} (experts: trained or cached before "
          "this estimate; nothing was written to the run directory)")
    return result
