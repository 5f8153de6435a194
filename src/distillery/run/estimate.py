"""`distillery distill ... --estimate`: a pre-flight run of 3 iterations and one evaluation epoch, then a projection.

Prints seconds per iteration, peak memory and the projected wall time of the whole run: data and ZCA loading (as
measured), distillation (iterations x s/iteration) and every network the loop and the report train
(`evaluation_count`: validation from iteration 0 to the end, best and last, the random-real baseline), each for
the method's number of epochs (`eval_cost`) plus its test pass. Nothing is written to the run directory, and no
expert is trained. Before a CPU run starts, `check_host_memory` projects the memory of one step (the method's
`host_memory`: autograd's saved tensors measured at tiny sizes and extrapolated) and refuses a run that would not fit
in the memory available; an out-of-memory error (CUDA or host) becomes a UserError naming the setting to lower
(`oom_explained`).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..errors import UserError
from ..evaluation.dsa import train_model
from ..experts import duration
from ..methods import get_method

GB = 1e9


def available_host_bytes() -> float | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(config: dict[str, Any], spec, available: float | None = None) -> dict[str, float]:
    """Refuse (one-line UserError naming the setting to lower) a CPU run whose step would need more memory than the
    machine has available now, before it starts; return the projection (bytes by term) otherwise."""
    terms = get_method(config["method"]).host_memory(config, spec)
    available = available_host_bytes() if available is None else available
    total = sum(terms.values())
    if terms and available is not None and total > 0.9 * available:
        top = max(terms, key=terms.get)
        raise UserError(f"one step of this run needs about {total / GB:.1f} GB of host memory beyond the data, "
                        f"{terms[top] / GB:.1f} GB of it the {top}, but {available / GB:.1f} GB is available; "
                        f"{oom_advice(config)}")
    return terms


def oom_advice(config: dict[str, Any]) -> str:
    """The settings that lower this run's GPU memory, in the order to try them (the method's `oom_advice`)."""
    return get_method(config["method"]).oom_advice(config)


@contextmanager
def oom_explained(config: dict[str, Any], where: str) -> Iterator[None]:
    """Turn running out of memory (CUDA, or the CPU allocator: MemoryError or torch's "can't allocate memory")
    during `where` into the one-line UserError naming the settings to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA ran out of memory during {where}; {oom_advice(config)}") from None
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "can't allocate memory" not in str(err):
            raise
        raise UserError(f"host memory ran out of memory during {where}; {oom_advice(config)}") from None


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()` and its wall time in seconds, with CUDA's queued work finished before the clock starts and stops."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _peak_memory(device: torch.device) -> str:
    """Peak GPU memory allocated / reserved, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved (GPU)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return f"{rss:.0f} MiB peak resident (process, CPU)"


def evaluation_count(config: dict[str, Any]) -> tuple[int, int, int]:
    """(validation evaluations, final test networks, baseline networks) the loop and the report will train: the
    validation at iteration 0, every `eval_every` and at the end; best and last (last is skipped when it is the
    best) and the random-real baseline, each `final_eval_runs` networks under every protocol of the final report
    (the method's `eval_cost`)."""
    iterations, every = config["iterations"], config["eval_every"]
    evals = len(range(0, iterations, every)) + 1
    protocols = get_method(config["method"]).eval_cost(config)[0]
    sets = 2 if config.get("val_fraction", 0.1) > 0 else 1
    return evals, sets * protocols * config["final_eval_runs"], protocols * config["final_eval_runs"]


def estimate_run(method, ds, config: dict[str, Any], device: torch.device, iterations: int = 3,
                 setup_s: float = 0.0, memory: dict[str, float] | None = None) -> dict[str, Any]:
    """Time `iterations` outer steps, one evaluation epoch and the test pass of one network; print and return the
    projection of the whole run. `setup_s`: the data and ZCA loading already done; `memory`: `check_host_memory`'s
    projection, printed."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with oom_explained(config, "the estimate"):
        times = [_timed(device, lambda: method.step(it))[1] for it in range(iterations)]
        s = method.synset()
        model = config.get("eval_model") or s.meta.get("model") or ds.spec.default_model
        lr = s.lr if s.lr is not None else 0.01
        net, seconds = _timed(device, lambda: train_model(model, s.images.to(device), s.labels.to(device),
                                                          ds.spec.channels, ds.spec.num_classes, epochs=1, lr=lr,
                                                          strategy=ds.spec.dsa_strategy))
        epoch_s = seconds / 2  # 2 passes (epochs + 1)
        probe = ds.test.x[:1000].to(device)

        def predict() -> None:
            with torch.no_grad():
                net.eval()
                for i in range(0, len(probe), 256):
                    net(probe[i:i + 256])

        image_s = _timed(device, predict)[1] / max(len(probe), 1)
    per_it = statistics.median(times[1:]) if len(times) > 1 else times[0]  # the first includes warm-up
    passes = get_method(config["method"]).eval_cost(config)[1]
    evals, finals, baseline = evaluation_count(config)
    val_net = passes * epoch_s + len(ds.val.y) * image_s
    test_net = passes * epoch_s + len(ds.test.y) * image_s
    eval_s = evals * config["eval_runs"] * val_net + (finals + baseline) * test_net
    distill_s = config["iterations"] * per_it
    total = setup_s + distill_s + eval_s
    result = {"seconds_per_iteration": per_it, "first_iteration_s": times[0], "eval_epoch_s": epoch_s,
              "peak_memory": _peak_memory(device), "projected_distill_s": distill_s, "projected_eval_s": eval_s,
              "setup_s": setup_s, "projected_total_s": total,
              **({"projected_step_memory_bytes": sum(memory.values())} if memory else {})}
    print(f"estimate from {iterations} iterations on {device}: {per_it:.3f} s/iteration (first {times[0]:.3f} s), "
          f"peak memory {result['peak_memory']}")
    if memory:
        print("  host memory of one step beyond the data (projected): " + ", ".join(
            f"{k} {v / GB:.2f} GB" for k, v in sorted(memory.items(), key=lambda kv: -kv[1])))
    print(f"  data and ZCA loading: {duration(setup_s)}")
    print(f"  distillation: {config['iterations']} iterations -> {duration(distill_s)}")
    plain = " of the plain path; --eval-fast on is not timed here" if config.get("eval_fast") == "on" else ""
    print(f"  evaluations: {evals} x {config['eval_runs']} validation networks (iteration 0 to the end) + "
          f"{finals} final (best and last) + {baseline} baseline test networks x {passes} epochs at "
          f"{1000 * epoch_s:.1f} ms/epoch{plain} ({model}) plus their test passes -> {duration(eval_s)}")
    print(f"  projected wall time of the run: {duration(total)} (experts: cached or given before this estimate; "
          "nothing was written to the run directory)")
    return result
