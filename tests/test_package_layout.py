"""The import graph of the package, read statically (``ast``, imports inside functions included): no import
cycle, every ``dpojax`` import names something that exists, and the layers of ``dpojax.scorers`` hold (the
interface at the bottom, the model scorers above it, the registry on top; the human-feedback package
``dpojax.feedback`` sees only the interface)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCORERS, FEEDBACK = "dpojax.scorers", "dpojax.feedback"
INTERFACE = {f"{SCORERS}.base", f"{SCORERS}.proxies"}  # the bottom layer
REGISTRY = f"{SCORERS}.registry"  # the top layer


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / "dpojax").rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _defined(body: list[ast.stmt]) -> set[str]:
    """The names a module binds at its top level (definitions, assignments, imports; inside if/try too)."""
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                      *(h.body for h in getattr(node, "handlers", []))]
            names |= set().union(*map(_defined, blocks))
    return names


def _imports(name: str, tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every ``dpojax`` import of a module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "dpojax"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            if base.split(".")[0] == "dpojax":
                found += [(base, a.name, node.lineno) for a in node.names]
    return found


IMPORTS = {name: _imports(name, tree) for name, tree in TREES.items()}


def _target(module: str, attr: str | None) -> str:
    """The package module an import runs: the submodule ``module.attr`` when there is one."""
    return f"{module}.{attr}" if attr is not None and f"{module}.{attr}" in MODULES else module


GRAPH = {name: {_target(m, a) for m, a, _ in found if _target(m, a) in MODULES} - {name}
         for name, found in IMPORTS.items()}


def _reachable_cycle(start: str) -> list[str] | None:
    """A path of imports from ``start`` back to it, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(GRAPH[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_package_imports_in_no_circle():
    """Not even through an import inside a function (a lazy import only hides a circle until it runs)."""
    cycles = {tuple(c) for c in map(_reachable_cycle, GRAPH) if c}
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in sorted(cycles))


def test_every_dpojax_import_names_what_exists():
    """No import of a moved or deleted module or name (there are no aliases at old paths)."""
    defined = {name: _defined(tree.body) for name, tree in TREES.items()}
    missing = set()
    for name, found in IMPORTS.items():
        for module, attr, line in found:
            if module not in MODULES:
                missing.add(f"{name}:{line}: no module {module}")
            elif attr is not None and attr != "*" and _target(module, attr) == module and attr not in defined[module]:
                missing.add(f"{name}:{line}: {module} has no {attr}")
    assert not missing, sorted(missing)


def _package(name: str) -> set[str]:
    return {n for n in MODULES if n == name or n.startswith(f"{name}.")}


def _importing(modules: set[str], forbidden: set[str]) -> dict[str, set[str]]:
    """Which of ``modules`` import which of ``forbidden``."""
    return {n: GRAPH[n] & forbidden for n in sorted(modules) if GRAPH[n] & forbidden}


def test_no_scorer_imports_the_registry():
    """Neither the interface nor the model scorers (aesthetic, CLIP, HPS, ImageReward, their batching loop)."""
    scorers = _package(SCORERS) - {REGISTRY}
    assert {f"{SCORERS}.{m}" for m in ("aesthetic", "batched", "clip_scorers", "hps", "imagereward")} <= scorers
    assert REGISTRY in MODULES and not _importing(scorers, {REGISTRY})


def test_the_interface_is_the_bottom_layer():
    """base and proxies import no other scorer module; no scorer module imports the human-feedback package."""
    assert _package(SCORERS) >= INTERFACE
    assert not _importing(INTERFACE, _package(SCORERS) - INTERFACE)
    assert not _importing(_package(SCORERS), _package(FEEDBACK))


def test_human_feedback_sees_only_the_scorer_interface():
    feedback = _package(FEEDBACK)
    assert {f"{FEEDBACK}.rounds", f"{FEEDBACK}.labels", f"{FEEDBACK}.server"} <= feedback
    assert not _importing(feedback, _package(SCORERS) - {f"{SCORERS}.base"})
    assert (ROOT / "dpojax" / "feedback" / "label_page.html").is_file()  # package data of dpojax.feedback
