"""The one check behind every fast path's probe.

A shortcut's module lists what it reads of a library's private API as data: each :class:`Need`
names an object (a dotted path of attribute names under a module or class) and what must hold of
it (a signature, names its code uses, attributes its instances get). :func:`missing` looks every
need up again on the installed library, so a test that takes a name away sees the probe fail, and
returns the labels of the needs that are not met; the module writes the one warning line
(mcpgw._fast.probe_failed). Only names, signatures and code objects are read: nothing of the
library is called or instantiated.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

#: What must hold of the object a need names; raising AttributeError, TypeError or ValueError
#: (no such attribute, not a function, no signature) counts as not holding.
Check = Callable[[Any], bool]


def _present(found: Any) -> bool:
    return True


@dataclass(frozen=True)
class Need:
    """One thing a shortcut reads: the object at ``path`` under ``where``, and ``check`` of it
    (by default only that it is there). ``label`` names it in the warning line when it is not met."""

    where: Any
    path: str
    label: str
    check: Check = _present

    def met(self) -> bool:
        try:
            return bool(self.check(operator.attrgetter(self.path)(self.where)))
        except (AttributeError, TypeError, ValueError):
            # A name that is gone, or another kind of object where a function or class was: the
            # installed library is not the one the shortcut copies.
            return False


def missing(needs: Iterable[Need]) -> list[str]:
    """The labels of the needs the installed libraries do not meet, in their order."""
    return [need.label for need in needs if not need.met()]


def first_missing(needs: Iterable[Need]) -> str | None:
    """The label of the first need not met, or None."""
    return next((need.label for need in needs if not need.met()), None)


# -- checks ----------------------------------------------------------------------------------------

def _code_names(function: Any) -> tuple[str, ...]:
    """The attribute, global and method names a function's code uses (AttributeError if it is no function)."""
    names: tuple[str, ...] = function.__code__.co_names
    return names


def params(*names: str) -> Check:
    """A callable whose parameters are exactly ``names``."""
    return lambda found: tuple(inspect.signature(found).parameters) == names


def params_start(*names: str) -> Check:
    """A callable whose first parameters are ``names`` (later ones are left to the library)."""
    return lambda found: tuple(inspect.signature(found).parameters)[:len(names)] == names


def arity(count: int) -> Check:
    """A callable of ``count`` parameters, whatever their names."""
    return lambda found: len(inspect.signature(found).parameters) == count


def uses(*names: str) -> Check:
    """A function whose code uses every one of ``names``."""
    return lambda found: set(names) <= set(_code_names(found))


def uses_only(names: Collection[str]) -> Check:
    """A function whose code uses exactly ``names``: the function a shortcut copies, unchanged."""
    expected = frozenset(names)
    return lambda found: frozenset(_code_names(found)) == expected


def contains(name: str) -> Check:
    """A collection (a class's list of option names) holding ``name``."""
    return lambda found: name in found


def sets(name: str) -> Check:
    """A class whose instances have ``name``: a class attribute, or one an ``__init__`` of its MRO
    assigns (an instance attribute cannot be seen on the class without making an instance)."""
    def check(cls: Any) -> bool:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if name in klass.__dict__ or (inspect.isfunction(init) and name in _code_names(init)):
                return True
        return False
    return check


def same_as(where: Any, path: str) -> Check:
    """The very object at ``path`` under ``where`` (a factory attribute that must name that class)."""
    return lambda found: found is operator.attrgetter(path)(where)


def exception_class(found: Any) -> bool:
    return isinstance(found, type) and issubclass(found, Exception)
