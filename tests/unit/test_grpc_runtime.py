"""The gRPC runtime defaults `llm-gateway serve` applies before grpc loads."""

from __future__ import annotations

import subprocess
import sys

from server.grpc_runtime import GRPC_EXPERIMENTS, apply_grpc_defaults


def test_defaults_fill_in_only_what_the_operator_left_unset() -> None:
    environ: dict[str, str] = {}
    apply_grpc_defaults(environ)
    assert environ == {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}
    chosen = {"GRPC_EXPERIMENTS": ""}  # an operator asking for grpc's stock behaviour
    apply_grpc_defaults(chosen)
    assert chosen == {"GRPC_EXPERIMENTS": ""}


def test_serve_applies_them_before_grpc_is_imported() -> None:
    # `_serve` must run before anything imports grpc: importing the CLI must not load it.
    code = (
        "import sys, server.cli\n"
        "assert 'grpc' not in sys.modules, 'the CLI imports grpc before applying its defaults'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
