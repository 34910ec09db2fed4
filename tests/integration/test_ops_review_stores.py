"""Review of issue 15 item 3 (explicit key store) as a careless operator.

- `keys` commands against a key store that cannot be opened (Postgres down, wrong port): one
  clear line saying which store and why, exit 1; no Python traceback, no DSN password.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_hardening_shutdown_review import free_port
from tests.process_harness import clean_env

PASSWORD = "S3cr3t-pg-PW"


@pytest.mark.parametrize("command", [["list"], ["create", "--org", "acme"]])
def test_keys_against_an_unreachable_postgres_key_store_fail_clearly(
    tmp_path: Path, command: list[str]
) -> None:
    port = free_port()  # nothing listens there
    dsn = f"postgresql://gw:{PASSWORD}@127.0.0.1:{port}/gw"
    done = subprocess.run(
        [sys.executable, "-m", "server", "keys", *command],
        cwd=tmp_path,
        env=clean_env({"LLMGW_KEY_STORE": "postgres", "LLMGW_POSTGRES_DSN": dsn}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"cannot open the key store postgres postgresql://gw:***@127.0.0.1:{port}/gw" in done.stderr, (
        done.stderr
    )
    assert PASSWORD not in done.stderr + done.stdout
    assert done.stdout == ""
