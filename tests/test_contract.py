"""The contract stays honest: generated code is fresh, buf lint is clean, shared requests agree."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

from llmgateway.v1 import chat_pb2

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (it comes with the dev extras)"
    return path


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts/generate-protos"), str(tmp_path)], check=True, env=env)
    fresh = tmp_path / "llmgateway"
    checked_in = ROOT / "generated" / "llmgateway"
    stale = []
    for path in sorted(fresh.rglob("*")):
        if path.is_file():
            other = checked_in / path.relative_to(fresh)
            if not other.exists() or not filecmp.cmp(path, other, shallow=False):
                stale.append(str(path.relative_to(fresh)))
    extra = [
        str(p.relative_to(checked_in))
        for p in checked_in.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not (fresh / p.relative_to(checked_in)).exists()
    ]
    assert not stale and not extra, f"run `make generate`: stale {stale}, extra {extra}"


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([_tool("buf"), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_build_compiles_the_contract(tmp_path: Path) -> None:
    out = tmp_path / "image.binpb"
    result = subprocess.run([_tool("buf"), "build", "-o", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_the_three_chat_requests_are_wire_identical() -> None:
    def shape(message: type) -> list[tuple[str, int, int, str]]:
        return [
            (f.name, f.number, f.type, f.message_type.full_name if f.message_type else "")
            for f in message.DESCRIPTOR.fields
        ]

    create = shape(chat_pb2.CreateRequest)
    assert create == shape(chat_pb2.StreamCreateRequest) == shape(chat_pb2.CountTokensRequest)


def test_ruff_is_clean() -> None:
    result = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
