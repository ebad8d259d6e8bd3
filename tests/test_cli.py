"""The ``dpojax`` command as a new user meets it: every command and subcommand answers ``--help``."""

import argparse
import contextlib
import io

import pytest

from dpojax.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("train",), ("d3po", "sample"), ..."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_the_tree_holds_every_command():
    assert {("train",), ("eval",), ("d3po", "sample"), ("d3po", "train"), ("data", "prepare")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dpojax")
def test_help_of_every_command_exits_0_and_prints_its_usage(command):
    out = io.StringIO()
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(out):
        build_parser().parse_args([*command, "--help"])
    assert done.value.code == 0
    assert out.getvalue().startswith(f"usage: {' '.join(('dpojax', *command))}")
