#!/usr/bin/env python3
"""Raw httpx.AsyncClient client: hand-written chat-completions POSTs, no SDK.

    python benchmarks/clients/httpx_raw.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--max-retries R] [--uvloop]

One httpx.AsyncClient with Limits(max_connections=C, max_keepalive_connections=C) and C
worker tasks, each taking the next row (the shape of bench_aiohttp.py). A 429 or 5xx answer
or a transport error is retried up to --max-retries times (default 0: plain, like
bench_aiohttp), waiting retry-after-ms / retry-after when given, else 0.5 s x 2^attempt
with full jitter; what is left is that row's error.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys

import _common as cm


async def run(args, counters):
    import httpx
    url = args.url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    dumps, loads = json.dumps, json.loads
    model = args.model
    results = [None] * args.n
    todo = iter(range(args.n))
    limits = httpx.Limits(max_connections=args.c, max_keepalive_connections=args.c)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:

        async def worker():
            for i in todo:
                body = dumps({"model": model,
                              "messages": [{"role": "user", "content": f"prompt {i}"}]})
                attempt = 0
                while True:
                    counters["attempts"] += 1
                    wait = None
                    try:
                        resp = await client.post(url, content=body.encode(), headers=headers)
                    except httpx.HTTPError as exc:
                        result, wait = exc, -1.0
                    else:
                        status = resp.status_code
                        if status == 200:
                            try:
                                result = loads(resp.content)["choices"][0]["message"]["content"]
                            except (ValueError, KeyError, IndexError, TypeError) as exc:
                                result = exc
                        else:
                            result = RuntimeError(f"HTTP {status}")
                            if status == 429:
                                counters["got_429"] += 1
                            if status == 429 or status >= 500:
                                h = resp.headers
                                try:
                                    if "retry-after-ms" in h:
                                        wait = float(h["retry-after-ms"]) / 1000.0
                                    elif "retry-after" in h:
                                        wait = float(h["retry-after"])
                                    else:
                                        wait = -1.0
                                except ValueError:
                                    wait = -1.0
                    if wait is None or attempt >= args.max_retries:
                        results[i] = result
                        break
                    if wait < 0:
                        wait = random.uniform(0, min(30.0, 0.5 * 2 ** attempt))
                    attempt += 1
                    await asyncio.sleep(wait)

        await asyncio.gather(*(worker() for _ in range(min(args.c, args.n))))
    return results


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--uvloop", action="store_true")
    p.set_defaults(max_retries=0)
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    import httpx
    counters = {"attempts": 0, "got_429": 0}
    results, m = cm.run_timed(lambda: run(args, counters), args.uvloop)
    ok, errs, mismatches = cm.tally(results)
    return cm.emit("httpx" + (" (uvloop)" if args.uvloop else ""), args, m, ok=ok,
                   errors=len(errs), mismatches=mismatches,
                   retried=counters["attempts"] - args.n, got_429=counters["got_429"],
                   requests=counters["attempts"], error_kinds=cm.count_kinds(errs),
                   notes=f"max_retries={args.max_retries}", version=httpx.__version__)


if __name__ == "__main__":
    sys.exit(main())
