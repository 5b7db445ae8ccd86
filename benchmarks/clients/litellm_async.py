#!/usr/bin/env python3
"""LiteLLM client: litellm.acompletion per row under asyncio.Semaphore(C).

    python benchmarks/clients/litellm_async.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--max-retries R] [--uvloop]

model "openai/<model>" with api_base pointing at the mock. Settings: LiteLLM's default
transport (its aiohttp transport in this version) with its connector limits raised to C
(AIOHTTP_CONNECTOR_LIMIT and AIOHTTP_CONNECTOR_LIMIT_PER_HOST, read when litellm is
imported; defaults 1000 and 500), the local price
map (no network at import), retries = the OpenAI SDK's max_retries inside LiteLLM
(honouring retry-after-ms). LiteLLM does not expose per-call retries or 429s, so
retried/got_429 are null (the harness reports the server's counts).
"""
from __future__ import annotations

import asyncio
import os
import sys

import _common as cm


async def run(args, litellm):
    sem = asyncio.Semaphore(args.c)
    model = "openai/" + args.model
    base = args.url
    results = [None] * args.n

    async def one(i):
        async with sem:
            try:
                r = await litellm.acompletion(
                    model=model, api_base=base, api_key="sk-bench",
                    messages=[{"role": "user", "content": f"prompt {i}"}],
                    max_retries=args.max_retries, timeout=args.timeout)
                results[i] = r.choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - every failure is a counted error
                results[i] = exc

    await asyncio.gather(*(one(i) for i in range(args.n)))
    return results


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    cm.quiet_third_parties()
    os.environ["AIOHTTP_CONNECTOR_LIMIT"] = str(args.c)
    os.environ["AIOHTTP_CONNECTOR_LIMIT_PER_HOST"] = str(args.c)
    import litellm
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    from importlib.metadata import version

    results, m = cm.run_timed(lambda: run(args, litellm), args.uvloop)
    ok, errs, mismatches = cm.tally(results)
    return cm.emit("LiteLLM acompletion", args, m, ok=ok, errors=len(errs),
                   mismatches=mismatches, retried=None, got_429=None,
                   error_kinds=cm.count_kinds(errs),
                   notes=(f"max_retries={args.max_retries}, AIOHTTP_CONNECTOR_LIMIT="
                          f"AIOHTTP_CONNECTOR_LIMIT_PER_HOST={args.c}"),
                   version=version("litellm"))


if __name__ == "__main__":
    sys.exit(main())
