"""The scoring core and the nightly run's stages take typed parameters (issue 54): no function of
``inference/`` or ``enrich/`` has a parameter annotated ``Any``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import catalog_enrichment

pytestmark = pytest.mark.timeout(60)

PACKAGES = ("inference", "enrich")


def _any_parameters(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None and isinstance(arg.annotation, ast.Name) and arg.annotation.id == "Any":
                found.append(f"{path.name}:{node.lineno} {node.name}({arg.arg}: Any)")
    return found


def test_no_parameter_of_the_scoring_core_or_the_stages_is_typed_any() -> None:
    root = Path(catalog_enrichment.__file__).parent
    files = [p for package in PACKAGES for p in sorted((root / package).glob("*.py"))]
    assert files
    assert [hit for p in files for hit in _any_parameters(p)] == []


def test_the_check_finds_a_parameter_typed_any(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from typing import Any\n\ndef f(a: int, *, b: Any) -> None: ...\n")
    assert _any_parameters(module) == ["m.py:3 f(b: Any)"]
