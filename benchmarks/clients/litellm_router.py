#!/usr/bin/env python3
"""LiteLLM Router over several deployments: Router.acompletion per row under
asyncio.Semaphore(C), for benchmarks/bench_deployments.py.

    python benchmarks/clients/litellm_router.py --urls http://127.0.0.1:P1/v1,http://127.0.0.1:P2/v1
        --rpm 6000 --n 6000 -c 64 [--strategy simple-shuffle] [--max-retries 6]

One deployment per URL of model "openai/mock", each with the same rpm (LiteLLM's
per-deployment rpm, which its routing strategies weigh and, with usage-based routing,
enforce). Prints one JSON line: client, n, wall_s, rps, ok, errors, error_kinds, cpu.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time


async def run(args, litellm):
    from litellm import Router

    model_list = [{"model_name": "mock",
                   "litellm_params": {"model": "openai/mock", "api_base": url,
                                      "api_key": "sk-bench", "rpm": args.rpm}}
                  for url in args.urls.split(",")]
    router = Router(model_list=model_list, routing_strategy=args.strategy,
                    num_retries=args.max_retries, timeout=args.timeout)
    sem = asyncio.Semaphore(args.c)
    results = [None] * args.n

    async def one(i):
        async with sem:
            try:
                r = await router.acompletion(
                    model="mock", messages=[{"role": "user", "content": f"prompt {i}"}])
                results[i] = r.choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - every failure is a counted error
                results[i] = exc

    await asyncio.gather(*(one(i) for i in range(args.n)))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--urls", required=True)
    p.add_argument("--rpm", type=int, default=6000)
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("-c", type=int, default=64)
    p.add_argument("--strategy", default="simple-shuffle")
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import logging

    import litellm
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "openai"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from importlib.metadata import version

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    results = asyncio.run(run(args, litellm))
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ok = sum(1 for i, r in enumerate(results) if r == f"echo: prompt {i}")
    errors = [r for r in results if isinstance(r, Exception)]
    kinds: dict = {}
    for exc in errors:
        kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"client": f"LiteLLM Router ({args.strategy})",
                      "version": version("litellm"), "n": args.n, "wall_s": round(wall, 2),
                      "rps": round(ok / wall, 1), "ok": ok, "errors": len(errors),
                      "error_kinds": kinds, "cpu_s": round(cpu, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
