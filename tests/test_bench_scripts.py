"""The bench scripts are not run by the suite (they take minutes to hours), so at least check
that what each imports from ``bench/common.py`` exists there: a rename in one place once broke
``bench/families.py`` without any test noticing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py"))
def test_bench_script_imports_what_common_has(script: str) -> None:
    common = _defined(ast.parse((BENCH / "common.py").read_text()))
    tree = ast.parse((BENCH / script).read_text())
    wanted = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "common"
              for a in node.names}
    assert wanted <= common, f"{script} imports {sorted(wanted - common)} that bench/common.py does not define"
