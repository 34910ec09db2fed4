"""The Portkey gateway side: npm `@portkey-ai/gateway` in its own folder (installed on first use).

Started as its README says (`--port=N --headless`) with the machine's Node; requests name the
OpenAI provider and point it at the benchmark's upstream with `x-portkey-custom-host`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Service

FOLDER = Path(__file__).resolve().parent / ".portkey"
DEFAULT_SPEC = "@portkey-ai/gateway@1.15.2"
START = FOLDER / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def headers(upstream_base: str) -> list[str]:
    """What every request to Portkey carries: the provider, where it is, the upstream's key."""
    return [
        "x-portkey-provider: openai",
        f"x-portkey-custom-host: {upstream_base}",
        "authorization: Bearer sk-upstream-bench",
    ]


def ensure_installed(spec: str = DEFAULT_SPEC, log: Path | None = None) -> str:
    """`npm install` `spec` into bench/.portkey unless it is there; the installed version."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (Portkey is a Node package)")
    marker = FOLDER / ".installed-spec"
    if not (START.exists() and marker.exists() and marker.read_text() == spec):
        print(f"bench: installing {spec} into {FOLDER} (first use)...", file=sys.stderr, flush=True)
        FOLDER.mkdir(exist_ok=True)
        (FOLDER / "package.json").write_text('{"name": "bench-portkey", "private": true}\n')
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", spec],
                cwd=FOLDER,
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        marker.write_text(spec)
    package = FOLDER / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
    return str(json.loads(package.read_text())["version"])


def start(workdir: Path, port: int, cpus: Sequence[int] | None) -> Service:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed")
    service = Service(
        "portkey",
        [node, str(START), f"--port={port}", "--headless"],
        workdir / "portkey.log",
        env={"NODE_ENV": "production"},
        cpus=cpus,
    )
    service.wait_for_port(port, timeout=60)
    return service
