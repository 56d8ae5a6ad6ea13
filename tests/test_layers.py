"""The directions of imports that docs/ARCHITECTURE.md forbids, checked on the source with `ast`.

Every import counts: at the top of a module, inside a function, under `if TYPE_CHECKING:`, relative or absolute.
- bot/ imports nothing of the engine but engine.service, engine.models, engine.errors and engine.config;
- engine/ never imports bot/;
- engine/backends/ never imports engine.scheduler, engine.service or engine.store.
And bot/ never reaches past the facade through an Engine's private attributes (`engine._store`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACADE = ("engine.service", "engine.models", "engine.errors", "engine.config")
ABOVE_BACKENDS = ("engine.scheduler", "engine.service", "engine.store")


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module, e.g. "bot.render"
    target: str  # what it names, e.g. "engine.store.SpendRow" (a module, or a name inside one)
    line: int


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> Iterator[Import]:
    """Every import in one file, relative ones resolved against its package."""
    module = module_name(root, path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            # `from engine import store` names the module engine.store: each imported name is checked as
            # source.name, which for a class (`from engine.models import Job`) still lies inside its module.
            for alias in node.names:
                yield Import(module, f"{source}.{alias.name}", node.lineno)


def forbidden(found: Import) -> str | None:
    """Why this import breaks a layer rule, or None when it keeps to them."""
    importer, target = found.module, found.target
    if _within(importer, ("bot",)) and _within(target, ("engine",)) and not _within(target, FACADE):
        return "bot/ may use only engine.service, engine.models, engine.errors and engine.config"
    if _within(importer, ("engine",)) and _within(target, ("bot",)):
        return "the engine never imports the bot"
    if _within(importer, ("engine.backends",)) and _within(target, ABOVE_BACKENDS):
        return "backends never import the scheduler, the service or the store"
    return None


def violations(root: Path) -> list[str]:
    found = []
    for package in ("bot", "engine"):
        for path in sorted((root / package).rglob("*.py")):
            for imported in sorted(imports_of(root, path), key=lambda found: found.line):
                if (why := forbidden(imported)) is not None:
                    where = path.relative_to(root)
                    found.append(f"{where}:{imported.line}: {imported.module} imports {imported.target}: {why}")
    return found


def private_reaches(path: Path) -> list[str]:
    """`engine._x`, `self.engine._x`, `self._engine._x`: a private attribute read through an engine."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name in ("engine", "_engine"):
                found.append((node.lineno, f"{path.name}:{node.lineno}: {name}.{node.attr}"))
    return [text for _, text in sorted(found)]


def test_the_source_keeps_to_the_layers() -> None:
    assert violations(ROOT) == []


def test_the_bot_reads_no_private_attribute_of_the_engine() -> None:
    assert [reach for path in sorted((ROOT / "bot").rglob("*.py")) for reach in private_reaches(path)] == []


def test_a_private_reach_is_found(tmp_path: Path) -> None:
    path = tmp_path / "front.py"
    path.write_text("async def f(self, engine):\n    await engine._store.get_job('j')\n    self._engine._clock()\n")
    assert private_reaches(path) == ["front.py:2: engine._store", "front.py:3: _engine._clock"]


def test_the_checker_finds_every_kind_of_forbidden_import(tmp_path: Path) -> None:
    """A small tree with each forbidden direction, written each way an import can be, beside allowed ones."""
    sources = {
        "bot/__init__.py": "",
        "bot/front.py": (
            "from engine.service import Engine\n"  # allowed
            "from engine import models, errors\n"  # allowed
            "import engine.config\n"  # allowed
            "def later():\n"
            "    from engine.store import Store\n"  # 5: inside a function
            "from engine import router\n"  # 6: a module named by `from package import`
        ),
        "engine/__init__.py": "",
        "engine/core.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    import bot.front\n"  # 3: under TYPE_CHECKING
            "from engine.backends import pool\n"  # allowed: the engine above uses its backends
        ),
        "engine/backends/__init__.py": "",
        "engine/backends/pool.py": (
            "from ..scheduler import Scheduler\n"  # 1: relative, two levels
            "from engine.models import Job\n"  # allowed
            "from . import base\n"  # allowed: a sibling
            "import engine.store.jobs\n"  # 4: a module inside the store package
        ),
        "engine/backends/local/__init__.py": "from ...service import Engine\n",  # 1: relative, from a package
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    found = violations(tmp_path)

    assert [line.split(": ")[0] for line in found] == [
        "bot/front.py:5",
        "bot/front.py:6",
        "engine/backends/local/__init__.py:1",
        "engine/backends/pool.py:1",
        "engine/backends/pool.py:4",
        "engine/core.py:3",
    ]
    assert "bot.front imports engine.store.Store: bot/ may use only" in found[0]
    assert "engine.backends.local imports engine.service.Engine: backends never import" in found[2]
    assert "engine.core imports bot.front: the engine never imports the bot" in found[5]
