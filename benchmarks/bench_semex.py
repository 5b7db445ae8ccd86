#!/usr/bin/env python3
"""semex client for the benchmarks: the same workload as bench_aiohttp.py, through
``semex.llm_batch`` (request bodies built and answers parsed inside the timed run).

    python benchmarks/bench_semex.py --url http://127.0.0.1:PORT/v1 -n 20000 -c 1000

--stream asks for streamed answers (server-sent events, read by the engine's workers);
--on-chunk also passes a callback that receives every streamed piece; --words N makes
each prompt (and so each echoed answer) N words longer.

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
    p.add_argument("--stream", action="store_true", help="stream=True")
    p.add_argument("--on-chunk", action="store_true", help="stream with an on_chunk callback")
    p.add_argument("--words", type=int, default=0, help="extra words per prompt")
    args = p.parse_args(argv)

    lm = semex.LM(args.model, api_base=args.url, api_key="sk-bench",
                  max_concurrency=args.c, workers=args.workers, timeout=300, temperature=None)
    tail = " word" * args.words
    prompts = [f"prompt {i}{tail}" for i in range(args.n)]
    fields = {}
    pieces = [0]
    if args.stream:
        fields["stream"] = True
    if args.on_chunk:
        def on_chunk(index, text):
            pieces[0] += 1
        fields["on_chunk"] = on_chunk
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    answers = semex.llm_batch(prompts, model=lm, max_concurrent=args.c, errors="objects",
                              **fields)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    errors = sum(not isinstance(a, str) for a in answers)
    mismatches = sum(isinstance(a, str) and a != f"echo: prompt {i}{tail}"
                     for i, a in enumerate(answers))
    user = r1.ru_utime - r0.ru_utime
    sys_ = r1.ru_stime - r0.ru_stime
    print(json.dumps({
        "client": "semex" + (" stream+on_chunk" if args.on_chunk else
                             " stream" if args.stream else ""),
        "tokens": lm.total_usage.total_tokens,
        "chunk_calls": pieces[0],
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
