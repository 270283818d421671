"""The package's shape: one folder a stage, layered, no import cycles (docs/architecture.md).

Every ``sage_nn`` import of every module is read from the source (imports inside functions
too): a module may import only from its own layer or an earlier one, no two modules import
each other through any chain (names imported only for type checkers count: a reader of one
module needs the other), no module reaches into another's private names, every module over
about 500 lines says at its top why it is one module, and a package's lazy public names
each come from a public module that defines them.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "sage_nn"
#: the layers, earliest first: shared helpers, then the stages in pipeline order
LAYERS = ["common", "model", "tasks", "discovery", "dictionaries", "evaluation", "report",
          "pipeline", "cli"]
#: the public face: re-exports every stage
FACADE = {"sage_nn"}
LONG = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, typing: bool = False) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every sage_nn import in ``path`` (relative ones resolved);
    ``typing``: with those only type checkers make."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if not typing and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "sage_nn"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sage_nn":
                continue
            names = [a.name for a in node.names]
            # `from .pkg import module` imports the module
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules()]
            found += [(s, []) for s in subs] or [(target, names)]
    return found


def layer(name: str) -> int:
    part = name.split(".")[1]
    return LAYERS.index(part)


def graph(typing: bool = False) -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        if name in FACADE:
            continue
        targets = set()
        for target, _ in imports(name, path, typing):
            while target not in mods and "." in target:  # a name inside a module
                target = target.rpartition(".")[0]
            if target != name and target not in FACADE:
                targets.add(target)
        edges[name] = targets
    return edges


def test_every_module_belongs_to_a_layer():
    names = [n for n in modules() if n not in FACADE]
    unknown = [n for n in names if n.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_no_import_from_a_later_stage():
    upward = [f"{a} imports {b}" for a, targets in graph().items() for b in targets
              if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges, state, stack, cycles = graph(typing=True), {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_used_across_modules():
    """A private helper another module needs has no home yet: give it one."""
    found = []
    mods = modules()
    for name, path in mods.items():
        for target, names in imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                found.append(f"{name} imports {private} from {target}")
    assert not found, "\n".join(found)


def test_long_modules_say_why():
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > LONG and "one module because" not in text[:3000].lower():
            long.append(f"{name}: {text.count(chr(10))} lines")
    assert not long, "modules over ~500 lines without a reason at their top:\n" + "\n".join(long)


def test_the_architecture_page_names_every_package_and_only_those():
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`sage_nn/(\w+)/`", page))
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert named == packages, (named, packages)


def test_no_module_aliases():
    """A module has one path: no finder or alias module maps old names to new ones."""
    assert not (PACKAGE / "_compat.py").exists()
    finders = [type(f).__module__ for f in __import__("sys").meta_path]
    import sage_nn  # noqa: F401

    assert [type(f).__module__ for f in __import__("sys").meta_path] == finders
    assert not [n for n in finders if n.startswith("sage_nn")]


@pytest.mark.parametrize("package", sorted(n for n, p in modules().items()
                                           if p.name == "__init__.py" and
                                           "lazy_exports(" in p.read_text()))
def test_lazy_names_come_from_public_modules_that_define_them(package):
    """``sage_nn.model.tokenizer`` once named a script's global (running the script on
    access): every lazy name must be defined by a public module of its package."""
    import importlib

    module = importlib.import_module(package)
    wrong = [f"{name} -> {home}" for name, home in module.__getattr__.homes.items()
             if home.startswith("_") or
             name not in vars(importlib.import_module(f"{package}.{home}"))]
    assert not wrong, wrong
