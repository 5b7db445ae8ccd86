#!/usr/bin/env python3
"""anthropic.AsyncAnthropic client: one messages.create per row under asyncio.Semaphore(C).

    python benchmarks/clients/anthropic_async.py --url http://127.0.0.1:PORT --n 20000 -c 1000
        [--max-retries R] [--uvloop]

The SDK's default transport (anthropic.DefaultAsyncHttpxClient) with the connection pool
raised to C: Limits(max_connections=C, max_keepalive_connections=C), as openai_async.py does
for AsyncOpenAI. max_tokens=64 (the API requires it). Retries are the SDK's own (max_retries,
honouring retry-after). Request and response event hooks count attempts and 429s.
--url is the API root (the SDK appends /v1/messages); a trailing /v1 is dropped.
The key and version go as x-api-key and anthropic-version: 2023-06-01 (default_headers), the
headers the mock checks and semex sends: newer SDKs send the key as a bearer token and a newer
version date by default.
"""
from __future__ import annotations

import asyncio
import sys

import _common as cm


def http_module(anthropic):
    """The httpx flavour this anthropic version is built on."""
    try:
        import httpx2
        if issubclass(anthropic.DefaultAsyncHttpxClient, httpx2.AsyncClient):
            return httpx2
    except ImportError:
        pass
    import httpx
    return httpx


async def run(args, anthropic, counters):
    hx = http_module(anthropic)

    async def on_request(request):
        counters["attempts"] += 1

    async def on_response(response):
        if response.status_code == 429:
            counters["got_429"] += 1

    limits = hx.Limits(max_connections=args.c, max_keepalive_connections=args.c)
    http_client = anthropic.DefaultAsyncHttpxClient(
        limits=limits, event_hooks={"request": [on_request], "response": [on_response]},
        timeout=args.timeout)
    base = args.url[:-3] if args.url.rstrip("/").endswith("/v1") else args.url
    client = anthropic.AsyncAnthropic(
        base_url=base.rstrip("/"), api_key="sk-ant-bench", http_client=http_client,
        max_retries=args.max_retries, timeout=args.timeout,
        default_headers={"x-api-key": "sk-ant-bench", "anthropic-version": "2023-06-01"})
    sem = asyncio.Semaphore(args.c)
    model = args.model
    results = [None] * args.n

    async def one(i):
        async with sem:
            try:
                r = await client.messages.create(
                    model=model, max_tokens=64,
                    messages=[{"role": "user", "content": f"prompt {i}"}])
                results[i] = "".join(b.text for b in r.content if b.type == "text")
            except Exception as exc:  # noqa: BLE001 - every failure is a counted error
                results[i] = exc

    async with client:
        await asyncio.gather(*(one(i) for i in range(args.n)))
    return results


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    import anthropic

    counters = {"attempts": 0, "got_429": 0}
    results, m = cm.run_timed(lambda: run(args, anthropic, counters), args.uvloop)
    ok, errs, mismatches = cm.tally(results)
    return cm.emit("AsyncAnthropic (httpx)" + (" uvloop" if args.uvloop else ""), args, m,
                   ok=ok, errors=len(errs), mismatches=mismatches,
                   retried=counters["attempts"] - args.n, got_429=counters["got_429"],
                   requests=counters["attempts"], error_kinds=cm.count_kinds(errs),
                   notes=f"max_retries={args.max_retries}, max_tokens=64, "
                         f"Limits(max_connections={args.c}, max_keepalive_connections={args.c})",
                   version=anthropic.__version__)


if __name__ == "__main__":
    sys.exit(main())
