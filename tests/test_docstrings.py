"""Every public name documents itself: numpy-style sections, and examples that run.

(a) ``doctest`` runs every example of each module in :data:`MODULES` (and each must have one);
(b) every public name such a module defines — a name in its package's ``__all__`` (``rrise``,
``rrise.runtime``, ``rrise.calibrate``, ``rrise.export``) — has a ``Parameters`` section when it takes
arguments, ``Returns`` (or ``Yields``) when it returns something, ``Raises`` when its body raises, and
a ``>>>`` example; a certificate's docstring states its guarantee.

A module joins with one line in :data:`MODULES`.
"""

from __future__ import annotations

import ast
import doctest
import inspect
import textwrap
from importlib import import_module
from typing import Any

import pytest

import rrise

MODULES = [
    "rrise.bundle",
    "rrise.bundle_id",
    "rrise.calibration",
    "rrise.certificate",
    "rrise.fileio",
    "rrise.options",
    "rrise.records",
    "rrise.subscriber",
    "rrise.runtime.adaptive",
    "rrise.runtime.options",
    "rrise.runtime.routing",
    "rrise.runtime.runner",
    "rrise.runtime.runtime",
    "rrise.runtime.sinks",
    "rrise.runtime.source_specs",
    "rrise.runtime.stream",
    "rrise.runtime.stream_stats",
    # rrise.runtime and rrise.calibrate modules join here, one line each (e.g. "rrise.runtime.runtime").
]
# Modules that define public names of ``rrise`` whose docstrings their owners are completing; each
# moves into MODULES when it passes (test_every_public_name_of_rrise_is_covered keeps this list honest).
PENDING: set[str] = set()

PACKAGES = ("rrise.runtime", "rrise.calibrate", "rrise.export", "rrise")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _package(module: str) -> Any:
    return import_module(next(p for p in PACKAGES if module == p or module.startswith(p + ".")))


def _public(module: str) -> list[tuple[str, Any]]:
    """The package's public names that ``module`` defines (classes and functions)."""
    package = _package(module)
    out = []
    for name in getattr(package, "__all__", ()):
        obj = getattr(package, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module:
            out.append((name, obj))
    return out


def _takes_arguments(obj: Any) -> bool:
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return True  # an exception takes its message
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") for p in params.values())


def _returns(obj: Any) -> bool:
    if inspect.isclass(obj):
        return False
    annotation = inspect.signature(obj).return_annotation
    return annotation not in (None, "None", inspect.Signature.empty)


def _raises(obj: Any) -> bool:
    """Whether the function (or the class's own ``__init__``/``__post_init__``) raises in its body."""
    targets = (
        [obj]
        if inspect.isfunction(obj)
        else [vars(obj)[m] for m in ("__init__", "__post_init__") if inspect.isfunction(vars(obj).get(m))]
    )
    for fn in targets:
        try:
            source = inspect.getsource(fn)
        except OSError:  # a generated __init__ (dataclasses) has no source and raises nothing itself
            continue
        tree = ast.parse(textwrap.dedent(source))
        body = tree.body[0]
        nested = {
            id(n)
            for f in ast.walk(body)
            if f is not body and isinstance(f, ast.FunctionDef)
            for n in ast.walk(f)
        }
        if any(isinstance(n, ast.Raise) and id(n) not in nested for n in ast.walk(body)):
            return True
    return False


@pytest.mark.parametrize("module", MODULES)
def test_the_examples_run(module):
    mod = import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out: list[str] = []
    for test in finder.find(mod, module):
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{module} has no example"
    assert result.failed == 0, "".join(out)


@pytest.mark.parametrize("module", MODULES)
def test_public_names_have_numpy_sections_and_an_example(module):
    public = _public(module)
    problems = []
    for name, obj in public:
        doc = inspect.getdoc(obj) or ""
        wanted = [">>>"]
        if _takes_arguments(obj):
            wanted.append("Parameters\n----------")
        if _returns(obj) and "Yields\n------" not in doc:
            wanted.append("Returns\n-------")
        if _raises(obj):
            wanted.append("Raises\n------")
        if "Certificate" in name or "Certificate" in str(
            getattr(obj, "__annotations__", {}).get("return", "")
        ):
            wanted.append("uarantee")  # a certificate states what it guarantees
        problems += [f"{module}.{name} lacks {w.splitlines()[0]!r}" for w in wanted if w not in doc]
    assert problems == []


def test_every_public_name_of_rrise_is_covered():
    defined = set()
    for name in rrise.__all__:
        obj = getattr(rrise, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            defined.add(obj.__module__)
    assert defined - PENDING <= set(MODULES)
    assert not PENDING & set(MODULES), "a module that passes leaves PENDING"


def test_the_checks_catch_a_bare_function():
    def bare(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    def quiet() -> None:
        def inner() -> None:
            raise ValueError("only the nested function raises")

    assert _takes_arguments(bare) and _returns(bare) and _raises(bare)
    assert not _takes_arguments(quiet) and not _returns(quiet) and not _raises(quiet)
