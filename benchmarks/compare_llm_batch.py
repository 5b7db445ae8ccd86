#!/usr/bin/env python3
"""semex llm_batch beside raw aiohttp, same mock server, same run.

    make -C benchmarks && python benchmarks/compare_llm_batch.py [-n 20000] [-c 1000]
        [--latency-ms 50] [--jitter-ms 25] [--repeat 2]

Starts benchmarks/build/mockserver on a free loopback port, runs each client as its own
process (bench_semex.py, bench_aiohttp.py) alternately, and prints a Markdown table of
throughput, wall time against the ideal (n * latency / c) and the client's CPU per request
(user+sys from getrusage), peak RSS, errors and rows answered with another row's text.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("-c", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=50)
    p.add_argument("--jitter-ms", type=float, default=25)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()

    server = subprocess.Popen(
        [os.path.join(HERE, "build", "mockserver"), "--port", "0", "--latency-ms",
         str(args.latency_ms), "--jitter-ms", str(args.jitter_ms), "--stdin-watch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        base = f"http://127.0.0.1:{port}/v1"
        clients = {
            "semex llm_batch": [sys.executable, os.path.join(HERE, "bench_semex.py"),
                                "--url", base],
            "aiohttp (asyncio)": [sys.executable, os.path.join(HERE, "bench_aiohttp.py"),
                                  "--url", base + "/chat/completions"],
        }
        rows = []
        for _ in range(args.repeat):
            for name, cmd in clients.items():
                out = subprocess.run(cmd + ["-n", str(args.n), "-c", str(args.c)],
                                     check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                result["name"] = name
                rows.append(result)
    finally:
        server.stdin.close()
        server.terminate()
        server.wait(timeout=10)

    ideal = args.n * args.latency_ms / 1000.0 / args.c
    print(f"n={args.n}, concurrency={args.c}, latency {args.latency_ms}±{args.jitter_ms} ms, "
          f"ideal wall {ideal:.2f} s ({args.n / ideal:,.0f} req/s)\n")
    print("| client | req/s | wall / ideal | CPU µs/request | peak RSS MB | errors | mismatched |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['rps']:,.0f} | {r['wall_s'] / ideal:.2f}× | "
              f"{r['cpu_us_per_req']:.0f} | {r['max_rss_mb']:.0f} | {r['errors']} | "
              f"{r['mismatches']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
