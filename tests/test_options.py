"""Declared option ranges: the metadata, the generated flags, and bad values refused before any data is read."""

import dataclasses

import pytest

import distillery.data
from distillery.data import load_dataset
from distillery.cli import main
from distillery.cli.options import CommandOptions
from distillery.distill import DataConfig, config_classes
from distillery.errors import UserError
from distillery.experts import ExpertConfig, train_experts
from distillery.methods import get_method, list_methods
from distillery.config.options import check_options, check_value, check_values, describe, option
from distillery.run.config import LoopConfig


@dataclasses.dataclass
class Toy:
    k: int = option(1, low=1, help="count")
    f: float = option(0.5, low=0, high=1, high_open=True)
    rate: float = option(1.0, low=0, low_open=True)
    mode: str = option("a", choices=("a", "b"))
    batch: int | None = option(None, low=1)


@pytest.mark.parametrize("name, value", [("k", 0), ("k", -1), ("f", 1.0), ("f", -0.1), ("rate", 0.0),
                                         ("rate", float("nan")), ("mode", "c")])
def test_out_of_range_values_are_refused(name, value):
    with pytest.raises(UserError, match=f"--{name} "):
        check_values(Toy, {name: value})


@pytest.mark.parametrize("name, value", [("k", 1), ("f", 0.0), ("f", 0.99), ("rate", 1e-9), ("mode", "b"),
                                         ("batch", None), ("batch", 3)])
def test_in_range_values_pass(name, value):
    check_values(Toy, {name: value})


def test_describe_and_defaults():
    meta = {f.name: f.metadata["option"] for f in dataclasses.fields(Toy)}
    assert describe(meta["f"]) == ">= 0 and < 1"
    assert describe(meta["rate"]) == "> 0"
    assert describe(meta["mode"]) == "one of a, b"
    check_options(Toy())
    with pytest.raises(UserError, match="needs a value"):
        check_value("k", None, meta["k"])


def test_every_config_field_declares_its_range():
    """New fields must be option(...) fields: the CLI generates flags, help and checks from them."""
    methods = [get_method(name).config_class for name in list_methods()]
    for cls in (*methods, LoopConfig, ExpertConfig, DataConfig, CommandOptions):
        plain = [f.name for f in dataclasses.fields(cls) if "option" not in f.metadata]
        assert not plain, f"{cls.__name__} fields without option(...): {plain}"
        check_options(cls())  # the declared defaults are inside their own ranges


