"""`make test-real`: llama.cpp's own `llama-server` (built by scripts/build-llama-server) with tiny
models (tests/real/tiny_models.py), started and stopped by these fixtures."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def llama_cache() -> Path:
    """The cache directory of the built server (built now if missing: minutes, once)."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-llama-server")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_models(llama_cache: Path) -> dict[str, Path]:
    from tests.real.tiny_models import make_all

    return make_all(llama_cache / "vocab", llama_cache / "models")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One llama-server process on loopback; its log is kept for assertions."""

    def __init__(self, binary: Path, model: Path, log: Path, *, jinja: bool, ctx: int = 4096) -> None:
        self.binary, self.model, self.log_path, self.jinja, self.ctx = binary, model, log, jinja, ctx
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        args = [
            str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
            "-c", str(self.ctx), "-t", "1", "-np", "1", "--jinja" if self.jinja else "--no-jinja",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server did not become healthy: {self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash: no response is finished."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _server(
    request: pytest.FixtureRequest, cache: Path, model: Path, tmp: Path, jinja: bool
) -> Iterator[LlamaServer]:
    server = LlamaServer(cache / "bin" / "llama-server", model, tmp / "llama-server.log", jinja=jinja)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def qwen_jinja(
    request: pytest.FixtureRequest,
    llama_cache: Path,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """The Qwen2-tokenizer model whose template supports tools, with --jinja."""
    yield from _server(request, llama_cache, tiny_models["qwen-tools"], tmp_path_factory.mktemp("qj"), True)


@pytest.fixture(scope="module")
def llama3_plain(
    request: pytest.FixtureRequest,
    llama_cache: Path,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """The Llama 3-tokenizer model (adds its own BOS) whose template has no tools, without --jinja."""
    yield from _server(
        request, llama_cache, tiny_models["llama3-plain"], tmp_path_factory.mktemp("lp"), False
    )


@pytest.fixture(scope="module")
def qwen_calls(
    request: pytest.FixtureRequest,
    llama_cache: Path,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """The Qwen2-tokenizer model that answers one Hermes `<tool_call>`, with --jinja: its
    tool-call grammar (tool_choice "required") then gives a call."""
    yield from _server(request, llama_cache, tiny_models["qwen-calls"], tmp_path_factory.mktemp("qc"), True)


@pytest.fixture(scope="module")
def llama3_chat(
    request: pytest.FixtureRequest,
    llama_cache: Path,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """The Llama 3 model that answers "Hello, I am Sam." and stops, with --jinja: its template
    puts no tools in the prompt, so a required call is answered with text."""
    yield from _server(request, llama_cache, tiny_models["llama3-chat"], tmp_path_factory.mktemp("lc"), True)
