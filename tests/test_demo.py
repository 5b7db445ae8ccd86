"""examples/demo.py with a configured provider (OPENAI_API_KEY / OPENAI_BASE_URL): here the
fake server's extraction mode stands in for the provider."""
import os
import subprocess
import sys

import semex

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_demo_uses_the_configured_provider(server):
    env = dict(os.environ, OPENAI_API_KEY=server.api_key, OPENAI_BASE_URL=server.base_url,
               SEMEX_MODEL="provider-model")
    # the semex these tests import (installed in CI, python/ in a dev checkout)
    here = os.path.dirname(os.path.dirname(os.path.abspath(semex.__file__)))
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"provider: {server.base_url}, model provider-model" in run.stdout
    assert "12 tickets: 12 extracted, 0 failed" in run.stdout
    assert "product:My AeroBlend 3000 blender" in run.stdout  # the fake provider's answer
    assert server.api_key not in run.stdout + run.stderr
    assert sum(r["ndocs"] for r in server.log()) == 12
