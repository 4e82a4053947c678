"""The dependency direction of docs/design.md: the layer table read from the document, every
import in mipsec/ checked against it, no cycle between packages, and no I/O below mipsec.io."""

from __future__ import annotations

import ast
import functools
import pathlib
import re
import shutil
from collections.abc import Iterator
from typing import Any

import mipsec

ROOT = pathlib.Path(mipsec.__file__).parent
DESIGN = ROOT.parent / "docs" / "design.md"

IO_MODULES = {"socket", "fcntl", "select", "time", "asyncio", "threading", "subprocess", "signal"}
# The daemon layer: I/O adapters, the lab, the CLI and the daemon configuration loader (which
# checks that configured interfaces exist).
ALLOWED = {"io", "lab", "cli", "config.py", "__main__.py"}
# The etcd binding store's client: a blocking I/O adapter that only the daemon calls (its
# deadline and retry pause read the clock); the roles see none of it.
ALLOWED_FILES = {"store/etcd.py"}


# --- the table ------------------------------------------------------------------------------------

def layer_table(text: str) -> dict[str, set[str]]:
    """{package: the packages it may import directly} from the "Layers" section's table: the
    first column names packages (`mipsec.x`), the last lists short names or "nothing"."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= {"-", " "}:
            continue
        packages = re.findall(r"`mipsec\.(\w+)`", cells[0])
        if not packages:
            continue                                        # the header row
        allowed = set() if cells[-1] == "nothing" else {
            name.strip() for name in cells[-1].split(",") if name.strip()}
        for package in packages:
            table[package] = allowed
    unknown = {name for allowed in table.values() for name in allowed} - set(table)
    assert not unknown, f"design.md's layer table names packages it has no row for: {unknown}"
    return table


def may_import(table: dict[str, set[str]]) -> dict[str, set[str]]:
    """The transitive closure: what each package may import directly or through a lower one."""
    closure: dict[str, set[str]] = {}

    def visit(package: str, path: tuple[str, ...]) -> set[str]:
        assert package not in path, f"the layer table has a cycle: {' -> '.join(path)}"
        if package not in closure:
            reach = set(table[package])
            for lower in table[package]:
                reach |= visit(lower, (*path, package))
            closure[package] = reach
        return closure[package]

    for package in table:
        visit(package, ())
    return closure


# --- the code --------------------------------------------------------------------------------------

def package_of(rel: pathlib.Path) -> str:
    """mipsec/wire/esp.py -> "wire"; mipsec/cli.py -> "cli"; mipsec/__init__.py -> ""."""
    first = rel.parts[0]
    return "" if first == "__init__.py" else first.removesuffix(".py")


def mipsec_imports(path: pathlib.Path, root: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line, package) for every import of another part of mipsec in one file, at any depth
    (lazy imports in functions count: they are dependencies all the same)."""
    rel = path.relative_to(root)
    here = ["mipsec", *rel.with_suffix("").parts]
    if here[-1] == "__init__":
        here = here[:-1]
    else:
        here = here[:-1]                   # the package that holds the module
    for node in _import_nodes(path.read_text()):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from mipsec import x`: x is a package or module of mipsec, or the version
            names = ([f"{module}.{alias.name}" for alias in node.names]
                     if module == "mipsec" else [module])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "mipsec":
                continue
            target = parts[1] if len(parts) > 1 else ""
            if target and not ((root / target).is_dir() or (root / f"{target}.py").is_file()):
                target = ""                         # an attribute of mipsec itself (__version__)
            yield node.lineno, target


@functools.cache
def _import_nodes(source: str) -> tuple[ast.Import | ast.ImportFrom, ...]:
    """The import statements of a module, at any depth (cached by source: the copies of the
    tree the tests below make parse once)."""
    return tuple(node for node in _statements(ast.parse(source).body)
                 if isinstance(node, (ast.Import, ast.ImportFrom)))


def _statements(nodes: list[Any]) -> Iterator[Any]:
    """Every statement, at any depth (function and class bodies, branches, handlers, match
    cases): an import is a statement, so the expressions, most of a tree, need no visit."""
    for node in nodes:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _statements(inner)


def layering_problems(root: pathlib.Path, design_text: str) -> list[str]:
    """Every import in the package at ``root`` that the table does not allow, every package the
    table has no row for, and every cycle between packages."""
    table = layer_table(design_text)
    allowed = may_import(table)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        package = package_of(rel)
        if package and package not in table:
            problems.append(f"{rel}: package {package!r} has no row in design.md's layer table")
            continue
        for line, target in mipsec_imports(path, root):
            if not target or target == package:
                continue
            graph.setdefault(package, set()).add(target)
            if package and target not in allowed[package]:
                problems.append(f"{rel}:{line}: {package} imports {target}, which the layer "
                                f"table does not allow (it may import "
                                f"{', '.join(sorted(allowed[package])) or 'nothing'})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each package that is on one (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}                      # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


# --- the tests -------------------------------------------------------------------------------------

def test_imports_follow_the_layer_table_of_design_md():
    problems = layering_problems(ROOT, DESIGN.read_text())
    assert not problems, "\n".join(problems)


def test_the_table_is_read_as_written():
    table = layer_table(DESIGN.read_text())
    allowed = may_import(table)
    assert table["drops"] == set()
    assert allowed["wire"] == {"errors", "drops", "constants"}
    assert "node" in allowed["io"] and "io" not in allowed["node"]
    assert "cli" not in allowed["lab"] and "lab" in allowed["cli"]


def _copy_of_mipsec(tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / "mipsec"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_an_injected_back_arrow_is_caught(tmp_path):
    copy = _copy_of_mipsec(tmp_path)
    assert layering_problems(copy, DESIGN.read_text()) == []
    # a codec that reaches up into the roles, lazily inside a function
    (copy / "wire" / "probe.py").write_text(
        "def f():\n    from mipsec.node.actions import SendToNet\n    return SendToNet\n")
    problems = layering_problems(copy, DESIGN.read_text())
    assert problems[0].startswith("wire/probe.py:2: wire imports node, which the layer table "
                                  "does not allow"), problems
    # and, since the roles import the codecs, a cycle
    assert problems[1:] == ["import cycle: node -> ike -> ipsec -> wire -> node"], problems


def test_the_lab_importing_the_cli_is_a_back_arrow_and_a_cycle(tmp_path):
    copy = _copy_of_mipsec(tmp_path)
    (copy / "lab" / "probe.py").write_text("from mipsec import cli\n")
    problems = layering_problems(copy, DESIGN.read_text())
    assert any("lab/probe.py:1: lab imports cli" in p for p in problems), problems
    assert any(p.startswith("import cycle:") and "cli" in p and "lab" in p
               for p in problems), problems


def test_a_patched_table_fails_the_real_tree():
    # the io row no longer allows config: the daemon's import of its configuration is caught
    text = DESIGN.read_text()
    patched = re.sub(r"(\| `mipsec\.io` .*\|)\s*config\s*\|", r"\1 node |", text)
    assert patched != text
    problems = layering_problems(ROOT, patched)
    assert any("io/daemon.py" in p and "io imports config" in p for p in problems), problems


def test_a_package_without_a_row_is_reported(tmp_path):
    copy = _copy_of_mipsec(tmp_path)
    (copy / "newpart").mkdir()
    (copy / "newpart" / "__init__.py").write_text("")
    problems = layering_problems(copy, DESIGN.read_text())
    assert problems == ["newpart/__init__.py: package 'newpart' has no row in design.md's "
                        "layer table"], problems


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# --- no I/O below mipsec.io ------------------------------------------------------------------------

def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in _import_nodes(path.read_text()):       # parsed once for both checks
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_io_below_the_io_layer():
    offenders = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ALLOWED or rel.as_posix() in ALLOWED_FILES:
            continue
        bad = _imports(path) & IO_MODULES
        if bad:
            offenders[str(rel)] = sorted(bad)
    assert not offenders, f"I/O imports below mipsec.io: {offenders}"


def test_the_check_sees_io_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import socket\nfrom time import monotonic\n")
    assert {"socket", "time"} <= _imports(probe)
