"""Imports run one way (docs/DESIGN.md): a static check over every import in src/cotune, late ones included.

``commands → service → training → tenants → engines → adapters``; ``tasks`` know no engine, no adapter and
no tenant; ``adapters/base.py`` never imports the families; no module takes another package's private name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "cotune"
ALL = {"adapters", "engines", "tasks", "tenants", "training", "service", "commands", "cli"}
#: what each package must never import
FORBID = {
    "adapters": ALL - {"adapters"},
    "engines": {"tasks", "tenants", "service", "training", "commands", "cli"},
    "tasks": {"adapters", "engines", "tenants", "service", "training", "commands", "cli"},
    "tenants": {"service", "training", "commands", "cli"},
    "training": {"service", "commands", "cli"},
    "service": {"commands", "cli"},
    "models": ALL,
    "config": ALL,
    "errors": ALL | {"models", "config"},
}


def cross_package_imports():
    """``(file, its package, line, the other package, imported names)`` for every import of another package."""
    for f in sorted(ROOT.rglob("*.py")):
        pkg = f.relative_to(ROOT).parts[0].removesuffix(".py")
        for line, module, names in imports(f):
            parts = module.split(".")
            if parts[0] == "cotune" and len(parts) > 1 and parts[1] != pkg:
                yield f.relative_to(ROOT), pkg, line, module, names


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
    return out


def test_packages_import_downward_only():
    bad = [
        f"{f}:{line}: {pkg} imports {module}"
        for f, pkg, line, module, _ in cross_package_imports()
        if module.split(".")[1] in FORBID.get(pkg, ())
    ]
    assert not bad, "\n".join(bad)
    assert len(list(ROOT.rglob("*.py"))) > 50  # the walk really saw the package


def test_the_contract_does_not_import_the_families():
    mods = [m for _, m, _ in imports(ROOT / "adapters" / "base.py")]
    assert not any(m.startswith("cotune.adapters.families") for m in mods), mods
    assert any(m.startswith("cotune.adapters.families") for _, m, _ in imports(ROOT / "adapters" / "registry.py"))


def test_no_private_name_crosses_a_package():
    bad = [
        f"{f}:{line}: {[n for n in names if n.startswith('_')]} from {module}"
        for f, _, line, module, names in cross_package_imports()
        if any(n.startswith("_") and n != "__version__" for n in names)
    ]
    assert not bad, "\n".join(bad)
