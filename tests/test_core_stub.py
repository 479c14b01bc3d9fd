"""The type stub ``python/sensai/_core.pyi`` matches the extension module ``sensai._core``.

Type checkers and editors read only the stub, so a name the extension exports but the stub
lacks is invisible to them, and a stale one is a promise the module does not keep. Compared
here: the public names of the module and of each class, what kind of member each one is
(property, static method, method), and each callable's parameter names and defaults (PyO3
gives every function a text signature).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

from sensai import _core

STUB = Path(_core.__file__).with_name("_core.pyi")
# Members every class has, whether or not py.rs defines them (the stub need not repeat them).
INHERITED = {"__doc__", "__module__", "__repr__", "__new__", "__init__"}


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text(), str(STUB))


def _members(cls: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AnnAssign]:
    out: dict[str, ast.FunctionDef | ast.AnnAssign] = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _stub_classes() -> dict[str, ast.ClassDef]:
    return {n.name: n for n in _stub().body if isinstance(n, ast.ClassDef)}


def _decorators(fn: ast.FunctionDef) -> set[str]:
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


def _runtime_kind(value: Any) -> str:
    if isinstance(value, staticmethod):
        return "staticmethod"
    if inspect.isgetsetdescriptor(value) or isinstance(value, property):
        return "property"
    return "method"


def _stub_kind(node: ast.FunctionDef | ast.AnnAssign) -> str:
    if isinstance(node, ast.AnnAssign):
        return "property"  # a plain attribute
    decorators = _decorators(node)
    if "staticmethod" in decorators:
        return "staticmethod"
    if "property" in decorators:
        return "property"
    return "method"


def _stub_params(fn: ast.FunctionDef, bound: bool) -> list[tuple[str, Any]]:
    """``(name, default)`` per parameter, ``inspect.Parameter.empty`` for none and ``...``
    where the stub does not say; ``self`` dropped."""
    args = fn.args.posonlyargs + fn.args.args
    if bound:
        args = args[1:]
    defaults: list[Any] = [inspect.Parameter.empty] * (len(args) - len(fn.args.defaults))
    defaults += [ast.literal_eval(d) for d in fn.args.defaults]
    out = list(zip([a.arg for a in args], defaults, strict=True))
    for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults, strict=True):
        out.append((a.arg, inspect.Parameter.empty if d is None else ast.literal_eval(d)))
    return out


def _runtime_params(fn: Any) -> list[tuple[str, Any]]:
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.default) for p in params]


def test_the_stub_names_exactly_the_public_names_of_the_module() -> None:
    tree = _stub()
    stub = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            stub.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stub.add(node.target.id)
    runtime = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert runtime - stub == set(), f"exported by sensai._core but missing from {STUB.name}"
    assert stub - runtime == set(), f"in {STUB.name} but not exported by sensai._core"


@pytest.mark.parametrize(
    "name", sorted(n for n in dir(_core) if isinstance(getattr(_core, n), type))
)
def test_each_class_member_is_in_the_stub_with_its_kind_and_signature(name: str) -> None:
    cls = getattr(_core, name)
    classes = _stub_classes()
    assert name in classes, f"class {name} is missing from {STUB.name}"
    stub = _members(classes[name])
    runtime = {n: v for n, v in vars(cls).items() if n not in INHERITED}
    assert set(runtime) - set(stub) == set(), f"{name}: members missing from {STUB.name}"
    assert set(stub) - set(runtime) == set(), f"{name}: members {STUB.name} has but the class lacks"
    for member, value in runtime.items():
        node = stub[member]
        what = f"{name}.{member}"
        assert _stub_kind(node) == _runtime_kind(value), f"{what}: the stub says another kind"
        if _runtime_kind(value) == "property":
            continue
        assert isinstance(node, ast.FunctionDef)
        got = _stub_params(node, bound=_runtime_kind(value) == "method")
        want = _runtime_params(getattr(cls, member))
        assert [n for n, _ in got] == [n for n, _ in want], f"{what}: parameter names differ"
        for (param, stub_default), (_, default) in zip(got, want, strict=True):
            if default is inspect.Parameter.empty or stub_default is inspect.Parameter.empty:
                assert stub_default is default, f"{what}({param}): only one side has a default"
            elif default is not ...:  # PyO3 shows `...` for one it cannot render (Some(30.0))
                assert stub_default == default, f"{what}({param}): default {stub_default!r}"


def test_module_functions_match_their_stubs() -> None:
    tree = _stub()
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name, node in funcs.items():
        want = _runtime_params(getattr(_core, name))
        assert _stub_params(node, bound=False) == want, name


def test_every_stub_class_and_method_says_what_it_is_for() -> None:
    missing = []
    for cls in _stub_classes().values():
        if ast.get_docstring(cls) is None:
            missing.append(cls.name)
        for member, node in _members(cls).items():
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) is None:
                missing.append(f"{cls.name}.{member}")
    assert missing == [], f"without a docstring in {STUB.name}"
