"""The C mock provider (benchmarks/build/mockserver) for tests: built once per session
(or MOCKSERVER_BIN), one process per CMock, its counters read from /_stats. Closing a CMock
checks that it exited cleanly and that its stderr holds no sanitizer report."""
import json
import os
import selectors
import subprocess
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def build_binary() -> str:
    path = os.environ.get("MOCKSERVER_BIN")
    if path:
        return path
    build = subprocess.run(["make", "-s", "-C", BENCH], capture_output=True, text=True,
                           timeout=120)
    if build.returncode != 0:
        pytest.fail("make -C benchmarks failed:\n" + build.stdout + build.stderr)
    return os.path.join(BENCH, "build", "mockserver")


class CMock:
    def __init__(self, binary, *options):
        self.proc = subprocess.Popen([binary, "--port", "0", "--stdin-watch", *options],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=10):
            self.proc.kill()
            pytest.fail("mockserver did not print its port")
        line = self.proc.stdout.readline().decode()
        assert line.startswith("PORT "), line
        self.root = f"http://127.0.0.1:{int(line.split()[1])}"
        self.base = self.root + "/v1"

    def stats(self):
        with _opener.open(self.root + "/_stats", timeout=5) as r:
            return json.load(r)

    def get(self, path):
        with _opener.open(self.base + path, timeout=5) as r:
            return json.load(r)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read().decode()
        self.proc.stdout.close()
        self.proc.stderr.close()
        assert self.proc.returncode == 0, err
        assert "ERROR" not in err and "runtime error" not in err, err  # ASan / UBSan
