"""The HTML report (rendered in headless Chromium), readable grids, --json/--quiet, and the README's API example."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from distillery.cli import main
from distillery.report import build_report, write_report
from distillery.sets.synset import SyntheticSet

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """Run the README example as it stands, in a fresh directory; its run dir is reused by the tests below."""
    where = tmp_path_factory.mktemp("notebook")
    old = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})
    finally:
        os.chdir(old)
    return where / "runs" / "notebook"


def test_readme_example_runs_and_distill_writes_the_report(example_run):
    result = json.loads((example_run / "result.json").read_text())
    assert 0 <= result["best"]["test_mean"] <= 1
    assert (example_run / "grid.png").is_file()
    extra = json.loads((example_run / "report.json").read_text())
    for protocol in ("rat", "dsa"):  # a RaT-BPTT set is reported under both, and so is its baseline
        base = extra["random_baseline"][protocol]["ConvNetD2"]
        assert len(base["test_accs"]) == 2  # the final test evaluation's runs
    assert extra["random_baseline"]["dsa"]["ConvNetD2"]["epochs"] == 20
    assert extra["peak_rss_mb"] > 0 and extra["device"] == "cpu"
    page = (example_run / "report.html").read_text()
    assert "ratbptt/digits-ipc1" in page and "http://" not in page and "https://" not in page  # nothing to fetch


class _Dom(HTMLParser):
    """Table cells and <img> sources of a rendered page."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag in ("td", "th") and self._in is None:
            self._in = []

    def handle_data(self, data):
        if self._in is not None:
            self._in.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._in is not None:
            self.cells.append("".join(self._in).strip())
            self._in = None


def test_report_renders_in_headless_chromium(example_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`); the rendering test needs it")
    from PIL import Image

    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           "--dump-dom", (example_run / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    parsed = _Dom()
    parsed.feed(dom)
    assert "test acc (%)" in parsed.cells and "random real, same protocol (%)" in parsed.cells
    rows = [c for c in parsed.cells if re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d \(2 runs\)", c)]
    assert len(rows) >= 4  # best and last, each with its test accuracy and the baseline
    grids = [i for i in parsed.images if i.get("alt", "").endswith("set grid")]
    assert len(grids) == 2
    for img in parsed.images:
        png = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert png.width >= 100 and png.height >= 50
    curves = [i for i in parsed.images if "against iteration" in i.get("alt", "")]
    assert curves  # matplotlib is installed with the `report` extra


def test_report_without_matplotlib_still_has_table_and_grids(example_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    page = build_report(example_run)
    assert "plots need matplotlib" in page and "dataset-distillery[report]" in page
    assert page.count("set grid") == 2 and "id='final'" in page


def test_report_of_a_partial_run_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"method": "mtt", "dataset": "digits", "ipc": 1}))
    (tmp_path / "metrics.csv").write_text("it,loss,lr\n0,1.0,0.01\n1,0.9,0.011\n")
    path = write_report(tmp_path)
    page = path.read_text()
    assert "no result.json yet" in page and "no best.safetensors" in page and "loss against iteration" in page
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_show_scales_up_writes_class_names_and_per_class(tmp_path, capsys):
    from PIL import Image

    names = ["zero", "one", "two"]
    s = SyntheticSet(torch.rand(9, 1, 8, 8), torch.arange(3).repeat_interleave(3),
                     meta={"num_classes": 3, "class_names": names})
    s.save(tmp_path / "s.safetensors")
    assert main(["show", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "g.png"), "--per-class", "2"]) == 0
    img = Image.open(tmp_path / "g.png").convert("L")
    assert img.width >= 3 * 64  # 8x8 images drawn at 64 px or more
    header = [img.getpixel((x, y)) for x in range(img.width) for y in range(10)]
    assert min(header) < 128  # class names are written above the columns
    full = s.grid_image(max_per_class=3)
    assert full.height - img.height >= 64  # one more row of images with --per-class 3


def test_quiet_and_json_print_one_json_object_last(tmp_path, capsys, example_run):
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "1", "--runs", "1", "--eval-epochs", "2",
                 "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    numbers = json.loads(out[0])
    assert numbers["command"] == "baseline" and 0 <= numbers["mean"] <= 1 and numbers["runs"] == 1
    assert main(["evaluate", str(example_run / "best.safetensors"), "--protocol", "dsa", "--runs", "1",
                 "--eval-epochs", "2", "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) >= 2 and json.loads(out[-1])["command"] == "evaluate"


def test_report_baseline_is_silent_without_progress(example_run, capsys, tmp_path, monkeypatch):
    """`distill --no-progress` hands progress=False on to the report's random-real baseline (no bar on stderr)."""
    from distillery.data import load_dataset
    from distillery.evaluation.score import measure_baseline

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))  # an empty cache: the baseline is measured, not read
    write_report(example_run, baseline=measure_baseline(load_dataset("digits"), example_run, progress=False))
    assert "random real" not in capsys.readouterr().err


def test_report_baseline_is_measured_once_per_data_and_protocol(example_run, tmp_path, monkeypatch):
    """A second baseline of the same data, ipc and protocol is read from the cache, equal; a damaged cache file
    warns and is measured again; other data (another validation split) is measured again."""
    import distillery.evaluation.score as score
    from distillery.data import load_dataset

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))
    calls = []
    measure = score.evaluate_synset
    monkeypatch.setattr(score, "evaluate_synset", lambda *a, **k: calls.append(1) or measure(*a, **k))
    ds = load_dataset("digits")
    first = score.measure_baseline(ds, example_run, progress=False)
    files = sorted((tmp_path / "baselines").glob("*.json"))
    assert calls and len(files) == 2  # the rat and the dsa protocol
    calls.clear()
    assert score.measure_baseline(ds, example_run, progress=False) == first and not calls
    for bad in ('{"test_accs": [2.0, 0.5]}', "[1, 2", '{"test_accs": [0.5, 0.5], "steps": -3}'):
        files[0].write_text(bad)
        with pytest.warns(UserWarning, match="damaged"):
            assert score.measure_baseline(ds, example_run, progress=False) == first
        assert len(calls) == 2  # that protocol's two runs, measured again to the same numbers
        calls.clear()
    score.measure_baseline(load_dataset("digits", val_fraction=0.2), example_run, progress=False)
    assert len(calls) == 4 and len(list((tmp_path / "baselines").glob("*.json"))) == 4


def test_report_baseline_loads_an_image_folder_at_the_runs_resolution(tmp_path, monkeypatch):
    """`report RUN --baseline` measures the baseline on the data the run distilled: same resolution, not 32 px."""
    from PIL import Image

    import distillery.evaluation.score

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("L", (20, 20), color=40 * i).save(tmp_path / "data" / split / c / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": f"imagefolder:{tmp_path / 'data'}", "resolution": 12,
                                                 "zca": None, "val_fraction": 0.25}))
    seen = {}

    def fake_measure_baseline(dataset, run_dir, progress=True):
        seen["im_size"] = tuple(dataset.spec.im_size)
        return None

    monkeypatch.setattr(distillery.evaluation.score, "measure_baseline", fake_measure_baseline)
    assert main(["report", str(run), "--baseline", "--device", "cpu"]) in (0, None)
    assert seen["im_size"] == (12, 12)
