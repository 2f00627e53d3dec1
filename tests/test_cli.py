"""The command line a new user types first: --version, -v anywhere, KEY=VALUE anywhere, examples in every --help."""

from __future__ import annotations

import argparse

import pytest

import pneumonet
from pneumonet.cli import build_parser, main
from pneumonet.commandline import parse
from pneumonet.training.args import config_from_args


def _subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"pneumonet {pneumonet.__version__}"


def test_every_subcommand_has_an_example_and_accepts_v():
    found = dict(_subparsers(build_parser()))
    assert {("train",), ("evaluate",), ("predict",), ("score",), ("serve",), ("demo",), ("data", "synth")} <= set(found)
    for path, sub in found.items():
        text = sub.format_help()
        assert "examples:\n  pneumonet " in text, path
        assert "-v, --verbose" in text, path


@pytest.mark.parametrize("argv, verbose", [(["train", "--out", "o"], False), (["-v", "train", "--out", "o"], True),
                                           (["train", "--out", "o", "-v"], True), (["train", "-v", "--out", "o"], True)])  # fmt: skip
def test_verbose_before_or_after_the_subcommand(argv, verbose):
    assert parse(build_parser(), argv).verbose is verbose


def test_overrides_anywhere_and_train_flags_win():
    args = parse(build_parser(), ["train", "train.epochs=3", "--out", "o", "train.learning_rate=0.01", "--epochs", "2",
                                  "--batch-size", "4", "seed=5", "--seed", "9"])  # fmt: skip
    assert args.overrides == ["train.epochs=3", "train.learning_rate=0.01", "seed=5"]
    config = config_from_args(args)
    assert (config.train.epochs, config.train.batch_size, config.seed, config.train.learning_rate) == (2, 4, 9, 0.01)


def test_predict_overrides_stand_among_the_images_and_unknown_arguments_still_fail():
    args = parse(build_parser(), ["predict", "--model", "m", "a.png", "data.max_image_pixels=10", "b.png"], positional="images")
    assert args.images == ["a.png", "b.png"] and args.overrides == ["data.max_image_pixels=10"]
    args = parse(build_parser(), ["evaluate", "--model", "m", "--data", "d", "--out", "o", "--split", "val",
                                  "data.decode_workers=2", "--config", "c.yaml"])  # fmt: skip
    assert args.overrides == ["data.decode_workers=2"] and args.config == "c.yaml"
    with pytest.raises(SystemExit):
        parse(build_parser(), ["train", "--out", "o", "--no-such-flag"])
    with pytest.raises(SystemExit):
        parse(build_parser(), ["data", "synth", "x", "train.epochs=3"])  # a command without overrides
