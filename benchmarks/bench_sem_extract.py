#!/usr/bin/env python3
"""sem_extract: one document per call vs batch_size=10, same server, same run.

    python benchmarks/bench_sem_extract.py [-n 1000] [--latency-ms 200]

Starts the project's fake OpenAI-compatible server (tests/fakeserver.py, whose extraction
mode answers sem_extract prompts deterministically) with a fixed latency, runs each
configuration, checks every row, and prints a Markdown table of calls and wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

import semex

HERE = os.path.dirname(os.path.abspath(__file__))
FAKESERVER = os.path.join(HERE, "..", "tests", "fakeserver.py")
FIELDS = {"sentiment": "positive/negative/neutral", "product": None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=200)
    args = p.parse_args()

    server = subprocess.Popen([sys.executable, FAKESERVER, "--port", "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline().split()[1])
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def control(path, payload):
        req = urllib.request.Request(base + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    docs = [{"text": f"short ticket {i} about gadget {i % 37}"} for i in range(args.n)]
    configs = [
        ("one doc per call, 10 in flight", dict(use_batch_processing=False,
                                                max_concurrent_batches=10)),
        ("batch_size=10, max_concurrent_batches=10", dict(batch_size=10,
                                                          max_concurrent_batches=10)),
        ("one doc per call, 100 in flight", dict(use_batch_processing=False,
                                                 max_concurrent_batches=100)),
    ]
    rows = []
    try:
        for name, options in configs:
            control("/_reset", {})
            control("/_config", {"latency_ms": [args.latency_ms, args.latency_ms]})
            lm = semex.LM("mock", api_base=base + "/v1", api_key="sk-bench",
                          max_concurrency=100)
            started = time.perf_counter()
            out = semex.sem_extract(docs, lm, FIELDS, progress=False, **options)
            wall = time.perf_counter() - started
            lm.close()
            wrong = sum(row["product"] != f"product:{doc['text']}"
                        for row, doc in zip(out.outputs, docs))
            rows.append((name, out.usage.requests, wall, out.failed, wrong))
    finally:
        server.stdin.close()
        server.terminate()
        server.wait(timeout=10)

    print(f"{args.n} short documents, server latency {args.latency_ms:.0f} ms per call\n")
    print("| configuration | calls | wall s | failed rows | wrong rows |")
    print("|---|---|---|---|---|")
    for name, calls, wall, failed, wrong in rows:
        print(f"| {name} | {calls} | {wall:.2f} | {failed} | {wrong} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
