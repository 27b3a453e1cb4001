"""gRPC and gevent never share a process; the generated modules match protos/."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GRPC_IMPORT = re.compile(r"^\s*(import grpc|from grpc[\w.]* import|import grpc_\w+)", re.MULTILINE)


def test_only_reapi_and_grpc_extensions_import_grpc() -> None:
    offenders = []
    for path in (REPO / "app").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("app/reapi/") or re.match(r"app/extensions/grpc_", rel):
            continue
        if GRPC_IMPORT.search(path.read_text(encoding="utf-8")):
            offenders.append(rel)
    assert offenders == []


def test_http_side_imports_do_not_load_grpc() -> None:
    code = ("import sys, importlib\n"
            "for name in ('app.settings', 'app.metrics', 'app.storage.store', 'app.http'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError as exc:\n"
            "        if exc.name != name: raise\n"
            "loaded = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'app.reapi')))\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_generated_modules_are_up_to_date() -> None:
    """Byte-identical regeneration, checked with the grpcio-tools version that made them."""
    from importlib.metadata import version

    import pytest

    header = (REPO / "app/reapi/gen/__init__.py").read_text(encoding="utf-8").splitlines()[0]
    made_with = re.search(r"grpcio-tools (\S+?)\.?$", header)
    if made_with is None or made_with.group(1) != version("grpcio-tools"):
        pytest.skip(f"generated with {header!r}; installed grpcio-tools {version('grpcio-tools')}")
    result = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
