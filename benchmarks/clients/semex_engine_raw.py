"""semex's C engine alone: one Engine.submit of N prebuilt chat bodies, one wait.

    python benchmarks/clients/semex_engine_raw.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--workers 1]

No prompt rendering, no answer parsing, no LM: the bodies are built before the timed run and
the answers are checked after it (each must hold "echo: prompt i"). Beside semex llm_batch in
the same table, the gap between the two rows is what the Python layer costs per row. Only the
extension module is loaded (importing the semex package pulls in pandas/numpy, whose memory
would hide the engine's own in peak RSS). See _common.py for the output line.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

import _common as cm


def load_engine():
    for d in sys.path:
        hits = glob.glob(os.path.join(d or ".", "semex", "_engine*.so"))
        if hits:
            spec = importlib.util.spec_from_file_location("_engine", hits[0])
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise SystemExit("semex/_engine*.so not found on sys.path (is semex installed?)")


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1, help="engine I/O threads")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    engine = load_engine()
    eng = engine.Engine(workers=args.workers, max_in_flight=args.c)
    headers = ["Content-Type: application/json", "Authorization: Bearer sk-bench"]
    bodies = [json.dumps({"model": args.model, "messages": [{"role": "user", "content": s}]})
              .encode() for s in cm.prompts(args.n)]
    with cm.Meter() as m:
        batch = eng.submit(args.url + "/chat/completions", headers, bodies,
                           timeout=args.timeout, max_retries=args.max_retries)
        batch.wait()
    res = batch.results()
    ok = sum(1 for r in res if r[0] == engine.OK)
    errors = sum(1 for r in res if r[0] == engine.FAILED)
    mismatches = sum(1 for i, r in enumerate(res) if r[0] == engine.OK and
                     f'"content":"{cm.expected(i)}"'.encode() not in (r[3] or b""))
    retried = sum(max(0, r[5] - 1) for r in res)
    rc = cm.emit("semex engine raw", args, m, ok=ok, errors=errors, mismatches=mismatches,
                 retried=retried, got_429=None, notes=f"workers={args.workers}")
    eng.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
