#!/usr/bin/env python3
"""The answer cache's hit path against uncached traffic, on the C mock (one run, one process).

    make -C benchmarks && python benchmarks/bench_cache.py -n 100000 -c 1000

Phases, each timed with wall clock and getrusage CPU, all ``semex.llm_batch`` of the same
``n`` prompts against a fresh benchmarks/build/mockserver (latency 50 +- 25 ms):

  uncached    cache off: what one second of real traffic is worth (requests/s)
  filling     cache on, empty: the same run while every answer is written (writer cost)
  cached      cache on, every answer in it: a fully cached re-run (must send 0 requests),
              --repeat times (default 3), each with a newly opened cache and LM: the range
              is what a 2-core machine shared with other work gives
  per-row     the same n lookups as one SQLite query per row from Python (the design the
              cache avoids), for scale

Prints a Markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import semex

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "build", "mockserver")


def start_mock(latency_ms: int, jitter_ms: int):
    if not os.path.exists(MOCK):
        sys.exit(f"{MOCK} is missing: run make -C benchmarks")
    proc = subprocess.Popen([MOCK, "--port", "0", "--latency-ms", str(latency_ms),
                             "--jitter-ms", str(jitter_ms), "--stdin-watch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        sys.exit(f"mockserver did not start: {line!r}")
    return proc, int(line.split()[1])


def timed(fn):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return out, wall, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=100_000)
    p.add_argument("-c", type=int, default=1000)
    p.add_argument("--latency-ms", type=int, default=50)
    p.add_argument("--jitter-ms", type=int, default=25)
    p.add_argument("--repeat", type=int, default=3, help="fully cached re-runs (default 3)")
    args = p.parse_args(argv)

    proc, port = start_mock(args.latency_ms, args.jitter_ms)
    base = f"http://127.0.0.1:{port}/v1"
    folder = tempfile.mkdtemp(prefix="semex-bench-cache-")
    path = os.path.join(folder, "cache.sqlite3")
    prompts = [f"prompt {i}" for i in range(args.n)]
    expected = [f"echo: prompt {i}" for i in range(args.n)]
    rows = []
    try:
        def run(cache):
            lm = semex.LM("mock", api_base=base, api_key="sk-bench", max_concurrency=args.c,
                          timeout=300, temperature=None, cache=cache)
            answers, wall, cpu = timed(lambda: semex.llm_batch(prompts, model=lm,
                                                               max_concurrent=args.c))
            usage = lm.total_usage
            lm.close()
            wrong = sum(a != e for a, e in zip(answers, expected))
            return wall, cpu, usage, wrong

        wall, cpu, usage, wrong = run(False)
        rps = args.n / wall
        rows.append(("uncached (cache off)", wall, cpu, usage.requests, wrong))

        cache = semex.Cache(path)
        wall, cpu, usage, wrong = run(cache)
        flushed, flush_wall, _ = timed(lambda: cache.flush(120))
        rows.append(("filling the cache", wall, cpu, usage.requests, wrong))
        entries = cache.info()["entries"]
        cache.close()

        cached_walls, cached_cpus, cached_requests = [], [], 0
        for k in range(args.repeat):
            cache = semex.Cache(path)
            wall, cpu, usage, wrong = run(cache)
            cached_walls.append(wall)
            cached_cpus.append(cpu)
            cached_requests += usage.requests
            rows.append((f"fully cached re-run {k + 1}/{args.repeat}", wall, cpu,
                         usage.requests, wrong))
            cache.close()
        cached_wall, cached_cpu = min(cached_walls), min(cached_cpus)

        conn = sqlite3.connect(path)
        keys = [k for (k,) in conn.execute("SELECT key FROM entries")]

        def per_row():
            for k in keys:
                conn.execute("SELECT value, finish_reason, prompt_tokens, completion_tokens, "
                             "total_tokens FROM entries WHERE key = ?", (k,)).fetchone()
        _, per_row_wall, per_row_cpu = timed(per_row)
        conn.close()
        rows.append(("per-row SQLite lookups only", per_row_wall, per_row_cpu, 0, 0))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)

    one_second_rows = rps  # what one uncached second of traffic answers
    print(f"n = {args.n:,}, concurrency {args.c}, mock latency {args.latency_ms} +- "
          f"{args.jitter_ms} ms; {entries:,} entries written (flush after the run: "
          f"{flush_wall * 1000:.0f} ms)\n")
    print("| phase | wall s | CPU s | µs CPU/row | requests | wrong answers |")
    print("|---|---|---|---|---|---|")
    for name, wall, cpu, requests, wrong in rows:
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {cpu / args.n * 1e6:.1f} | "
              f"{requests:,} | {wrong:,} |")
    slowest = max(cached_walls)
    print(f"\nuncached: {rps:,.0f} requests/s, so one uncached second answers "
          f"{one_second_rows:,.0f} rows; the fully cached re-run of {args.n:,} rows took "
          f"{cached_wall:.3f}-{slowest:.3f} s = {cached_wall:.2f}-{slowest:.2f}x one uncached "
          f"second ({cached_wall / args.n * 1e6:.2f}-{slowest / args.n * 1e6:.2f} µs wall per "
          f"row; per-row lookups from Python alone take {per_row_wall / cached_wall:.1f}x the "
          f"fastest batched re-run)")
    print(json.dumps({"n": args.n, "c": args.c, "uncached_rps": round(rps, 1),
                      "cached_wall_s": round(cached_wall, 4),
                      "cached_wall_max_s": round(slowest, 4),
                      "cached_walls_s": [round(w, 4) for w in cached_walls],
                      "cached_cpu_s": round(cached_cpu, 4),
                      "cached_requests": cached_requests,
                      "hit_us_per_row": round(cached_wall / args.n * 1e6, 3),
                      "per_row_lookup_wall_s": round(per_row_wall, 4),
                      "rows": [dict(zip(("phase", "wall_s", "cpu_s", "requests", "wrong"), r))
                               for r in rows]}))
    return 0 if cached_requests == 0 and all(r[4] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
