"""Shared fixtures: a fake OpenAI-compatible server (tests/fakeserver.py)."""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import urllib.request

import pytest

FAKESERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakeserver.py")
API_KEY = "sk-test-SECRET-0123456789"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FakeServer:
    def __init__(self, port):
        self.port = port
        self.api_key = API_KEY
        self.base_url = "http://127.0.0.1:%d/v1" % port
        self._root = "http://127.0.0.1:%d" % port

    def _call(self, path, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self._root + path, data=data, method="GET" if data is None else "POST",
            headers={"Content-Type": "application/json"})
        with _opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **cfg):
        return self._call("/_config", cfg)

    def reset(self):
        return self._call("/_reset", {})

    def log(self):
        return self._call("/_log")

    def stats(self):
        return self._call("/_stats")


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """The CLI caches by default: each test gets its own cache folder (never ~/.cache)."""
    monkeypatch.setenv("SEMEX_CACHE_DIR", str(tmp_path_factory.mktemp("semex-cache")))


@pytest.fixture(scope="session")
def fakeserver_port():
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, FAKESERVER, "--port", "0", "--api-key", API_KEY],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog)
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            line = lines.get(timeout=10)
        except queue.Empty:
            line = None
        if not line or not line.startswith(b"PORT "):
            proc.kill()
            proc.wait()
            errlog.seek(0)
            raise RuntimeError(
                "fakeserver did not report 'PORT <n>' within 10 s (got %r, exit code %r); "
                "stderr:\n%s" % (line, proc.returncode, errlog.read().decode(errors="replace")))
        yield int(line.split()[1])
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdin.close()
        errlog.close()


@pytest.fixture
def server(fakeserver_port):
    s = FakeServer(fakeserver_port)
    s.reset()
    yield s


def client_factory(server, build, backoff_base, backoff_cap):
    """A fixture body: make(**options) builds a client pointed at the fake server with
    test-friendly backoff; every one is closed afterwards."""
    made = []

    def make(**options):
        options.setdefault("api_base", server.base_url)
        options.setdefault("api_key", server.api_key)
        options.setdefault("backoff_base", backoff_base)
        options.setdefault("backoff_cap", backoff_cap)
        options.setdefault("timeout", 10.0)
        client = build(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def make_lm(server):
    """Build LMs pointed at the fake server with test-friendly backoff; closed afterwards."""
    import semex

    yield from client_factory(server, lambda **o: semex.LM("test-model", **o), 0.05, 0.5)


DIALECTS = ("openai", "anthropic", "gemini")


@pytest.fixture(params=DIALECTS)
def dialect(request):
    """Each wire format the fake server speaks: OpenAI's chat completions, Anthropic's
    Messages API, Gemini's generateContent."""
    return request.param


@pytest.fixture
def make_dialect_lm(server, dialect):
    """make_lm for the `dialect` under test (native dialects at the server's root URL, as
    their real APIs are laid out)."""
    import semex

    def build(**options):
        if dialect != "openai":
            if options.get("api_base") == server.base_url:
                options["api_base"] = server._root
            options.setdefault("provider", dialect)
        return semex.LM("test-model", **options)

    yield from client_factory(server, build, 0.05, 0.5)


@pytest.fixture(scope="session")
def mock_binary():
    """The C mock provider's binary (tests/cmock.py), built once per session."""
    from cmock import build_binary

    return build_binary()


@pytest.fixture
def start_cmock(mock_binary):
    """start(*options) -> a running CMock; each is closed (and checked) afterwards."""
    from cmock import CMock

    started = []

    def start(*options):
        mock = CMock(mock_binary, *options)
        started.append(mock)
        return mock

    yield start
    for mock in started:
        mock.close()
