"""The gRPC runtime defaults `llm-gateway` applies before grpc loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server.grpc_runtime import GRPC_EXPERIMENTS, apply_grpc_defaults

# Fails the import of grpc unless GRPC_EXPERIMENTS was set before it (grpc reads it on load).
_GUARD = """
import importlib.abc, os, sys

class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and "GRPC_EXPERIMENTS" not in os.environ:
            raise RuntimeError("grpc was imported before the gateway set GRPC_EXPERIMENTS")
        return None

sys.meta_path.insert(0, Guard())
os.environ.pop("GRPC_EXPERIMENTS", None)
"""


def test_defaults_fill_in_only_what_the_operator_left_unset() -> None:
    environ: dict[str, str] = {}
    apply_grpc_defaults(environ)
    assert environ == {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}
    chosen = {"GRPC_EXPERIMENTS": ""}  # an operator asking for grpc's stock behaviour
    apply_grpc_defaults(chosen)
    assert chosen == {"GRPC_EXPERIMENTS": ""}


def test_the_cli_sets_them_before_grpc_loads(tmp_path: Path) -> None:
    # `keys list` imports grpc (through server.errors) right after parsing; `serve` later still.
    code = _GUARD + (
        "from server.cli import main\n"
        f"code = main(['keys', 'list', '--sqlite-path', {str(tmp_path / 'g.db')!r}])\n"
        "assert 'grpc' in sys.modules, 'the command never loaded grpc: the test proves nothing'\n"
        "print('exit', code, os.environ['GRPC_EXPERIMENTS'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"exit 0 {GRPC_EXPERIMENTS}", result.stdout
