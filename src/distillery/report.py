"""`distillery report RUN_DIR`: one self-contained HTML page (images inlined, no network) of a distillation run.

It shows what the run directory holds and skips what it lacks: the resolved config with the preset it came from
and the command line (config.json), the curves of every logged scalar against iteration (metrics.csv, plotted
with matplotlib when the `report` extra is installed), the grids of the best and the last set with class names
(best/last.safetensors), the final table of test accuracy per model with the random-real baseline under the same
protocol and the gain over it (result.json, report.json), and wall time, device, peak memory and versions.

This module only renders. `distill` measures the random-real baseline at the end of every run
(`evaluation.score.measure_baseline`: the protocols the best set records, with their model, epochs, runs and seed)
and calls `write_report(run_dir, baseline=..., device=device, from_run=True)`, which stores it and the peak memory in
RUN_DIR/report.json, then writes RUN_DIR/report.html; `distillery report --baseline` does the same for a run dir.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import atomic_write_text
from .run.files import read_config, read_json_file, read_metrics, read_result

REPORT_JSON = "report.json"
_HIDDEN_CONFIG = ("environment", "history")
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1400px;color:#222;
padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:8px}.grid{overflow-x:auto}.grid img{image-rendering:pixelated}
.note{color:#666}pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:0.85em}
code{background:#f3f3f3;padding:1px 4px}
"""


