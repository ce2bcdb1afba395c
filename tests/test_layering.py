"""Dependencies point one way: the backends' interfaces never import an implementation.

    server/backends/            speech.py llm.py errors.py tool_loop.py   interfaces,
      │                         configured_llm.py configured_speech.py    the choosers
      ▼ (only the choosers)
    openai/ kyutai/ embedded/ builtin/                                     implementations

Read from the source with ``ast`` (an import inside a function counts too), so a new
module at the top of ``backends/`` is checked without being listed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server"
BACKENDS = SERVER / "backends"
IMPLEMENTATIONS = ("openai", "kyutai", "embedded", "builtin")
CHOOSERS = {"configured_llm", "configured_speech"}
"""The choice by configuration: the one place that names implementations."""


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute; ``from x import y`` counts ``x.y`` too
    (``y`` may be a submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def implementation_imports(path: Path) -> list[str]:
    return sorted(module for module in imported(path)
                  for kind in IMPLEMENTATIONS
                  if module == f"server.backends.{kind}"
                  or module.startswith(f"server.backends.{kind}."))


TOP = sorted(path for path in BACKENDS.glob("*.py") if path.stem not in CHOOSERS)


@pytest.mark.parametrize("path", TOP, ids=[path.name for path in TOP])
def test_an_interface_imports_no_implementation(path: Path) -> None:
    assert implementation_imports(path) == []


def test_the_check_sees_an_implementation_import() -> None:
    """The choosers do import implementations: the check above is not vacuous."""
    assert "server.backends.kyutai.stt" in implementation_imports(
        BACKENDS / "configured_speech.py")
    assert "server.backends.openai.chat" in implementation_imports(
        BACKENDS / "configured_llm.py")


def test_each_implementation_is_a_package_below_backends() -> None:
    for kind in IMPLEMENTATIONS:
        assert (BACKENDS / kind / "__init__.py").is_file(), kind


IMPLEMENTATION_FILES = sorted(path for kind in IMPLEMENTATIONS
                              for path in (BACKENDS / kind).rglob("*.py"))


@pytest.mark.parametrize("path", IMPLEMENTATION_FILES,
                         ids=[str(path.relative_to(BACKENDS)) for path in IMPLEMENTATION_FILES])
def test_an_implementation_depends_on_interfaces_not_on_its_chooser_or_siblings(
        path: Path) -> None:
    """kyutai/ does not borrow embedded/'s types and the reverse: shared types live
    in the interfaces (or ``audio``)."""
    own = path.relative_to(BACKENDS).parts[0]
    others = {f"server.backends.{kind}" for kind in IMPLEMENTATIONS if kind != own}
    others |= {f"server.backends.{name}" for name in CHOOSERS}
    wrong = sorted(module for module in imported(path)
                   if any(module == other or module.startswith(other + ".")
                          for other in others))
    assert wrong == []


@pytest.mark.parametrize("path", sorted((SERVER / "audio").glob("*.py")),
                         ids=lambda path: path.name)
def test_audio_depends_on_no_backend(path: Path) -> None:
    assert [module for module in imported(path)
            if module.startswith("server.") and not module.startswith("server.audio")] == []
