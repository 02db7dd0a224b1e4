"""The layers of docs/design.md: imports run one way, datamodules → lightning_modules → rewards → msrl.

Every import counts, also one inside a function: a lower layer never reaches a higher one, and no
two rooms (second-level packages or modules) import each other through any chain.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "rewards", "msrl")
# lowest first; a module belongs to the longest prefix that names it
LAYERS = ("datamodules", "lightning_modules", "rewards", "msrl.evaluation", "msrl.samples", "msrl.export", "msrl.study",
          "msrl.commands", "msrl.cli")


def module_name(path: Path) -> str:
    """`lightning_modules.ppo.module` for lightning_modules/ppo/module.py (`…/__init__.py`: the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every msrl-internal module imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def layer(module: str) -> int:
    """Index in LAYERS of the layer a module belongs to (the package `msrl` itself: the top)."""
    matches = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return max(matches, key=lambda i: len(LAYERS[i])) if matches else len(LAYERS)


def room(module: str) -> str:
    """The second-level package or module: `lightning_modules.ppo`, `rewards.slice2d`, `msrl.commands`."""
    return ".".join(module.split(".")[:2])


def graph() -> dict[str, set[str]]:
    """module → the msrl modules it imports, for every file of the four packages."""
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(files) > 40, "the packages were not found"
    return {module_name(p): imports_of(p) for p in files}


def test_no_lower_layer_imports_a_higher_one() -> None:
    wrong = [f"{module} (layer {LAYERS[layer(module)] if layer(module) < len(LAYERS) else 'msrl'}) imports {target}"
             for module, targets in graph().items() for target in targets if layer(target) > layer(module)]
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circle_between_rooms() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in graph().items():
        for target in targets:
            if room(target) != room(module):
                edges.setdefault(room(module), set()).add(room(target))
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " → ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The scan finds an import hidden inside a function (what the layers forbid most often)."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from msrl.evaluation.metrics import fid\n    import rewards.rules\n")
    assert imports_of(source) == {"msrl.evaluation.metrics", "rewards.rules"}
    assert layer("datamodules.base") < layer("lightning_modules.ppo.module") < layer("rewards.rules") \
        < layer("msrl.evaluation.metrics") < layer("msrl.commands.evaluate") < layer("msrl.cli")
