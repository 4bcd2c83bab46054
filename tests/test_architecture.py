"""The shape of the library, checked from the source (docs/architecture.md draws it).

- no import cycle among `sslam_core`'s modules, counting imports inside functions;
- each package imports only from the packages below it (the layers below);
- no module of `sslam_core` or `sslam_cli` imports another module's `_private` names;
- `sslam_cli` modules import from the library and from `sslam_cli.options` only (`main` assembles
  the commands), never from each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package may import from itself and from the packages before it.
LAYERS = [
    "errors", "audio", "runs", "data", "models", "inference", "search", "evaluation", "training", "hear",
]  # fmt: skip


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every absolute import of our packages in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ("sslam_core", "sslam_cli"):
                out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("sslam_core", "sslam_cli"):
                    out.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append(("." * node.level + (node.module or ""), [a.name for a in node.names], node.lineno))
    return out


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "sslam_core").rglob("*.py"))}


def resolve(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: `from pkg import mod` names a module, else the module."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return found or ([target] if target in modules else [])


def graph() -> dict[str, set[str]]:
    modules = library_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names, _ in imports(path):
            for dep in resolve(target, names, modules):
                if dep != name and not name.startswith(dep + "."):  # a package's own __init__
                    edges[name].add(dep)
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_relative_imports_and_no_import_cycles():
    modules = library_modules()
    relative = [f"{m}: {t}" for m, p in modules.items() for t, _, _ in imports(p) if t.startswith(".")]
    assert not relative, relative
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_packages_import_only_the_layers_below():
    wrong = []
    for module, deps in graph().items():
        mine = package_of(module)
        if mine not in LAYERS:
            continue
        for dep in deps:
            theirs = package_of(dep)
            if theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_library_module_sits_in_a_layer():
    loose = [m for m in library_modules() if package_of(m) not in (*LAYERS, "")]
    assert not loose, loose


def test_no_module_imports_private_names_of_another():
    found = []
    for folder in ("sslam_core", "sslam_cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for target, names, line in imports(path):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private and target != module_name(path):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {target} {private}")
    assert not found, "\n".join(found)


def test_commands_import_the_library_and_the_options_module_only():
    found = []
    for path in sorted((ROOT / "sslam_cli").glob("*.py")):
        if path.stem in ("main", "__main__", "__init__", "options"):
            continue
        for target, names, line in imports(path):
            if target.startswith("sslam_cli") and target != "sslam_cli.options":
                found.append(f"{path.name}:{line}: {target} {names}")
    assert not found, "\n".join(found)
