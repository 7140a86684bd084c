"""The dependency rule of `service/`, read from the source with `ast`: every import at any depth (inside functions
and `if TYPE_CHECKING:` blocks too), relative imports resolved.

- `embedding/`, `index/`, `analysis/` never import `app/`, `api/`, `client/`, `cli/`;
- `client/` imports only `service.types`, `service.errors`, `service.wire` (and itself);
- `wire/` imports only `service.types`, `service.errors` (and itself);
- `types.py`, `errors.py`, `config.py`, `files.py`, `metrics.py` import no subpackage of `service`; `metrics.py`
  imports nothing heavy at module level.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
SUBPACKAGES = sorted(p.name for p in SERVICE.iterdir() if (p / "__init__.py").is_file())
HEAVY = ("torch", "torchvision", "faiss", "PIL", "sklearn", "triton", "cuml", "cupy", "nvidia", "openvino", "scipy")


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module, e.g. `service.client.sync`."""
    target: str
    """What it imports, e.g. `service.wire.convert` (for `from a import b`: `a.b` when `b` is a module, else `a`)."""
    line: int
    top_level: bool
    """At module level (not inside a function or class)."""

    def __str__(self) -> str:
        where = "" if self.top_level else " (inside a function or class)"
        return f"{self.module} imports {self.target} at line {self.line}{where}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SERVICE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    root = SERVICE.parent
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as module level
        if isinstance(node, ast.If | ast.Try):
            top.update(id(n) for n in ast.walk(node))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                target = full if _is_module(full) else source
                found.append(Import(module, target, node.lineno, id(node) in top))
    return found


def all_imports() -> list[Import]:
    out: list[Import] = []
    for path in sorted(SERVICE.rglob("*.py")):
        if "_proto" in path.parts:
            continue
        out += imports_of(path)
    return out


IMPORTS = all_imports()


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(source_package: str, allowed: tuple[str, ...]) -> list[str]:
    return [
        str(i)
        for i in IMPORTS
        if _inside(i.module, source_package)
        and _inside(i.target, "service")
        and i.target != "service"
        and not any(_inside(i.target, a) for a in allowed)
    ]


def test_the_scan_sees_the_tree() -> None:
    # Guards against a rule passing because nothing was scanned.
    modules = {i.module for i in IMPORTS}
    assert {"service.client.sync", "service.wire.convert", "service.types", "service.analysis.cluster"} <= modules
    assert any(i.target == "service.wire.convert" and i.module.startswith("service.client") for i in IMPORTS)
    assert {"embedding", "index", "analysis", "client", "wire", "api", "cli"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("lower", ["service.embedding", "service.index", "service.analysis"])
def test_lower_layers_never_import_the_upper_ones(lower: str) -> None:
    upper = ("service.app", "service.api", "service.client", "service.cli")
    bad = [str(i) for i in IMPORTS if _inside(i.module, lower) and any(_inside(i.target, u) for u in upper)]
    assert not bad, "the layer rule is broken:\n" + "\n".join(bad)


def test_client_imports_only_types_errors_and_wire() -> None:
    bad = _violations("service.client", ("service.client", "service.types", "service.errors", "service.wire"))
    assert not bad, "service/client may import only service.types, service.errors, service.wire:\n" + "\n".join(bad)


def test_wire_imports_only_types_and_errors() -> None:
    bad = _violations("service.wire", ("service.wire", "service.types", "service.errors"))
    assert not bad, "service/wire may import only service.types, service.errors:\n" + "\n".join(bad)


@pytest.mark.parametrize("shared", ["types", "errors", "config", "files", "metrics"])
def test_shared_modules_import_no_subpackage(shared: str) -> None:
    module = f"service.{shared}"
    if not (SERVICE / f"{shared}.py").is_file():
        pytest.fail(f"{module} is missing")
    bad = [
        str(i)
        for i in IMPORTS
        if i.module == module and any(_inside(i.target, f"service.{sub}") for sub in SUBPACKAGES)
    ]
    assert not bad, f"{module} is shared by every layer and may import no subpackage:\n" + "\n".join(bad)


def test_metrics_imports_nothing_heavy_at_module_level() -> None:
    bad = [
        str(i)
        for i in IMPORTS
        if i.module == "service.metrics" and i.top_level and any(_inside(i.target, h) for h in HEAVY)
    ]
    assert not bad, "service.metrics is imported by the API; it may not load heavy packages:\n" + "\n".join(bad)
