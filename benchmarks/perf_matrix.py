#!/usr/bin/env python3
"""Side-by-side engine measurements, a fresh mock server per run (so the server's
max_open_connections belongs to that run alone).

    make -C benchmarks && python benchmarks/perf_matrix.py -n 20000 -c 1000 --repeat 3 \
        --clients raw,llm_batch,wrk [--engine-so other/_engine.so]

Clients: raw (bench_engine.py --mode raw), llm_batch (bench_engine.py --mode llm_batch),
aiohttp (bench_aiohttp.py), wrk (wrk -t1 -cC -dD with wrk_chat.lua; D = --wrk-seconds).
Runs are interleaved (client A, B, C, A, B, C, ...) so that machine noise hits all alike.
--pythonpath lets one run compare two builds of the package (comma-separated list of
directories, each used as PYTHONPATH for one variant of the raw/llm_batch clients).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def start_server(lat, jit):
    srv = subprocess.Popen(
        [os.path.join(HERE, "build", "mockserver"), "--port", "0", "--latency-ms", str(lat),
         "--jitter-ms", str(jit), "--stdin-watch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(srv.stdout.readline().split()[1])
    return srv, port


def stop_server(srv):
    srv.stdin.close()
    srv.terminate()
    srv.wait(timeout=10)


def run_wrk(port, c, seconds):
    out = subprocess.run(
        ["/usr/bin/wrk", "-t1", f"-c{c}", f"-d{seconds}s", "-s",
         os.path.join(HERE, "wrk_chat.lua"), f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"rps": float(m.group(1)) if m else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("-c", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=50)
    p.add_argument("--jitter-ms", type=float, default=25)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", default="raw,llm_batch,wrk")
    p.add_argument("--pythonpath", default=os.path.join(ROOT, "python"))
    p.add_argument("--wrk-seconds", type=int, default=0,
                   help="wrk run length; 0: the ideal wall time of n requests, rounded up")
    p.add_argument("--json", action="store_true", help="also print every run as JSON")
    args = p.parse_args()

    variants = args.pythonpath.split(",")
    clients = []
    for name in args.clients.split(","):
        if name in ("raw", "llm_batch"):
            for k, pp in enumerate(variants):
                label = name if len(variants) == 1 else f"{name}[{k}]"
                clients.append((label, name, pp))
        else:
            clients.append((name, name, None))

    ideal = args.n * args.latency_ms / 1000.0 / args.c
    if not args.wrk_seconds:
        args.wrk_seconds = max(1, int(-(-ideal // 1)))
    rows = {label: [] for label, _, _ in clients}
    for _ in range(args.repeat):
        for label, kind, pp in clients:
            srv, port = start_server(args.latency_ms, args.jitter_ms)
            try:
                url = f"http://127.0.0.1:{port}/v1"
                if kind == "wrk":
                    r = run_wrk(port, args.c, args.wrk_seconds)
                else:
                    env = dict(os.environ, PYTHONPATH=pp)
                    if kind == "aiohttp":
                        cmd = [sys.executable, os.path.join(HERE, "bench_aiohttp.py"), "--url",
                               url + "/chat/completions"]
                    else:
                        cmd = [sys.executable, os.path.join(HERE, "bench_engine.py"), "--url",
                               url, "--mode", kind, "--latency-ms", str(args.latency_ms)]
                    out = subprocess.run(cmd + ["-n", str(args.n), "-c", str(args.c)],
                                         capture_output=True, text=True, check=True,
                                         env=env).stdout
                    r = json.loads(out.strip().splitlines()[-1])
            finally:
                stop_server(srv)
            rows[label].append(r)
            if args.json:
                print(label, json.dumps(r), flush=True)

    print(f"n={args.n} c={args.c} latency {args.latency_ms}±{args.jitter_ms} ms, ideal "
          f"{ideal:.2f} s = {args.n / ideal:,.0f} req/s; {args.repeat} runs each; wrk -d"
          f"{args.wrk_seconds}s\n")
    print("| client | req/s (min–max, median) | wall/ideal | CPU µs/req | peak RSS MB "
          "| max open conns | errors |")
    print("|---|---|---|---|---|---|---|")

    def rng(vals, fmt):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "—"
        return (f"{fmt.format(min(vals))}–{fmt.format(max(vals))} "
                f"({fmt.format(statistics.median(vals))})")

    for label, runs in rows.items():
        rps = [r["rps"] for r in runs]
        print(f"| {label} | {rng(rps, '{:,.0f}')} | "
              f"{rng([(args.n / ideal) / r['rps'] for r in runs], '{:.3f}')} | "
              f"{rng([r.get('cpu_us_per_req') for r in runs], '{:.1f}')} | "
              f"{rng([r.get('max_rss_mb') for r in runs], '{:.0f}')} | "
              f"{rng([r.get('server_max_open') for r in runs], '{}')} | "
              f"{sum(r.get('errors', 0) for r in runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
