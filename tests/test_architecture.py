"""docs/architecture.md held against the code: the modules its map names exist and every
module is on it, and imports point down the layers only (a package may use its own
modules and those of any layer below it, nothing beside or above)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import appchat

PACKAGE = Path(appchat.__file__).parent
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"

# Lowest first, as docs/architecture.md's table; each row a layer of packages.
LAYERS: list[set[str]] = [
    {"protocol"},
    {"common"},
    {"auth", "store", "broker", "blobs"},
    {"chat", "fanout", "webhooks"},
    {"transport"},
    {"app"},
]
RANK = {package: n for n, layer in enumerate(LAYERS) for package in layer}


def modules() -> dict[str, Path]:
    """``protocol/events.py`` -> its path, for every module of the package."""
    return {
        str(path.relative_to(PACKAGE)): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def imported(path: Path) -> set[str]:
    """The package's modules and packages ``path`` imports, as dotted names below
    ``appchat`` (``protocol.events``, ``store``)."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(here[:-1])  # what a relative import starts from, module or __init__
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "appchat":
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(".".join(target))
            else:  # ``from . import x`` at the top: x itself
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "appchat":
                    found.add(".".join(alias.name.split(".")[1:]))
    return {name for name in found if name}


def layer_of(dotted: str) -> str | None:
    top = dotted.split(".")[0]
    return top if top in RANK else None


def test_imports_point_down_the_layers_only() -> None:
    wrong = []
    for name, path in modules().items():
        own = layer_of(name.split("/")[0])
        if own is None:
            continue  # __init__.py and __main__.py of the package itself
        for target in imported(path):
            other = layer_of(target)
            if other is None or other == own:
                continue
            if RANK[other] >= RANK[own]:
                wrong.append(f"{name} imports {target} ({other} is not below {own})")
    assert wrong == []


def test_every_package_is_on_a_layer_and_says_what_it_is() -> None:
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(RANK)
    for package in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"{package}/__init__.py says too little of itself"


def test_the_map_in_the_docs_names_exactly_the_modules_there_are() -> None:
    """Each line of the map that names modules starts with their folder (``./`` for the
    package itself)."""
    text = DOC.read_text()
    block = re.search(r"<!-- map:begin -->(.*?)<!-- map:end -->", text, re.S)
    assert block is not None, "docs/architecture.md has no map block"
    named = set()
    for line in block.group(1).splitlines():
        names = re.findall(r"\b\w+\.py\b", line)
        if not names:
            continue
        folder = line.split()[0]
        assert folder.endswith("/"), f"a map line names no folder first: {line!r}"
        prefix = "" if folder == "./" else folder
        named |= {prefix + name for name in names}
    there = {name for name in modules() if not name.endswith("__init__.py")}
    assert named - there == set(), "the map names modules that do not exist"
    assert there - named == set(), "modules missing from the map"