# --- reading the run directory ------------------------------------------------------------------------------------
def _read_metrics(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """metrics.csv (checked by `run.files.read_metrics`) as {column: [(iteration, value), ...]} for every column
    other than `it`; {} when there is none yet."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in read_metrics(run_dir) or []:
        for key, value in row.items():
            if key != "it":
                series.setdefault(key, []).append((row["it"], value))
    return series


# --- the pieces of the page ---------------------------------------------------------------------------------------
def _png_data_uri(image) -> str:
    """A PIL image or a matplotlib figure as an inline PNG data: URI."""
    buf = io.BytesIO()
    (image.savefig if hasattr(image, "savefig") else image.save)(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(series: dict[str, list[tuple[float, float]]]) -> str:
    """One small matplotlib PNG per logged scalar (val_acc with its std band); a note without matplotlib."""
    if not series:
        return "<p class='note'>no metrics.csv rows yet.</p>"
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return ("<p class='note'>plots need matplotlib: <code>pip install 'dataset-distillery[report]'</code>; "
                "the numbers are in metrics.csv.</p>")
    order = ["val_acc", "loss"] + sorted(k for k in series if k not in ("val_acc", "loss", "val_std"))
    out = []
    for key in [k for k in order if k in series]:
        its, values = zip(*series[key])
        fig, ax = plt.subplots(figsize=(4.8, 3.0), dpi=110)
        if key == "val_acc":
            pct = [100 * v for v in values]
            ax.plot(its, pct, "o-", color="C2", label="validation accuracy")
            std = dict(series.get("val_std", []))
            if std:
                lo = [100 * (v - std.get(i, 0.0)) for i, v in zip(its, values)]
                hi = [100 * (v + std.get(i, 0.0)) for i, v in zip(its, values)]
                ax.fill_between(its, lo, hi, color="C2", alpha=0.2, label="± std over networks")
            ax.set_ylabel("validation accuracy (%)")
            ax.legend(fontsize=8)
        else:
            ax.plot(its, values, "-", color="C0" if key == "loss" else "C1", linewidth=1.2)
            ax.set_ylabel(key)
            positive = all(v > 0 for v in values)
            if positive and max(values) / min(values) > 100:
                ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        uri = _png_data_uri(fig)
        plt.close(fig)
        out.append(f"<img alt='{html.escape(key)} against iteration' src='{uri}'>")
    return "<div class='plots'>" + "".join(out) + "</div>"


def _grid(run_dir: Path, name: str) -> str:
    """The grid of RUN_DIR/{name}.safetensors (class names on top, small images scaled up), inlined."""
    from .sets.synset import SyntheticSet

    path = run_dir / f"{name}.safetensors"
    if not path.is_file():
        return f"<p class='note'>no {name}.safetensors in the run directory.</p>"
    try:
        s = SyntheticSet.load(path)
        image = s.grid_image(max_per_class=10)
    except (UserError, ValueError, KeyError) as err:
        return f"<p class='note'>cannot show {name}.safetensors: {html.escape(str(err))}</p>"
    it = s.meta.get("iteration")
    val = s.meta.get("val_acc")
    caption = f"{name} set: iteration {it}" + (f", validation accuracy {100 * val:.2f} %" if val is not None else "")
    shown = "" if s.ipc <= 10 else f" (first 10 of {s.ipc} images per class)"
    return (f"<h3>{html.escape(caption)}{shown}</h3><div class='grid'><img alt='{name} set grid' "
            f"width='{image.width}' height='{image.height}' src='{_png_data_uri(image)}'></div>")


def _pct(mean: Any, std: Any = None, n: int | None = None) -> str:
    """`93.52 ± 0.62 (5 runs)` from fractions; '' for missing values."""
    if not isinstance(mean, (int, float)) or not math.isfinite(mean):
        return ""
    text = f"{100 * mean:.2f}"
    if isinstance(std, (int, float)):
        text += f" ± {100 * std:.2f}"
    return text + (f" ({n} runs)" if n else "")


def _rows(entry: dict[str, Any], default_model: str) -> list[dict[str, Any]]:
    """The test results of one set: one per protocol (`by_protocol`) or the entry itself, then its per-model table."""
    listed = [r for r in entry.get("by_protocol") or [] if isinstance(r, dict) and "test_mean" in r]
    rows = listed or ([entry] if "test_mean" in entry else [])
    rows = [{**r, "model": str(r.get("model") or default_model), "protocol": str(r.get("protocol") or "dsa")}
            for r in rows]
    own = rows[0]["protocol"] if rows else str(entry.get("protocol") or "dsa")
    table = entry.get("models")  # the cross-architecture table: {"AlexNet": {"test_mean": ...}, ...}
    for model, v in table.items() if isinstance(table, dict) else ():
        if not isinstance(v, dict) or "test_mean" not in v:
            continue
        protocol = str(v.get("protocol") or own)
        if not any(r["model"] == model and r["protocol"] == protocol for r in rows):
            rows.append({"model": str(model), "protocol": protocol, "test_mean": v.get("test_mean"),
                         "test_std": v.get("test_std"), "test_accs": v.get("test_accs")})
    return rows


def _table(result: dict[str, Any], extra: dict[str, Any], config: dict[str, Any]) -> str:
    """The final table: best and last set, test mean ± std per model and protocol, the random-real baseline under
    the same model and protocol, and the gain over it."""
    if not any(isinstance(result.get(k), dict) for k in ("best", "last")):
        return "<p class='note'>no result.json yet: the run has not finished its final test evaluation.</p>"
    default_model = str(config.get("eval_model") or config.get("model") or "default model")
    base = extra.get("random_baseline") if isinstance(extra.get("random_baseline"), dict) else {}
    rows = []
    for name in ("best", "last"):
        entry = result.get(name)
        if not isinstance(entry, dict):
            continue
        for r in _rows(entry, default_model):
            b = (base.get(r["protocol"]) or {}).get(r["model"]) or {}
            gain = ""
            if isinstance(r.get("test_mean"), (int, float)) and isinstance(b.get("test_mean"), (int, float)):
                gain = f"{100 * (r['test_mean'] - b['test_mean']):+.2f}"
            accs, val = r.get("test_accs"), entry.get("val_acc")
            how = r["protocol"] + (f", {r['steps']} steps" if r.get("steps") else "") + (
                f", {r['epochs']} epochs" if r.get("epochs") else "") + (
                f", lr {r['lr']:.4g}" if isinstance(r.get("lr"), (int, float)) else "")
            rows.append("<tr>" + "".join([
                f"<td>{name}</td>", f"<td class='num'>{html.escape(str(entry.get('iteration', '')))}</td>",
                f"<td class='num'>{_pct(val)}</td>",
                f"<td>{html.escape(r['model'])}</td>", f"<td>{html.escape(how)}</td>",
                f"<td class='num'>{_pct(r.get('test_mean'), r.get('test_std'), len(accs) if accs else None)}</td>",
                f"<td class='num'>{_pct(b.get('test_mean'), b.get('test_std'), len(b.get('test_accs') or []))}</td>",
                f"<td class='num'>{gain}</td>"]) + "</tr>")
    note = "" if base else ("<p class='note'>random-real baseline not measured for this run "
                            "(<code>distillery report RUN_DIR --baseline</code> measures it).</p>")
    return ("<table id='final'><tr><th>set</th><th>iteration</th><th>val acc (%)</th><th>model</th>"
            "<th>protocol</th><th>test acc (%)</th><th>random real, same protocol (%)</th><th>gain (points)</th>"
            "</tr>" + "".join(rows) + "</table>" + note)


def _kv_table(items: list[tuple[str, Any]]) -> str:
    """A two-column table of name/value pairs (values other than strings as JSON)."""
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(v if isinstance(v, str) else json.dumps(v))}"
                    "</td></tr>" for k, v in items)
    return f"<table>{cells}</table>"


def _run_info(config: dict[str, Any], result: dict[str, Any], extra: dict[str, Any]) -> list[tuple[str, Any]]:
    """Wall time, device, peak memory, versions, threads and command line, from whichever file has them."""
    env = {**(config.get("environment") or {}), **(result.get("environment") or {})}
    items: list[tuple[str, Any]] = []
    if isinstance(result.get("seconds"), (int, float)):
        items.append(("wall time (distillation loop + final evaluation)", f"{result['seconds']:.1f} s"))
    for key, label in (("seconds_experts", "wall time, experts (trained or checked) and method setup"),
                       ("seconds_baseline", "wall time, random-real baseline and report"),
                       ("seconds_total", "wall time, the whole command")):
        if isinstance(result.get(key), (int, float)):
            items.append((label, f"{result[key]:.1f} s"))
    device = extra.get("device") or result.get("device") or config.get("device")
    if device:
        items.append(("device", device))
    for key, label in (("peak_rss_mb", "peak memory, process RSS"), ("peak_cuda_mb", "peak CUDA memory allocated")):
        if isinstance(extra.get(key), (int, float)):
            items.append((label, f"{extra[key]:.0f} MiB"))
    for key in ("library_version", "torch_version", "threads", "data"):
        if key in env:
            items.append((key.replace("_", " "), env[key]))
    if env.get("command"):
        cmd = env["command"]
        items.append(("command line", shlex.join(cmd) if isinstance(cmd, list) else str(cmd)))
    return items


def build_report(run_dir: str | Path) -> str:
    """The HTML text of the report of RUN_DIR."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the --out of a `distillery distill` run")
    config = read_config(run_dir) or {}
    result = read_result(run_dir) or {}
    extra = read_json_file(run_dir, REPORT_JSON) or {}
    if not config and not result and not (run_dir / "metrics.csv").exists():
        raise UserError(f"{run_dir} holds no config.json, metrics.csv or result.json; pass a run directory")
    title = f"distillery run {run_dir.name}"
    what = ", ".join(str(config[k]) for k in ("method", "dataset") if config.get(k))
    if config.get("ipc"):
        what += f", {config['ipc']} images per class"
    source = config.get("defaults_from")
    history = config.get("history") or []
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(what)}" + (f"; defaults from {html.escape(str(source))}" if source else "") + "</p>",
             "<h2>Result</h2>", _table(result, extra, config),
             "<h2>Curves</h2>", _plots(_read_metrics(run_dir)),
             "<h2>Distilled sets</h2>", _grid(run_dir, "best"), _grid(run_dir, "last"),
             "<h2>Run</h2>", _kv_table(_run_info(config, result, extra))]
    if history:
        parts.append("<h3>History</h3>" + _kv_table([(h.get("time", ""), h.get("event", "")) for h in history
                                                      if isinstance(h, dict)]))
    parts += ["<h2>Configuration</h2>",
              _kv_table([(k, v) for k, v in sorted(config.items()) if k not in _HIDDEN_CONFIG])]
    if result:
        parts.append("<details><summary>everything result.json holds</summary><pre>"
                     + html.escape(json.dumps(result, indent=1)) + "</pre></details>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


# --- what distill adds before writing the page --------------------------------------------------------------------
def peak_memory(device: Any = None) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, the peak memory torch allocated."""
    out: dict[str, float] = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    except ImportError:  # not POSIX
        pass
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def write_report(run_dir: str | Path, out: str | Path | None = None, baseline: dict[str, Any] | None = None,
                 device: Any = None, from_run: bool = False) -> Path:
    """Write RUN_DIR/report.html (or `out`); it only renders. `baseline`: a random-real baseline measured by the
    caller (`evaluation.score.measure_baseline`), stored in report.json first.

    `from_run`: called by the process that ran the distillation, so its peak memory and device are the run's.
    """
    run_dir = Path(run_dir)
    if baseline is not None or from_run:
        extra = read_json_file(run_dir, REPORT_JSON) or {}
        if baseline is not None:
            extra["random_baseline"] = baseline
        if from_run:
            extra.update(peak_memory(device))
            if device is not None:
                extra["device"] = str(device)
        atomic_write_text(run_dir / REPORT_JSON, json.dumps(extra, indent=1))
    path = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(path, build_report(run_dir))
    return path
