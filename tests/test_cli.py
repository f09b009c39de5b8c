import json

from dard.cli import main, pixel_value
from dard.logs import percent
from dard.models import load_model


def test_pixel_value():
    assert pixel_value("8/255") == 8 / 255 and pixel_value("0.1") == 0.1


def test_train_teacher_then_evaluate(tmp_path, capsys):
    out = tmp_path / "teacher.pt"
    assert main(["train-teacher", "--arch", "cnn_small", "--epochs", "3", "--limit-train", "300", "--steps", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.exists() and (tmp_path / "teacher-run" / "checkpoint.pt").exists()
    # the closing line says the accuracies of the epoch the model file holds, the PGD+CW one that chose it too
    (said,) = [line for line in capsys.readouterr().out.splitlines() if "validation natural" in line]
    meta = load_model(out)[1]["meta"]
    kept = f"PGD-10+CW-10 {percent(meta['final_metrics']['val_robust_acc'])}"
    assert said.endswith(f"{kept} (the weights of epoch {meta['selected_epoch'] + 1}/3, the best on validation)"), said
    # resuming a finished run trains nothing more and keeps its history
    assert main(["train-teacher", "--arch", "cnn_small", "--epochs", "3", "--limit-train", "300", "--steps", "2",
                 "--out", str(out), "--no-progress", "--resume"]) == 0
    history = (tmp_path / "teacher-run" / "history.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in history] == [0, 1, 2]
    # ... and refuses to continue it under another config, writing nothing
    before = (tmp_path / "teacher-run" / "checkpoint.pt").read_bytes()
    assert main(["train-teacher", "--arch", "cnn_small", "--epochs", "3", "--limit-train", "300", "--steps", "2",
                 "--lr", "0.05", "--out", str(out), "--no-progress", "--resume"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert (tmp_path / "teacher-run" / "checkpoint.pt").read_bytes() == before
    assert main(["evaluate", "--model", str(out), "--attacks", "natural,fgsm,pgd20", "--limit", "60",
                 "--no-progress", "--no-checks"]) == 0
    printed = capsys.readouterr().out
    assert "pgd20" in printed and "natural" in printed
    report = json.loads((tmp_path / "teacher-eval" / "robustness.json").read_text())
    assert 0 <= report["accuracy"]["pgd20"] <= report["accuracy"]["natural"] <= 1


def test_train_teacher_defaults_to_the_dataset_teacher_recipe(capsys):
    from dard.cli import build_config, make_parser
    from dard.config import TEACHER_DEFAULTS, teacher_config

    for dataset in ("digits", "fashion-mnist"):
        args = make_parser().parse_args(["train-teacher", "--dataset", dataset])
        assert build_config(args) == teacher_config(dataset)
        args = make_parser().parse_args(["distill", "--dataset", dataset])
        assert build_config(args).model.arch == "cnn_small"  # students keep the dataset's student defaults
        assert main(["config", "--dataset", dataset, "--teacher"]) == 0
        printed = capsys.readouterr().out
        recipe = TEACHER_DEFAULTS[dataset]
        assert f"arch: {recipe['model']['arch']}" in printed and f"method: {recipe['loss']['method']}" in printed
        assert f"epochs: {recipe['optim']['epochs']}" in printed


def test_clear_errors(tmp_path, capsys):
    assert main(["train-teacher", "--eps", "-1", "--out", str(tmp_path / "t.pt")]) == 2
    assert "attack.eps" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["distill", "--dataset", "cifar10", "--out", str(tmp_path / "s.pt"), "--teacher", "x.pt"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["train-teacher", "--set", "loss.nonsense=1", "--out", str(tmp_path / "t.pt")]) == 2
    assert "loss.nonsense" in capsys.readouterr().err


def test_architecture_knobs_from_the_command_line():
    """`--set model.kwargs.KEY=V` sets one knob; `--arch` drops the dataset's knobs for another
    architecture (cnn_small's width means nothing to resnet18); every option's default is in --help."""
    from dard.cli import build_config, make_parser

    parse = make_parser().parse_args
    assert build_config(parse(["distill", "--set", "model.kwargs.width=0.5"])).model.kwargs == {"width": 0.5}
    fashion = build_config(parse(["distill", "--dataset", "fashion-mnist"]))
    assert fashion.model.kwargs == {"width": 0.25}
    assert build_config(parse(["distill", "--dataset", "fashion-mnist", "--arch", "resnet18"])).model.kwargs == {}
    import re

    help_text = make_parser()._subparsers._group_actions[0].choices["evaluate"].format_help()
    assert re.search(r"--aa-limit AA_LIMIT .*\(default:\s+500\)", help_text, re.S)


def test_every_option_says_what_it_is():
    import argparse

    from dard.cli import make_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.dest not in ("help", "version") and (not action.help or action.help.startswith("default:")):
                missing.append(f"{path} {(action.option_strings or [action.dest])[-1]}")

    walk(make_parser(), "dard")
    assert not missing, missing


def test_an_interrupted_command_with_ray_connected_ends_without_pythons_teardown(monkeypatch):
    """After Ctrl-C (130) or SIGTERM (143) threads may still use Ray (a Ray Train fit waits in its
    own), and Ray's teardown under them ends the process -11 or 1 (ray-project/ray#31145): `dard`
    ends with os._exit then, its logs flushed; otherwise, and without Ray, with sys.exit."""
    import os
    import sys
    import types

    import pytest

    from dard import cli

    ended = []

    def hard_exit(code):
        ended.append(("os._exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", hard_exit)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: ended.append(("logs flushed", None)))
    for code, connected, how in [(130, True, "os._exit"), (143, True, "os._exit"), (130, False, "sys.exit"),
                                 (0, True, "sys.exit"), (2, True, "sys.exit")]:
        monkeypatch.setattr(cli, "main", lambda code=code: code)
        monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda c=connected: c))
        ended.clear()
        with pytest.raises(SystemExit) as stop:
            cli.run()
        hard = [("logs flushed", None), ("os._exit", code)]
        assert stop.value.code == code and ended == (hard if how == "os._exit" else [])
