"""Options declared once: a dataclass field carries its default, help, choices and checks; the CLI is built from it.

``option(...)`` makes the field; ``check_fields`` validates an instance against the metadata (choices,
ranges) with the same one-line messages everywhere; ``add_arguments`` turns the fields of a dataclass
into argparse options (``--field-name``). Choices may be a callable, read when used, so that a registry
entry added later (a toy loss in a test, a user's own backbone) is offered too.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Sequence

from .errors import SiamkitError

Choices = Sequence[str] | Callable[[], Sequence[str]]


def option(
    default: Any = None,
    *,
    help: str | Callable[[], str] = "",
    group: str = "",
    choices: Choices | None = None,
    minimum: str | None = None,
    nargs: int | None = None,
    metavar: Any = None,
    flag: str | None = None,
    cli: bool = True,
    none_means: str = "auto",
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with what the CLI and the checks need.

    minimum: "positive" (> 0) or "non-negative" (>= 0); flag: the CLI spelling when it is not --field-name
    (e.g. "--no-channels-last" for a True default); cli=False: not a command-line option; none_means: how
    ``--help`` shows a default of None (the help text says what it stands for).
    """
    meta = dict(help=help, group=group, choices=choices, minimum=minimum, nargs=nargs, metavar=metavar, flag=flag, cli=cli,
                none_means=none_means)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def one_of(first: str, second: str, reason: str) -> SiamkitError:
    """The one message, in every command and in Python, for two options that cannot go together."""
    return SiamkitError(f"{first} and {second} {reason}: pass only one of them")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    choices = f.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def check_fields(obj: Any) -> None:
    """Raise SiamkitError for the first field whose value is not among its choices or below its minimum."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed = choices_of(f)
        if allowed is not None and value not in allowed:
            raise SiamkitError(f"{flag_of(f.name)} {value!r} is not known; choose one of: {', '.join(allowed)}")
        minimum = f.metadata.get("minimum")
        if minimum == "positive" and not value > 0:
            raise SiamkitError(f"{flag_of(f.name)} must be a positive number, got {value}")
        if minimum == "non-negative" and value is not None and not value >= 0:
            raise SiamkitError(f"{flag_of(f.name)} must be 0 or more, got {value}")


def _type_of(f: dataclasses.Field, default: Any) -> Callable[[str], Any] | None:
    text = str(f.type)
    for name, kind in (("float", float), ("int", int)):
        if text.startswith(name) or f"[{name}]" in text:
            return kind
    return None if isinstance(default, bool) else str


def add_arguments(parser: argparse.ArgumentParser, cls: type, groups: dict[str, Any] | None = None,
                  defaults: Any = None) -> None:
    """One argparse option per command-line field of dataclass ``cls``, in declaration order, grouped by metadata.

    ``defaults``: an instance of ``cls`` whose values are the options' defaults (default: ``cls()``), so that
    ``--help`` shows the values a run without the option uses.
    """
    groups = {} if groups is None else groups
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group_name = meta.get("group", "")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name) if group_name else parser
        target = groups[group_name]
        default = getattr(defaults, f.name)
        text = meta.get("help")
        kwargs: dict[str, Any] = {"dest": f.name, "help": (text() if callable(text) else text) or ""}
        if isinstance(default, bool) and meta.get("flag"):  # a flag of its own names the one way to set it
            kwargs["action"] = "store_false" if default else "store_true"
        elif isinstance(default, bool):
            # --x and --no-x both, so that a switch a recipe or --config file turns on can be turned off again
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.update(type=_type_of(f, default), default=default)
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
            if meta.get("metavar") is not None:
                kwargs["metavar"] = meta["metavar"]
            choices = choices_of(f)
            if choices is not None:
                kwargs["choices"] = choices
        action = target.add_argument(meta.get("flag") or flag_of(f.name), **kwargs)
        action.none_means = meta.get("none_means", "auto")


def default_text(action: argparse.Action) -> str:
    """The one value ``--help`` shows as an option's default: on/off for switches (for a --no-x flag, whether the
    flag is given), lists as their items, None as what it stands for."""
    default = action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return getattr(action, "none_means", "none")
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default)
    return str(default) if default != "" else "none"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with ``(default: V)``, V its one default (default_text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").removesuffix(" (default: %(default)s)")  # BooleanOptionalAction's own, 3.11
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        shown = default_text(action).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"
