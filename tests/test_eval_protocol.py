"""Issue 24: a set records the whole evaluation protocol it was selected under, `distillery evaluate SET` with no
flags scores it exactly as the run's final evaluation did (same seeds, bit for bit), flags override single fields
and say so, imported sets record their source code's protocol, and a bad record is refused at load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.cli import main
from distillery.data import load_dataset
from distillery.errors import UserError
from distillery.evaluation.protocol import (PUBLISHED_DSA_EPOCHS, EvalProtocol, dsa_protocol, published_protocol,
                                            rat_protocol)
from distillery.experts import train_experts
from distillery.sets.imports import import_set
from distillery.evaluation.score import resolve_protocol
from distillery.sets.synset import SyntheticSet

LOOP = ["--eval-every", "1", "--eval-runs", "1", "--eval-epochs", "2", "--final-eval-runs", "2", "--health", "off",
        "--no-progress", "--threads", "1"]
RAT = ["--method", "ratbptt", "--ipc", "1", "--model", "ConvNetD1", "--horizon", "4", "--window", "2",
       "--real-batch", "1024", "--syn-strategy", "none", "--rat-eval-steps", "2,4", "--epochs", "1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("experts") / "store"
    train_experts(load_dataset("digits"), "ConvNetD2", 1, epochs=2, out_dir=path, progress=False)
    return path


def evaluate_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["evaluate", *map(str, argv), "--json", "--no-progress", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def check_reproduced(capsys, run_dir, seed: int = 0) -> dict:
    """`evaluate best` with no flags gives the final test accuracies bit for bit; so does every other protocol the
    set records (`--protocol`), and the last set."""
    result = json.loads((run_dir / "result.json").read_text())
    for name in ("best", "last"):
        out = evaluate_json(capsys, run_dir / f"{name}.safetensors")
        assert out["accs"] == result[name]["test_accs"] and out["protocol"] == result[name]["protocol"]
        assert set(out["sources"].values()) == {"set"} and out["eval_protocol"]["seed"] == seed
        recorded = SyntheticSet.load(run_dir / f"{name}.safetensors").meta["eval"]
        assert [r["eval_protocol"] for r in result[name]["by_protocol"]] == recorded  # result.json says it too
        for rec in result[name]["by_protocol"][1:]:
            other = evaluate_json(capsys, run_dir / f"{name}.safetensors", "--protocol", rec["protocol"])
            assert other["accs"] == rec["test_accs"]
    return result


@pytest.mark.parametrize("method", ["mtt", "tesla"])
def test_mtt_and_tesla_sets_are_scored_as_the_run_scored_them(method, store, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--method", method, "--dataset", "digits", "--ipc", "1", "--experts", str(store),
                 "--out", str(out), "--syn-steps", "2", "--max-start-epoch", "1", "--expert-epochs", "1",
                 "--iterations", "2", "--seed", "3", *LOOP]) == 0
    result = check_reproduced(capsys, out, seed=3)
    s = SyntheticSet.load(out / "best.safetensors")
    (own,) = [EvalProtocol.from_json(r) for r in s.meta["eval"]]
    assert (own.name, own.epochs, own.runs, own.seed, own.lr) == ("dsa", 2, 2, 3, s.lr)  # the learned lr
    # a flag overrides one field and the printout says which came from where
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.safetensors"), "--runs", "1", "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "dsa protocol:" in printed and "runs 1 (--runs)" in printed and "epochs 2 (set)" in printed
    assert result["best"]["by_protocol"][0]["epochs"] == 2


def test_ratbptt_set_is_scored_as_the_run_scored_it_under_both_protocols(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--dataset", "digits", *RAT, "--out", str(out), *LOOP]) == 0
    result = check_reproduced(capsys, out)
    assert [r["protocol"] for r in result["best"]["by_protocol"]] == ["rat", "dsa"]
    with pytest.raises(UserError, match="--epochs does not apply to the rat protocol"):
        resolve_protocol(SyntheticSet.load(out / "best.safetensors"), load_dataset("digits").spec, None,
                         {"--epochs": ("epochs", 5)})


def test_cifar_shaped_run_is_reproduced(tmp_path, capsys):
    """32x32 RGB images in an image folder (the CIFAR-10 shape), distilled and re-scored."""
    root, rng = tmp_path / "folder", np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // 2 + 12 * c
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "run"
    assert main(["distill", "--dataset", f"imagefolder:{root}", *RAT, "--val-fraction", "0.2", "--out", str(out),
                 *LOOP]) == 0
    assert SyntheticSet.load(out / "best.safetensors").images.shape[1:] == (3, 32, 32)
    check_reproduced(capsys, out)


BAD = [({"val_fraction": 1.0}, "val_fraction"),
       ({"epochs": "300"}, "epochs"), ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"),
       ({"runs": True}, "runs"), ({"optimizer": "adam"}, "sgd"), ({"schedule": "cosine"}, "schedule"),
       ({"augment": "blur"}, "blur"), ({"name": "kip"}, "not dsa or rat"), ({"steps": [3, 2]}, "has unknown fields"),
       ({"model": ""}, "model")]


@pytest.mark.parametrize("change,match", BAD)
def test_a_bad_record_is_refused_when_the_set_is_loaded(tmp_path, change, match):
    good = dsa_protocol("ConvNetD2", 5, 0, 0.01, "flip").as_json()
    s = SyntheticSet(torch.zeros(2, 1, 8, 8), torch.arange(2), meta={"num_classes": 2, "eval": [{**good, **change}]})
    s.save(tmp_path / "s.safetensors")
    with pytest.raises(UserError, match=match) as err:
        SyntheticSet.load(tmp_path / "s.safetensors")
    assert "s.safetensors" in str(err.value) and "\n" not in str(err.value)
    bad_rat = {**rat_protocol("ConvNetD2", 5, 0).as_json(), "steps": [3, 2]}
    with pytest.raises(UserError, match="increasing"):
        EvalProtocol.from_json(bad_rat)


def test_imported_sets_record_their_source_codes_protocol(tmp_path, capsys):
    ds = load_dataset("digits")
    x, y = ds.random_set(1, torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "images_best.pt")
    torch.save(torch.tensor(0.02), tmp_path / "lr_best.pt")
    assert main(["import-set", str(tmp_path / "images_best.pt"), "--dataset", "digits",
                 "--out", str(tmp_path / "s.safetensors")]) == 0
    assert "MTT/TESLA evaluate_synset" in capsys.readouterr().out
    (own,) = [EvalProtocol.from_json(r) for r in SyntheticSet.load(tmp_path / "s.safetensors").meta["eval"]]
    learned = float(torch.tensor(0.02))  # the file's float32 lr
    assert (own.name, own.epochs, own.lr, own.runs, own.augment) == ("dsa", PUBLISHED_DSA_EPOCHS, learned, 5,
                                                                    ds.spec.dsa_strategy)
    given = import_set(tmp_path / "images_best.pt", "digits", lr=0.05)
    assert EvalProtocol.from_json(given.meta["eval"][0]).lr == 0.05
    rat = published_protocol("ratbptt-h5", "ConvNet", None, "flip")
    assert (rat.name, rat.optimizer, rat.lr, rat.augment, rat.steps) == ("rat", "adam", 1e-3, "flip_rotate",
                                                                         (300, 600, 1000, 3000))
