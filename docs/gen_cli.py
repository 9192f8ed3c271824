"""The CLI reference, generated from the option declarations, so that it is never written by hand twice.

`siamkit train`'s options are TrainConfig's fields (src/siamkit/config.py, options.py); the other commands'
options are declared in src/siamkit/cli.py. Both end up in `siamkit.cli.build_parser()`, which this module
reads. Two uses:
- an mkdocs hook (mkdocs.yml, `hooks:`): the page that holds the marker below gets the reference in its place;
- a script: `python docs/gen_cli.py` prints the same Markdown.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- cli-reference -->"
SRC = Path(__file__).resolve().parents[1] / "src"


def _siamkit_parser() -> argparse.ArgumentParser:
    if str(SRC) not in sys.path:  # document this checkout's siamkit, installed or not
        sys.path.insert(0, str(SRC))
    from siamkit.cli import build_parser

    return build_parser()


def _without_recipe() -> dict[str, Any]:
    """TrainConfig's own values: what `--recipe none` (and --data digits, whose recipe is none) starts from."""
    from siamkit.config import TrainConfig

    return TrainConfig().to_dict()


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no column breaks, no HTML tags."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _value(value: Any) -> str:
    if value is None or value == "" or value == argparse.SUPPRESS:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return f"`{value}`"


def _default(action: argparse.Action) -> str:
    from siamkit.options import default_text

    if action.default is argparse.SUPPRESS or (action.default is None and not hasattr(action, "none_means")):
        return ""  # nothing, or an option of another command whose help says what leaving it out does
    return f"`{default_text(action)}`"  # as `siamkit train --help` shows it


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    text = formatter._format_action_invocation(action)  # "--loss {contrastive,triplet}", "--image-size H W"
    return f"`{text}`" if action.option_strings else f"`{text}` (positional)"


def _group_table(parser: argparse.ArgumentParser, actions: list[argparse.Action], plain: dict[str, Any] | None) -> str:
    head = "| option | default | `--recipe none` | description |\n|---|---|---|---|\n" if plain is not None else \
        "| option | default | description |\n|---|---|---|\n"
    rows = []
    for action in actions:
        cells = [_invocation(parser, action), _default(action)]
        if plain is not None:
            other = action.dest in plain and plain[action.dest] != action.default
            cells.append(_value(plain[action.dest]) if other else "")
        cells.append(action.help or "")
        rows.append("| " + " | ".join(_cell(c) if i == len(cells) - 1 else c.replace("|", "\\|")
                                       for i, c in enumerate(cells)) + " |")
    return head + "\n".join(rows) + "\n"


def _command_section(name: str, summary: str, parser: argparse.ArgumentParser) -> str:
    plain = _without_recipe() if name == "train" else None
    parts = [f"## siamkit {name}\n\n{_cell(summary)}.\n"]
    if plain is not None:
        parts.append("The default column is what a plain `siamkit train` runs (`--data att`, whose `--recipe auto` is "
                     "the faces recipe; any folder of faces gets the same), as `siamkit train --help` shows it; the "
                     "`--recipe none` column is where TrainConfig's own value, which `--recipe none` and `--data "
                     "digits` start from, differs. An option given on the command line overrides both "
                     "(`siamkit train --data DATA --help` shows the defaults for DATA).\n")
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
        parts.append(f"### {name}: {title}\n\n" + _group_table(parser, actions, plain))
    return "\n".join(parts)


def _positional(action: argparse.Action) -> str:
    name = str(action.metavar or action.dest).upper()
    return {"?": f"[{name}]", "+": f"{name}...", "*": f"[{name}...]"}.get(action.nargs, name)


def _overview(commands: dict[str, argparse.ArgumentParser], summaries: dict[str, str]) -> str:
    """One row per command: its positional arguments and what it does."""
    rows = []
    for name, p in commands.items():
        positionals = " ".join(_positional(a) for a in p._actions if not a.option_strings)
        arguments = f"`{positionals}`" if positionals else ""  # a code span: [IMAGE2] is no Markdown link
        rows.append(f"| [`siamkit {name}`](#siamkit-{name}) | {arguments} | {_cell(summaries.get(name, ''))} |")
    return "| command | arguments | what it does |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def cli_reference() -> str:
    """The Markdown reference of every `siamkit` command and option."""
    parser = _siamkit_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in sub._choices_actions}
    sections = [_command_section(name, summaries.get(name, ""), p) for name, p in sub.choices.items()]
    return "\n".join([_overview(sub.choices, summaries), *sections])


def on_page_markdown(markdown: str, page, config, files) -> str:
    """mkdocs hook: fill the marker of the page that has one."""
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown


if __name__ == "__main__":
    print(cli_reference())
