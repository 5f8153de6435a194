"""The command line as a user meets it: results on stdout, one clear error line on bad input."""

import pytest

from distillery.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_baseline_random_digits(capsys):
    code, out, err = run(capsys, "baseline", "random", "--dataset", "digits", "--ipc", "2", "--runs", "2",
                         "--eval-epochs", "20", "--no-progress")
    assert code == 0, err
    assert "test accuracy" in out and "±" in out and "2 runs" in out


def test_presets_lists_published_rows(capsys):
    code, out, _ = run(capsys, "presets", "--method", "mtt")
    assert code == 0 and "mtt/cifar10-ipc10" in out and "tesla/" not in out


@pytest.mark.parametrize("argv,needle", [
    (["baseline", "random", "--dataset", "mnist", "--data-dir", "/nonexistent/dir", "--ipc", "1"], "mnist"),
    (["baseline", "random", "--dataset", "nosuchset", "--ipc", "1"], "unknown dataset"),
    (["baseline", "random", "--dataset", "digits", "--ipc", "500", "--runs", "1"], "images"),
    (["baseline", "random", "--dataset", "digits", "--ipc", "1", "--model", "NoSuchNet"], "unknown model"),
    (["evaluate", "/nonexistent/set.safetensors"], "does not exist"),
    (["distill", "--method", "mtt", "--out", "/tmp/x", "--preset", "mtt/nope"], "unknown preset"),
    (["distill", "--method", "mtt", "--out", "/tmp/x"], "no dataset"),
])
def test_bad_input_is_one_clear_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv, "--no-progress")
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0].lower(), err
    assert "Traceback" not in err


def test_corrupt_set_and_unknown_imagefolder(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage, not a set")
    code, _, err = run(capsys, "evaluate", str(bad), "--no-progress")
    assert code == 2 and "not a distillery set" in err
    empty = tmp_path / "imgs"
    empty.mkdir()
    code, _, err = run(capsys, "baseline", "random", "--dataset", f"imagefolder:{empty}", "--ipc", "1",
                       "--no-progress")
    assert code == 2 and err.startswith("error: ") and "train" in err


@pytest.mark.parametrize("method,extra", [
    ("tesla", ["--num-experts", "1", "--expert-epochs-train", "3", "--max-start-epoch", "2", "--syn-steps", "3",
               "--labels", "expert"]),
    ("ratbptt", ["--horizon", "6", "--window", "2", "--real-batch", "64", "--learn-labels", "true",
                 "--boost-blocks", "1,1", "--boost-every", "2", "--rat-eval-steps", "2,4"]),
])
def test_distill_wiring_end_to_end(capsys, tmp_path, monkeypatch, method, extra):
    """Every method runs through the CLI, writes a loadable set, and `evaluate --ipc` reads a prefix."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "distill", "--method", method, "--dataset", "digits", "--ipc", "2",
                            "--out", str(out), "--iterations", "4", "--eval-every", "2", "--eval-runs", "1",
                            "--eval-epochs", "2", "--final-eval-runs", "1", *extra, "--no-progress")
    assert code == 0, err
    from distillery.sets.synset import SyntheticSet

    assert SyntheticSet.load(out / "best.safetensors").meta["method"] == method
    s = SyntheticSet.load(out / "last.safetensors")  # boosted: the best-on-val set may be an earlier, smaller stage
    assert s.ipc == 2 and s.meta["method"] == method and s.label_kind in ("soft", "learned")
    if method == "ratbptt":
        assert (s.labels >= 0).all()
    code, stdout, err = run(capsys, "evaluate", str(out / "last.safetensors"), "--ipc", "1", "--runs", "1",
                            "--no-progress")  # the set's own protocol: 2 epochs (tesla), 2/4 steps (ratbptt)
    assert code == 0 and "1 images per class" in stdout, err


def test_python_dash_m_distillery_runs_the_cli():
    """`python -m distillery` is the `distillery` command: --help exits 0 and lists the commands."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "distillery", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: distillery") and "distill" in out.stdout and "datasets" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "distillery", "baseline", "random", "--dataset", "digits", "--ipc",
                          "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --ipc 0 is out of range"), bad.stderr


def test_output_into_a_closed_pipe_ends_quietly():
    """`distillery presets | head`: a reader that has gone ends the command without a traceback."""
    import os
    import subprocess
    import sys
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    proc = subprocess.run([sys.executable, "-m", "distillery", "presets"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_distill_help_says_which_methods_an_option_is_for():
    """An option of one method is prefixed by it; one declared by several with different texts shows each text."""
    from distillery.cli import build_parser

    distill = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "distill")[1]
    helps = {a.option_strings[0]: a.help for a in distill._actions if a.option_strings}
    assert helps["--real-chunk"].startswith("ratbptt: ")
    users = helps["--syn-steps"].split(": ")[0].split(", ")  # every method declaring it, MTT's subclasses too
    assert {"mtt", "tesla"} <= set(users) and "ratbptt" not in users
    fast = {text.split(": ", 1)[0]: text.split(": ", 1)[1] for text in helps["--fast"].split(" | ")}
    assert next(text for names, text in fast.items() if "mtt" in names).startswith("on: replay captured CUDA graphs")
    assert " | ratbptt: on: " in helps["--fast"]


def test_rat_header_says_how_the_step_count_was_chosen(capsys, tmp_path):
    """With --val-fraction 0 there is no validation split: the header says the longest count was taken."""
    import torch

    from distillery.data import load_dataset
    from distillery.sets.synset import SyntheticSet

    x, y = load_dataset("digits").random_set(1, torch.Generator().manual_seed(0))
    meta = {"method": "ratbptt", "dataset": "digits", "num_classes": 10, "model": "ConvNetD1", "protocol": "rat",
            "rat_eval": {"inner_opt": "adam", "inner_lr": 1e-2, "strategy": "none", "task_sampler_nc": None,
                         "batch_per_class": None, "steps": [1, 2]}}
    SyntheticSet(x, y, "hard", None, {}, meta).save(tmp_path / "s.safetensors")
    for fraction, said in (("0", "no validation split: the longest step count"),
                           ("0.1", "step count chosen on validation")):
        code, out, err = run(capsys, "evaluate", str(tmp_path / "s.safetensors"), "--val-fraction", fraction,
                             "--runs", "1", "--threads", "1", "--no-progress")
        assert code == 0 and said in out, (out, err)
