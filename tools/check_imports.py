"""Architecture check for src/tunesmith: the layer order, no import cycles, no function over 80 lines.

    python tools/check_imports.py [SRC_PACKAGE_DIR]     (default: src/tunesmith)

Prints one line per violation and exits 1 if there is any. Every import counts, including those inside
functions: a deferred import is still a dependency, and a cycle through one still makes the modules
impossible to understand, test or move apart. `make lint` (and so `make test`) runs it.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# Bottom to top. A module may import modules of its own package and of packages in lower rows; the
# packages of one row are independent of each other (serve and report never import one another).
LAYERS: list[tuple[str, ...]] = [
    ("errors",),  # the error vocabulary every layer raises, fsio's checks included
    ("__init__", "fsio", "hardware", "cores", "registry", "logs", "orphans"),  # the package root and helpers
    ("runs",),
    ("run_registry",),
    ("champions",),
    ("config",),
    ("models",),
    ("data",),
    ("tasks",),
    ("train",),
    ("evaluate",),
    ("fairness",),
    ("optimize",),
    ("serve", "report"),
    ("pipeline",),
    ("select", "tune"),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, row in enumerate(LAYERS) for name in row}
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Edge:
    src: str    # importing module, dotted (tunesmith.train.trainer)
    dst: str    # imported module, dotted
    where: str  # file:line of the import


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(root: Path, name: str) -> str | None:
    """The module `name` resolves to inside the package (a module or a package's __init__), or None."""
    base = root.parent / Path(*name.split("."))
    return name if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() else None


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for an attribute chain rooted at a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else None


def _imported(root: Path, src: str, is_package: bool, node: ast.AST) -> list[str]:
    """Dotted names of the tunesmith modules one node loads: an import statement (`from a import b` may
    name module a.b), `importlib.import_module("tunesmith....")` with a literal name, or an attribute
    chain `tunesmith.x.y` (after a bare `import tunesmith`)."""
    pkg = root.name
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "import_module") \
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        names = [node.args[0].value]
    elif isinstance(node, ast.Attribute) and (_dotted(node) or "").startswith(pkg + "."):
        names = [_dotted(node)]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the importing module's package
            anchor = src.split(".") if is_package else src.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            module = ".".join(anchor + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        names = [f"{module}.{a.name}" if _target(root, f"{module}.{a.name}") else module for a in node.names]
    else:
        return []
    found = []
    for name in names:
        if name == pkg or not name.startswith(pkg + "."):
            continue
        while name and _target(root, name) is None:  # `import tunesmith.x.attr`: the module part
            name = name.rpartition(".")[0]
        found.append(name)
        # Importing a.b.c runs the __init__ of a and a.b too; a module's own packages are already
        # initialised when it runs, so only the packages of other modules count.
        parent = name.rpartition(".")[0]
        while parent:
            if not src.startswith(parent + "."):
                found.append(parent)
            parent = parent.rpartition(".")[0]
    return [name for name in found if name != pkg or src != pkg]


def edges(root: Path) -> list[Edge]:
    out, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        src = module_name(root, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            for dst in _imported(root, src, path.name == "__init__.py", node):
                if dst != src and (src, dst) not in seen:
                    seen.add((src, dst))
                    out.append(Edge(src, dst, f"{path}:{node.lineno}"))
    return out


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def layer_violations(root: Path, found: list[Edge]) -> list[str]:
    problems = []
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    for layer in sorted({_layer(m) for m in modules} - set(RANK)):
        problems.append(f"{root / layer}: not in any layer of tools/check_imports.py LAYERS (add it where it belongs)")
    for e in found:
        a, b = _layer(e.src), _layer(e.dst)
        if a == b or a not in RANK or b not in RANK:
            continue
        if RANK[b] > RANK[a]:
            problems.append(f"{e.where}: {e.src} imports {e.dst}, a higher layer ({a} < {b} in the layer order)")
        elif RANK[b] == RANK[a]:
            problems.append(f"{e.where}: {e.src} imports {e.dst}; {a} and {b} are independent layers")
    return problems


def cycles(found: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in found:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        result.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return result


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    problems.append(f"{path}:{node.lineno}: {node.name} is {lines} lines (at most {limit})")
    return problems


def check(root: Path) -> list[str]:
    found = edges(root)
    problems = layer_violations(root, found)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(found)]
    return problems + long_functions(root)


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "src/tunesmith").resolve()
    problems = check(root)
    for line in problems:
        print(line)
    print(f"check_imports: {len(problems)} problem(s) in {root}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
