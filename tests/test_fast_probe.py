"""mcpgw._fast.probe: the one check behind every fast path's probe, on classes made to differ from
the library a shortcut copies (the per-library probes are tested in tests/test_fast_*.py)."""

from __future__ import annotations

import types
from typing import Any

from mcpgw._fast import probe
from mcpgw._fast.probe import Need


class Base:
    shared = 1

    def __init__(self) -> None:
        self.from_base = 0


class Child(Base):
    def __init__(self) -> None:
        super().__init__()
        self.own = 0

    def method(self, data: bytes) -> None:
        self.own += len(data)


lib = types.SimpleNamespace(Child=Child, Factory=Child, Other=Base)


def test_a_need_is_looked_up_along_its_dotted_path_each_time() -> None:
    need = Need(lib, "Child.method", "Child.method(self, data)", probe.params("self", "data"))
    assert need.met()
    lib.Child = Base  # a later version without the method: the same need, looked up again
    try:
        assert not need.met()
    finally:
        lib.Child = Child


def test_instance_attributes_come_from_an_init_of_the_mro() -> None:
    assert Need(lib, "Child", "Child.own", probe.sets("own")).met()
    assert Need(lib, "Child", "Child.from_base", probe.sets("from_base")).met()
    assert Need(lib, "Child", "Child.shared", probe.sets("shared")).met()
    assert not Need(lib, "Child", "Child.absent", probe.sets("absent")).met()


def test_code_checks() -> None:
    assert Need(lib, "Child.method", "uses own", probe.uses("own", "len")).met()
    assert not Need(lib, "Child.method", "uses other", probe.uses("other")).met()
    assert Need(lib, "Child.method", "exactly", probe.uses_only({"own", "len"})).met()
    assert not Need(lib, "Child.method", "exactly", probe.uses_only({"own"})).met()


def test_signatures_identity_and_kinds() -> None:
    assert Need(lib, "Child.method", "prefix", probe.params_start("self")).met()
    assert Need(lib, "Child.method", "arity", probe.arity(2)).met()
    assert Need(lib, "Factory", "Factory is Child", probe.same_as(lib, "Child")).met()
    assert not Need(lib, "Other", "Other is Child", probe.same_as(lib, "Child")).met()
    assert Need(types, "SimpleNamespace", "not an exception", lambda found: not probe.exception_class(found)).met()


def test_an_object_of_another_kind_is_not_met_rather_than_an_error() -> None:
    """A name that now holds a number (no signature, no code, no MRO) fails the need; the probe
    does not raise."""
    odd: Any = types.SimpleNamespace(method=3)
    for check in (probe.params("self"), probe.uses("x"), probe.sets("x"), probe.contains("x")):
        assert not Need(odd, "method", "odd", check).met()


def test_labels_in_table_order() -> None:
    needs = [
        Need(lib, "Child.method", "first: present"),
        Need(lib, "Child.gone", "second: gone"),
        Need(lib, "Child", "third: gone", probe.sets("absent")),
    ]
    assert probe.missing(needs) == ["second: gone", "third: gone"]
    assert probe.first_missing(needs) == "second: gone"
    assert probe.first_missing(needs[:1]) is None
