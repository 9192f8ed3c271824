"""cli.py only parses and dispatches (issue 30): every command's body is ``run(args)`` in siamkit.commands.

Both checks failed before the bodies moved: cli.py imported the modules that do the work (api, gallery,
eval.protocol, ...) and main() called its own ``_verify``, ``_enroll``, ... functions.
"""
from __future__ import annotations

import argparse
import inspect
from importlib import import_module

import pytest

from siamkit import cli
from test_layering import PACKAGE, siamkit_imports

# What parsing needs and nothing that does a command's work: the version, the one-line error, the option
# declarations (TrainConfig's fields and their help) and the default of --max-genuine-pairs.
PARSING_MODULES = {"siamkit._version", "siamkit.errors", "siamkit.config", "siamkit.options",
                   "siamkit.eval.verification"}

# One command line each that parses (no file is read while parsing).
ARGV = {
    "train": ["train", "--data", "digits"],
    "evaluate": ["evaluate", "RUN", "--data", "att"],
    "verify": ["verify", "RUN", "a.png", "b.png"],
    "embed": ["embed", "RUN", "--data", "att", "--out", "e.npz"],
    "align": ["align", "photos", "aligned"],
    "export": ["export", "RUN", "--out", "model.onnx"],
    "enroll": ["enroll", "RUN", "--data", "people", "--out", "gallery"],
    "identify": ["identify", "gallery", "probe.png"],
    "serve": ["serve", "RUN"],
    "serve-keys": ["serve-keys", "create", "--file", "keys.json"],
    "serve-gallery": ["serve-gallery", "import", "gallery.npz", "--gallery", "staff"],
}


def subcommands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_cli_imports_only_what_parsing_needs():
    assert siamkit_imports(PACKAGE / "cli.py") <= PARSING_MODULES


def test_every_subcommand_has_a_run_function_in_siamkit_commands():
    assert sorted(cli.COMMANDS) == subcommands() == sorted(ARGV)
    for name, module_name in cli.COMMANDS.items():
        module = import_module(module_name)
        assert module_name == f"siamkit.commands.{name.replace('-', '_')}"
        assert inspect.isfunction(module.run) and module.run.__module__ == module_name


@pytest.mark.parametrize("command", sorted(ARGV))
def test_main_hands_the_parsed_arguments_to_the_commands_run(command, monkeypatch):
    seen = []

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 7  # an exit status no command returns, so only this function can have produced it

    monkeypatch.setattr(import_module(cli.COMMANDS[command]), "run", run)
    assert cli.main(ARGV[command]) == 7
    assert [a.command for a in seen] == [command]
    assert vars(seen[0]) == vars(cli.parse_args(ARGV[command]))
