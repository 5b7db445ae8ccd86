#!/usr/bin/env python3
"""aiohttp reference client for the semex benchmarks.

Sends N OpenAI chat-completion POSTs at concurrency C over one ClientSession,
checks every reply, and prints one JSON line with wall time, throughput and the
CPU and memory this process used:

    python benchmarks/bench_aiohttp.py --url http://127.0.0.1:PORT/v1/chat/completions \
        -n 20000 -c 1000 [--uvloop]

Request i carries the message "prompt <i>"; the mock provider
(benchmarks/mock/) answers "echo: prompt <i>", so a reply that landed on
the wrong row counts as a mismatch. Non-200 answers, transport failures and
unparseable replies count as errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

import aiohttp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="chat-completions endpoint")
    p.add_argument("-n", type=int, default=20000, help="number of requests")
    p.add_argument("-c", type=int, default=1000, help="concurrency (connections)")
    p.add_argument("--model", default="mock")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="per-request total timeout in seconds")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = p.parse_args(argv)
    if args.n < 1 or args.c < 1:
        p.error("-n and -c must be positive")
    return args


async def run(args):
    dumps, loads = json.dumps, json.loads
    url, model = args.url, args.model
    headers = {"Content-Type": "application/json"}
    todo = iter(range(args.n))  # shared by the workers: each index is taken once

    connector = aiohttp.TCPConnector(limit=args.c, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker():
            errors = mismatches = 0
            for i in todo:
                body = dumps({"model": model,
                              "messages": [{"role": "user", "content": f"prompt {i}"}]})
                try:
                    async with session.post(url, data=body.encode(), headers=headers) as resp:
                        raw = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    errors += 1
                    continue
                if status != 200:
                    errors += 1
                    continue
                try:
                    content = loads(raw)["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    errors += 1
                    continue
                if content != f"echo: prompt {i}":
                    mismatches += 1
            return errors, mismatches

        outcomes = await asyncio.gather(*(worker() for _ in range(min(args.c, args.n))))
    return sum(e for e, _ in outcomes), sum(m for _, m in outcomes)


def main(argv=None):
    args = parse_args(argv)
    if args.uvloop:
        import uvloop

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if not args.uvloop:
        errors, mismatches = asyncio.run(run(args))
    elif sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            errors, mismatches = runner.run(run(args))
    else:
        uvloop.install()
        errors, mismatches = asyncio.run(run(args))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)

    user = r1.ru_utime - r0.ru_utime
    sys_ = r1.ru_stime - r0.ru_stime
    print(json.dumps({
        "client": "aiohttp",
        "loop": "uvloop" if args.uvloop else "asyncio",
        "n": args.n,
        "c": args.c,
        "wall_s": round(wall, 4),
        "rps": round(args.n / wall, 1),
        "cpu_user_s": round(user, 4),
        "cpu_sys_s": round(sys_, 4),
        "cpu_us_per_req": round((user + sys_) / args.n * 1e6, 2),
        "max_rss_mb": round(r1.ru_maxrss / 1024.0, 1),  # Linux reports KiB
        "errors": errors,
        "mismatches": mismatches,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
