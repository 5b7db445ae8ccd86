#!/usr/bin/env python3
"""semex client for the benchmarks: the same workload as bench_aiohttp.py, through
``semex.llm_batch`` (request bodies built and answers parsed inside the timed run).

    python benchmarks/bench_semex.py --url http://127.0.0.1:PORT/v1 -n 20000 -c 1000

Prints one JSON line in bench_aiohttp.py's format (wall time, throughput, CPU and peak RSS
of this process from getrusage, errors, rows answered with another row's text).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import semex


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="API base, e.g. http://127.0.0.1:PORT/v1")
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("-c", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", default="mock")
    args = p.parse_args(argv)

    lm = semex.LM(args.model, api_base=args.url, api_key="sk-bench",
                  max_concurrency=args.c, workers=args.workers, timeout=300, temperature=None)
    prompts = [f"prompt {i}" for i in range(args.n)]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    answers = semex.llm_batch(prompts, model=lm, max_concurrent=args.c, errors="objects")
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    errors = sum(not isinstance(a, str) for a in answers)
    mismatches = sum(isinstance(a, str) and a != f"echo: prompt {i}"
                     for i, a in enumerate(answers))
    user = r1.ru_utime - r0.ru_utime
    sys_ = r1.ru_stime - r0.ru_stime
    print(json.dumps({
        "client": "semex",
        "loop": "none",
        "n": args.n,
        "c": args.c,
        "wall_s": round(wall, 4),
        "rps": round(args.n / wall, 1),
        "cpu_user_s": round(user, 4),
        "cpu_sys_s": round(sys_, 4),
        "cpu_us_per_req": round((user + sys_) / args.n * 1e6, 2),
        "max_rss_mb": round(r1.ru_maxrss / 1024.0, 1),
        "errors": errors,
        "mismatches": mismatches,
        "retries": lm.total_usage.retries,
    }), flush=True)
    lm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
