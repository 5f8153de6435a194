"""Wall time of the README quick start (experts included, from an empty cache), beside a fixed plain-PyTorch yardstick.

A shared machine slows everything, so a bare wall time cannot be compared across days; the yardstick (a fixed
small-ConvNet SGD loop in plain PyTorch, timed in its own process right before and after each command) slows the
same way, and `ratio` = command seconds / yardstick seconds is what to compare. `--compare DIR` also times another
checkout of distillery (e.g. `git worktree add /tmp/old <rev>`) in the same rounds, alternating, so both commands
see the same load.

    python benchmarks/quickstart.py                       # this checkout, 1 round
    python benchmarks/quickstart.py --compare /tmp/old --rounds 2 --threads 1
    python benchmarks/quickstart.py --compare /tmp/d188df8 --compare-command "distill --method mtt --preset mtt/digits-ipc1"

(`--compare-command`: the quick start of an older checkout whose bare command did not yet pick the digits preset.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
QUICK_START = ["distill", "--method", "mtt", "--dataset", "digits", "--ipc", "1"]

YARDSTICK = """
import sys, time, torch
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                          torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                          torch.nn.Flatten(), torch.nn.Linear(512, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(256, 1, 8, 8, generator=g), torch.randint(10, (256,), generator=g)
t = time.perf_counter()
for _ in range(150):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
print(time.perf_counter() - t)
"""


def yardstick(threads: int) -> float:
    """Seconds of the fixed plain-PyTorch loop, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", YARDSTICK, str(threads)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def quick_start(src: Path, threads: int, command: list[str]) -> tuple[float, float | None, str]:
    """(wall seconds, best-set test accuracy %, version path) of the quick start `command` run from checkout `src`."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DISTILLERY_CACHE": f"{tmp}/cache", "PYTHONPATH": str(src / "src")}
        flags = ["--threads", str(threads)] if threads else []
        code = "import sys, distillery.cli as c; print('using', c.__file__, file=sys.stderr); c.main()"
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", code, *command, "--out", f"{tmp}/run", *flags],
                             env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if run.returncode != 0:
            sys.exit(f"quick start failed in {src}:\n{run.stderr[-3000:]}")
        used = next((line.split(" ", 1)[1] for line in run.stderr.splitlines() if line.startswith("using ")), "?")
        result = json.loads(Path(f"{tmp}/run/result.json").read_text())
        return wall, 100 * result["best"]["test_mean"], used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", type=Path, help="another distillery checkout to time in the same rounds")
    ap.add_argument("--compare-command", default=" ".join(QUICK_START),
                    help="the quick start command of the --compare checkout (default: this checkout's)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="--threads for both commands (0: PyTorch's choice)")
    args = ap.parse_args()
    checkouts = {"this checkout": (HERE, QUICK_START),
                 **({f"{args.compare}": (args.compare.resolve(), args.compare_command.split())} if args.compare else {})}
    rows: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in checkouts}
    for rnd in range(args.rounds):
        order = list(checkouts.items()) if rnd % 2 == 0 else list(checkouts.items())[::-1]
        for name, (src, command) in order:
            before = yardstick(args.threads)
            wall, acc, used = quick_start(src, args.threads, command)
            stick = (before + yardstick(args.threads)) / 2
            rows[name].append((wall, stick, acc))
            print(f"round {rnd}: {name} ({used}): {wall:.1f} s, yardstick {stick:.2f} s, "
                  f"ratio {wall / stick:.1f}, test {acc:.2f} %", flush=True)
    print(f"\n| checkout | wall s (min / median / max) | yardstick s (median) | ratio (median) | best-set test % |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        walls, sticks = [r[0] for r in rs], [r[1] for r in rs]
        ratios = [w / s for w, s in zip(walls, sticks)]
        accs = sorted({f"{r[2]:.2f}" for r in rs})
        print(f"| {name} | {min(walls):.1f} / {statistics.median(walls):.1f} / {max(walls):.1f} | "
              f"{statistics.median(sticks):.2f} | {statistics.median(ratios):.1f} | {', '.join(accs)} |")


if __name__ == "__main__":
    main()
