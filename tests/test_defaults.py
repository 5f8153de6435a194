"""Defaults without a preset: preset lookup, the data-derived rule (docs/DEFAULTS.md), and the run-health check."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from distillery.cli import build_parser, main
from distillery.config.defaults import MAX_RESOLUTION, DataFacts, data_facts
from distillery.distill import config_classes, given_from_args, resolve_config
from distillery.run.health import STOP_AFTER, VAL_STOP, WARN_AFTER, HealthMonitor, Stalled
from distillery.methods import get_method, list_methods
from distillery.config.presets import get_preset, preset_for
from distillery.config.validate import check_config


def write_folder(root, size, classes=3, per_class=6, mode="L"):
    """A tiny image folder: train/<class>/*.png and test/<class>/*.png of random pixels."""
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    return f"imagefolder:{root}"


def resolve(*argv):
    args = build_parser().parse_args(["distill", "--out", "R", *argv])
    return resolve_config(args.method, given_from_args(args), args.preset)


def test_bare_command_uses_the_matching_preset():
    assert preset_for("mtt", "digits", 1) == "mtt/digits-ipc1"
    assert preset_for("ratbptt", "digits", 2) is None
    config = resolve("--method", "mtt", "--dataset", "DIGITS", "--ipc", "1")
    assert config["defaults_from"] == "preset mtt/digits-ipc1"
    assert config["lr_lr"] == get_preset("mtt/digits-ipc1")["lr_lr"]
    flagged = resolve("--method", "tesla", "--dataset", "digits", "--ipc", "1", "--lr-img", "50")
    assert flagged["defaults_from"] == "preset tesla/digits-ipc1" and flagged["lr_img"] == 50


@pytest.mark.parametrize("method", ["mtt", "ratbptt"])
def test_rule_on_digits_reproduces_the_validation_tuned_preset(method):
    """The small-data branch of the rule is the digits preset (chosen on validation), derived from the facts."""
    derived = get_method(method).derive_defaults(data_facts("digits"), 1)
    preset = get_preset(f"{method}/digits-ipc1")
    # iterations: the MTT preset stops at 100, where its val peaked; the rule keeps 200 for data it has not seen
    # (the digits-as-16x16-PNG run of the README was still best at its last iteration, 200)
    keys = [k for k in derived if k in preset and k not in ("model", "iterations")]
    assert len(keys) >= 8
    assert {k: derived[k] for k in keys} == {k: preset[k] for k in keys}


def test_non_preset_ipc_is_derived_and_checked():
    config = resolve("--method", "ratbptt", "--dataset", "digits", "--ipc", "2")
    assert config["defaults_from"].startswith("derived")
    assert config["horizon"] == 40 and config["real_batch"] == 256 and config["ipc"] == 2


def test_image_folder_facts_are_read_cheaply(tmp_path):
    gray = write_folder(tmp_path / "g", (12, 12))
    facts = data_facts(gray, val_fraction=0.5)
    assert (facts.channels, facts.im_size, facts.num_classes, facts.resolution) == (1, (12, 12), 3, 12)
    assert facts.n_train == 9 and facts.min_class == 3
    big = write_folder(tmp_path / "b", (200, 150), classes=2, per_class=2, mode="RGB")
    facts = data_facts(big)
    assert facts.channels == 3 and facts.resolution == MAX_RESOLUTION
    assert data_facts(big, resolution=20).im_size == (20, 20)


def test_image_folder_run_resolves_at_its_own_resolution(tmp_path):
    name = write_folder(tmp_path / "f", (16, 16), per_class=8)
    config = resolve("--method", "mtt", "--dataset", name, "--ipc", "2")
    assert config["resolution"] == 16 and config["defaults_from"].startswith("derived")
    assert config["max_start_epoch"] - 1 + config["expert_epochs"] <= config["expert_epochs_train"]


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("n_train, channels, size, classes, ipc", [
    (60, 1, 8, 3, 1), (1078, 1, 8, 10, 10), (5000, 3, 32, 10, 50), (45000, 3, 32, 10, 10),
    (45000, 3, 32, 100, 1), (90000, 3, 64, 200, 10)])
def test_derived_defaults_pass_every_check(method, n_train, channels, size, classes, ipc):
    facts = DataFacts("toy", channels, (size, size), classes, n_train, max(ipc, n_train // classes),
                      "color_crop_cutout_flip_scale_rotate", None)
    config = {f.name: f.default for cls in config_classes(method) for f in dataclasses.fields(cls)}
    config.update(get_method(method).fixed, method=method, experts=None,
                  **get_method(method).derive_defaults(facts, ipc))
    check_config(config, config_classes(method), facts)
    get_method(method).check_config(config, facts)
    if method in ("mtt", "tesla"):
        assert 10 <= config["syn_steps"] <= 50
        assert config["batch_syn"] is None or config["batch_syn"] <= ipc * classes
    assert config["zca"] in (None, "kornia", "kip")
    if method != "dm":  # DM matches embeddings of unwhitened images, as its reference code
        assert (config["zca"] is not None) == (channels == 3 and n_train >= 10_000 and size <= 32)


def test_health_warns_then_stops_a_pinned_step_size(capsys, tmp_path):
    monitor = HealthMonitor("stop", "lower --lr-lr", tmp_path, [])
    with pytest.raises(Stalled, match="lower --lr-lr") as err:
        for it in range(STOP_AFTER + 5):
            monitor.after_step(it, {"loss": 1.0, "lr": 1e-6, "alpha_pinned": 1.0, "student_still": 1.0})
    assert f"iteration {STOP_AFTER - 1}" in str(err.value)
    assert f"for {WARN_AFTER} iterations" in capsys.readouterr().err
    healthy = HealthMonitor("stop", "x", tmp_path, [])
    for it in range(3 * STOP_AFTER):  # intermittent signals are not a dead run
        healthy.after_step(it, {"alpha_pinned": float(it % 5 == 0), "student_still": 0.0})
    warn_only = HealthMonitor("warn", "x", tmp_path, [])
    for it in range(2 * STOP_AFTER):
        warn_only.after_step(it, {"alpha_pinned": 1.0})


def test_health_stops_when_validation_stays_below_the_initial_set(tmp_path):
    monitor = HealthMonitor("stop", "fix it", tmp_path, [{"it": 0, "val_acc": 0.6}])  # resumed: initial from rows
    monitor.after_eval(50, 0.7)
    with pytest.raises(Stalled, match="below the initial set's 60.0%"):
        for k in range(VAL_STOP):
            monitor.after_eval(100 + 50 * k, 0.5)


def test_collapsing_step_size_stops_within_50_iterations_naming_the_fix(capsys, tmp_path, monkeypatch):
    """Acceptance: --lr-lr 1 on digits pins α at a bound; the run stops by iteration 50 and names --lr-lr."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    code = main(["distill", "--method", "mtt", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "R"),
                 "--lr-lr", "1", "--syn-steps", "4", "--num-experts", "1", "--expert-epochs-train", "4", "--max-start-epoch", "2",
                 "--iterations", "200", "--eval-every", "1000", "--eval-runs", "1", "--eval-epochs", "1",
                 "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: stopped at iteration") and "--lr-lr (now 1)" in line
    assert int(line.split("iteration ")[1].split(":")[0]) < 50


def test_small_regime_experts_train_exactly_the_epochs_the_run_reads(tmp_path):
    """The digits presets and the small derived rule train max_start_epoch - 1 + expert_epochs epochs: with a
    constant lr those epochs are bit-identical to the same epochs of longer experts, so nothing is lost."""
    import torch

    from distillery.data import load_dataset
    from distillery.experts import train_experts
    from distillery.config.presets import PRESETS

    for name in ("mtt/digits-ipc1", "tesla/digits-ipc1"):
        p = PRESETS[name]
        assert p["expert_epochs_train"] == p["max_start_epoch"] - 1 + p["expert_epochs"]
    ds = load_dataset("digits")
    short = train_experts(ds, "ConvNetD1", 1, 3, 0.01, out_dir=tmp_path / "short", progress=False)
    long = train_experts(ds, "ConvNetD1", 1, 5, 0.01, out_dir=tmp_path / "long", progress=False)
    assert all(torch.equal(short.checkpoint(0, e), long.checkpoint(0, e)) for e in range(4))
    assert not torch.equal(long.checkpoint(0, 3), long.checkpoint(0, 5))