def test_generated_flags_carry_the_declared_help(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    seen = {"seed"}  # --seed is a common flag; a field both methods have gets the first one's help
    for cls in [*config_classes("mtt"), *config_classes("ratbptt")]:
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            assert "--" + f.name.replace("_", "-") in text
            help_text = " ".join(f.metadata["option"]["help"].split())
            assert help_text[:40] in text, f.name


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """Fail the test if any dataset is read; work in an empty folder."""
    def refuse(*a, **k):
        raise AssertionError("data was read before the configuration was checked")

    monkeypatch.setattr(distillery.data, "load_dataset", refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


DISTILL = ["distill", "--dataset", "digits", "--out", "R", "--no-progress"]


@pytest.mark.parametrize("argv, needle", [
    (DISTILL + ["--method", "mtt", "--ipc", "0"], "--ipc 0"),
    (DISTILL + ["--method", "mtt", "--ipc", "-1"], "--ipc -1"),
    (DISTILL + ["--method", "mtt", "--lr-img", "-5"], "--lr-img -5"),
    (DISTILL + ["--method", "mtt", "--eval-every", "0"], "--eval-every 0"),
    (DISTILL + ["--method", "mtt", "--checkpoint-every", "0"], "--checkpoint-every 0"),
    (DISTILL + ["--method", "tesla", "--iterations", "0"], "--iterations 0"),
    (DISTILL + ["--method", "mtt", "--val-fraction", "1"], "--val-fraction 1"),
    (DISTILL + ["--method", "mtt", "--max-start-epoch", "30"], "--max-start-epoch 30"),
    (DISTILL + ["--method", "mtt", "--ipc", "500"], "smallest class"),
    (DISTILL + ["--method", "mtt", "--batch-syn", "11"], "--batch-syn 11"),
    (DISTILL + ["--method", "mtt", "--lr-teacher", "2"], "--lr-teacher 2"),
    (DISTILL + ["--method", "ratbptt", "--ipc", "1", "--window", "41"], "--window 41"),
    (DISTILL + ["--method", "ratbptt", "--ipc", "1", "--min-start", "31"], "--min-start 31"),
    (DISTILL + ["--method", "ratbptt", "--ipc", "2", "--boost-blocks", "1,2"], "--boost-blocks"),
    (DISTILL + ["--method", "ratbptt", "--ipc", "1", "--task-sampler-nc", "11"], "--task-sampler-nc 11"),
    (["baseline", "random", "--dataset", "digits", "--ipc", "0"], "--ipc 0"),
    (["baseline", "random", "--dataset", "digits", "--ipc", "1", "--runs", "0"], "--runs 0"),
    (["baseline", "random", "--dataset", "digits", "--ipc", "1", "--eval-epochs", "0"], "--eval-epochs 0"),
    (["baseline", "full", "--dataset", "digits", "--threads", "0"], "--threads 0"),
    (["baseline", "full", "--dataset", "digits", "--lr", "-1"], "--lr -1"),
    (["evaluate", "set.safetensors", "--eval-epochs", "0"], "--eval-epochs 0"),
    (["experts", "--dataset", "digits", "--num-experts", "0", "--out", "E"], "--num-experts 0"),
])
def test_bad_values_fail_in_one_line_before_any_work(capsys, no_data, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not (no_data / "R").exists() and not (no_data / "E").exists()



@pytest.mark.parametrize("argv, message", [
    (["baseline", "random", "--dataset", "digits", "--ipc", "1", "--runs", "0"],
     "--runs 0 is out of range: it must be >= 1"),
    (["baseline", "random", "--dataset", "digits", "--ipc", "1", "--resolution", "0"],
     "--resolution 0 is out of range: it must be >= 8 (or none)"),
    (["evaluate", "set.safetensors", "--eval-epochs", "0"], "--eval-epochs 0 is out of range: it must be >= 1"),
    (DISTILL + ["--method", "mtt", "--ipc", "0"], "--ipc 0 is out of range: it must be >= 1"),
    (DISTILL + ["--method", "mtt", "--resolution", "0"], "--resolution 0 is out of range: it must be >= 8 (or none)"),
    (DISTILL + ["--method", "ratbptt", "--epochs", "0"], "--real-epochs 0 is out of range: it must be >= 1 (or none)"),
    (DISTILL + ["--method", "mtt", "--batch-syn", "0"], "--batch-syn 0 is out of range: it must be >= 1 (or none)"),
])
def test_range_errors_offer_none_only_where_the_flag_takes_it(capsys, no_data, argv, message):
    """"(or none)" is said only for flags that parse `none` (distill's optional fields), not for int-only flags."""
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"

def test_expert_store_too_short_is_refused_from_its_manifest(capsys, no_data):
    store = no_data / "experts"
    train_experts(load_dataset("digits"), "ConvNetD2W8", 1, epochs=4, out_dir=store, progress=False)
    argv = DISTILL + ["--method", "mtt", "--experts", str(store), "--max-start-epoch", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has 4 epochs" in err and "--max-start-epoch 5" in err
    assert main(DISTILL + ["--method", "mtt", "--experts", str(no_data / "nowhere")]) == 2
    assert "no expert store" in capsys.readouterr().err


def test_every_command_builds_its_parser_from_declarations():
    """No hand-written flags: every argument of every command is a declared option, and each option has one
    declaration (its help, default and range come from it)."""
    from distillery.cli import build_parser
    from distillery.cli.options import COMMANDS
    from distillery.distill import DistillOptions
    from distillery.methods import list_methods

    declared = {f.name for cls in (CommandOptions, ExpertConfig, DistillOptions,
                                   *(c for m in list_methods() for c in config_classes(m)))
                for f in dataclasses.fields(cls)}
    parser = build_parser()
    assert set(parser.commands) == set(COMMANDS)
    for command, sub in parser.commands.items():
        dests = [a.dest for a in sub._actions if a.dest != "help"]
        assert set(dests) <= declared, (command, set(dests) - declared)
        assert len(dests) == len(set(dests)), command
    for command in ("distill", "presets"):  # the --method choices: one list
        method = next(a for a in parser.commands[command]._actions if a.dest == "method")
        assert list(method.choices) == list_methods()


def test_the_spellings_recorded_from_declarations_are_the_parsers():
    """`flags` (what close matches and typed spellings are looked up in) holds exactly the option strings argparse
    was given, for every command."""
    from distillery.cli import build_parser

    for command, sub in build_parser().commands.items():
        actions = {a.dest: a.option_strings for a in sub._actions if a.option_strings}
        assert sub.flags == actions, command


def test_the_three_epochs_have_distinct_names():
    """RaT-BPTT's budget, evaluation epochs and expert epochs: three declarations, three flags; `--epochs` stays
    only as `distill`'s alias of the published RaT-BPTT budget."""
    from distillery.cli import build_parser

    parser = build_parser()
    flags = {c: {s: a.dest for a in p._actions for s in a.option_strings} for c, p in parser.commands.items()}
    assert flags["distill"]["--real-epochs"] == flags["distill"]["--epochs"] == "real_epochs"
    assert flags["distill"]["--eval-epochs"] == flags["evaluate"]["--eval-epochs"] == "eval_epochs"
    assert flags["baseline"]["--eval-epochs"] == "eval_epochs"
    assert flags["experts"]["--expert-epochs-train"] == flags["distill"]["--expert-epochs-train"] == \
        "expert_epochs_train"
    assert "--epochs" not in flags["evaluate"] and "--epochs" not in flags["experts"]


def test_one_default_for_evaluation_epochs():
    import inspect

    from distillery.evaluation.protocol import DEFAULT_EVAL_EPOCHS as EVAL_EPOCHS
    from distillery.evaluation.dsa import evaluate_set, random_real_baseline

    assert LoopConfig().eval_epochs == EVAL_EPOCHS
    for func in (evaluate_set, random_real_baseline):
        assert inspect.signature(func).parameters["epochs"].default == EVAL_EPOCHS
