#!/usr/bin/env python3
"""openai.AsyncOpenAI client: one chat.completions.create per row under asyncio.Semaphore(C).

    python benchmarks/clients/openai_async.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--transport httpx|aiohttp] [--max-retries R] [--uvloop]

--transport httpx   the SDK's default transport (openai.DefaultAsyncHttpxClient), with the
                    connection pool raised to C: Limits(max_connections=C,
                    max_keepalive_connections=C) (the SDK default is 1000/100).
--transport aiohttp the SDK's aiohttp transport (openai.DefaultAioHttpClient, the
                    `openai[aiohttp]` extra), same Limits; exits with status 4 and a JSON
                    line saying so if the installed openai has no such transport.

All N tasks are created up front and gathered (the usual script shape); the semaphore keeps
C in flight. Retries are the SDK's own (max_retries, honouring retry-after-ms). Request and
response event hooks on the HTTP client count attempts and 429s: retried = attempts - n.
"""
from __future__ import annotations

import asyncio
import json
import sys

import _common as cm


def http_module(openai):
    """The httpx flavour this openai version is built on (httpx, or httpx2 in 3.x)."""
    try:
        import httpx2
        if issubclass(openai.DefaultAsyncHttpxClient, httpx2.AsyncClient):
            return httpx2
    except ImportError:
        pass
    import httpx
    return httpx


async def run(args, openai, counters):
    hx = http_module(openai)

    async def on_request(request):
        counters["attempts"] += 1

    async def on_response(response):
        if response.status_code == 429:
            counters["got_429"] += 1

    limits = hx.Limits(max_connections=args.c, max_keepalive_connections=args.c)
    hooks = {"request": [on_request], "response": [on_response]}
    if args.transport == "aiohttp":
        http_client = openai.DefaultAioHttpClient(limits=limits, event_hooks=hooks,
                                                  timeout=args.timeout)
    else:
        http_client = openai.DefaultAsyncHttpxClient(limits=limits, event_hooks=hooks,
                                                     timeout=args.timeout)
    client = openai.AsyncOpenAI(base_url=args.url, api_key="sk-bench", http_client=http_client,
                                max_retries=args.max_retries, timeout=args.timeout)
    sem = asyncio.Semaphore(args.c)
    model = args.model
    results = [None] * args.n

    async def one(i):
        async with sem:
            try:
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"prompt {i}"}])
                results[i] = r.choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - every failure is a counted error
                results[i] = exc

    async with client:
        await asyncio.gather(*(one(i) for i in range(args.n)))
    return results


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--transport", choices=["httpx", "aiohttp"], default="httpx")
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    import openai

    name = f"AsyncOpenAI ({args.transport})"
    if args.transport == "aiohttp":
        if not hasattr(openai, "DefaultAioHttpClient") or getattr(
                openai.DefaultAioHttpClient, "__name__", "") == "_MissingAioHttpClient":
            print(json.dumps({"client": name, "n": args.n, "c": args.c, "unavailable":
                              f"openai {openai.__version__} has no aiohttp transport "
                              "(DefaultAioHttpClient / openai[aiohttp])"}), flush=True)
            return 4
    counters = {"attempts": 0, "got_429": 0}
    results, m = cm.run_timed(lambda: run(args, openai, counters), args.uvloop)
    ok, errs, mismatches = cm.tally(results)
    return cm.emit(name + (" uvloop" if args.uvloop else ""), args, m, ok=ok,
                   errors=len(errs), mismatches=mismatches,
                   retried=counters["attempts"] - args.n, got_429=counters["got_429"],
                   requests=counters["attempts"], error_kinds=cm.count_kinds(errs),
                   notes=f"max_retries={args.max_retries}, Limits(max_connections={args.c}, "
                         f"max_keepalive_connections={args.c})",
                   version=openai.__version__)


if __name__ == "__main__":
    sys.exit(main())
