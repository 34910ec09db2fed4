"""The LiteLLM proxy side: its own virtualenv (installed on first use), a config, and an offline start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Service

VENV = Path(__file__).resolve().parent / ".venv-litellm"
DEFAULT_SPEC = "litellm[proxy]==1.108.7"
MASTER_KEY = "sk-bench-5f0c1e9a7d3b4c2e8a6f1d0b9c7e5a3f"

# Everything LiteLLM would otherwise fetch or send at start or per request, turned off.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "LITELLM_MASTER_KEY": MASTER_KEY,
    "DISABLE_SCHEMA_UPDATE": "True",
    "NO_DOCS": "True",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_installed(spec: str = DEFAULT_SPEC, log: Path | None = None) -> str:
    """Install `spec` into bench/.venv-litellm unless it is there; the installed litellm version."""
    marker = VENV / ".installed-spec"
    if not (python().exists() and marker.exists() and marker.read_text() == spec):
        print(
            f"bench: installing {spec} into {VENV} (first use; a few minutes)...", file=sys.stderr, flush=True
        )
        if not python().exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            subprocess.run(
                [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", spec],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        marker.write_text(spec)
    version = subprocess.run(
        [str(python()), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return version


PACED_SUFFIX = "-paced"  # the model name LiteLLM routes to the paced upstream base


def write_config(path: Path, upstream_base: str, model: str, paced_base: str = "") -> None:
    entries = [(model, upstream_base)]
    if paced_base:
        entries.append((model + PACED_SUFFIX, paced_base))
    path.write_text(
        "model_list:\n"
        + "".join(
            f"  - model_name: {name}\n"
            "    litellm_params:\n"
            f"      model: openai/{model}\n"
            f"      api_base: {base}\n"
            "      api_key: sk-upstream\n"
            for name, base in entries
        )
        + "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
    )


def start(
    workdir: Path,
    port: int,
    upstream_base: str,
    model: str,
    cpus: Sequence[int] | None,
    paced_base: str = "",
) -> Service:
    """The proxy with one worker and no database, listening on 127.0.0.1:`port`.

    With `paced_base`, the model `<model>-paced` goes there (the paced-stream upstream)."""
    config = workdir / "litellm.yaml"
    write_config(config, upstream_base, model, paced_base)
    env = dict(OFFLINE_ENV)
    env.pop("DATABASE_URL", None)
    service = Service(
        "litellm",
        [
            str(VENV / "bin" / "litellm"),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        workdir / "litellm.log",
        env={**env, "PYTHONUNBUFFERED": "1"},
        cpus=cpus,
    )
    if "DATABASE_URL" in os.environ:
        print("bench: note: DATABASE_URL is set in the environment; LiteLLM may use it", file=sys.stderr)
    service.wait_for_port(port, timeout=180)
    return service
