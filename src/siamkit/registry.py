"""One way to register an extension: ``register_<kind>(name, entry)``, or ``@register_<kind>(name)`` above it.

Every extension point (metric losses, BatchNorm policies, data sources, backbones, classifier heads, optimizers,
augmentations) is a ``Registry`` in the module that owns it. The command line's choices, ``TrainConfig``'s checks
and the code that builds a run read the registry when they run, so an entry added later (a user's own, a test's
toy) is offered and used like a built-in one.
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import SiamkitError

_DECORATE = object()


class Registry(dict):
    """Named entries of one extension point, in the order they were registered.

    ``flag``: the option that names an entry (for the one-line error of an unknown name); ``make``: what is stored
    for a registered ``(name, entry)`` (default: the entry itself).
    """

    def __init__(self, flag: str, make: Callable[[str, Any], Any] | None = None):
        super().__init__()
        self.flag = flag
        self._make = make

    def register(self, name: str, entry: Any = _DECORATE) -> Any:
        """``register(name, entry)``; or, without the entry, a decorator that registers what it decorates."""
        if entry is _DECORATE:
            return lambda decorated: self.register(name, decorated)
        self[name] = self._make(name, entry) if self._make is not None else entry
        return entry

    def lookup(self, name: str) -> Any:
        """The entry called ``name``, or one line naming the option and the names it takes."""
        try:
            return self[name]
        except KeyError:
            raise SiamkitError(f"{self.flag} {name!r} is not known; choose one of: {', '.join(self)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self)
