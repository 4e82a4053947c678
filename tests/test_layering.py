"""The dependency direction of docs/design.md: no I/O below mipsec.io."""

import ast
import pathlib

import mipsec

ROOT = pathlib.Path(mipsec.__file__).parent
IO_MODULES = {"socket", "fcntl", "select", "time", "asyncio", "threading", "subprocess", "signal"}
# The daemon layer: I/O adapters, the lab, the CLI and the daemon configuration loader (which
# checks that configured interfaces exist).
ALLOWED = {"io", "lab", "cli.py", "config.py", "__main__.py"}
# The etcd binding store's client: a blocking I/O adapter that only the daemon calls (its
# deadline and retry pause read the clock); the roles see none of it.
ALLOWED_FILES = {"store/etcd.py"}


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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
