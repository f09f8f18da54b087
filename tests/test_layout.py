"""The package's shape, read from its source: MLflow behind one door (only kd_mlflow/tracking/
imports mlflow), and no import circles between its modules, deferred imports inside
functions included (a circle hidden in a function is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kd_mlflow"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict, missing: list | None = None) -> tuple[set, set]:
    """-> (kd_mlflow modules it imports anywhere in the file, other top-level packages);
    ``missing`` collects the kd_mlflow modules it names that do not exist."""
    inside, outside = set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kd_mlflow"):
                    inside.add(alias.name)
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("kd_mlflow"):
                outside.add(target.split(".")[0])
                continue
            if target not in known and missing is not None:
                missing.append(f"{name}: from {target} import ...")
            for alias in node.names:
                inside.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in inside if m in known and m != name}, outside


def test_only_tracking_imports_mlflow():
    known = modules()
    offenders = sorted(name for name, path in known.items()
                       if not name.startswith("kd_mlflow.tracking") and "mlflow" in imports(name, path, known)[1])
    assert offenders == [], f"these modules import mlflow outside kd_mlflow/tracking/: {offenders}"


def test_every_import_of_the_package_names_a_module_that_exists():
    """Deferred imports run only when their branch does: one left pointing at a module that
    moved would fail in a user's run, not at import time."""
    known, missing = modules(), []
    for name, path in known.items():
        imports(name, path, known, missing)
    assert missing == [], f"imports of modules that do not exist: {missing}"


def test_no_import_circles():
    known = modules()
    graph = {name: imports(name, path, known)[0] for name, path in known.items()}
    circles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)
