#!/usr/bin/env python3
"""semex.llm_batch client: N prompts in one call through semex's C engine.

    python benchmarks/clients/semex_llm_batch.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--workers 1] [--rpm R --tpm T] [--provider openai|anthropic|gemini]

LM(max_concurrency=C, workers=W, timeout, max_retries) and llm_batch(max_concurrent=C);
request bodies are built and answers parsed inside the timed run. retried / got_429 come
from lm.total_usage (retry attempts, 429 answers). See _common.py for the output line.
"""
from __future__ import annotations

import sys

import _common as cm


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1, help="engine I/O threads")
    p.add_argument("--rpm", type=float, default=None, help="client-side requests/minute")
    p.add_argument("--tpm", type=float, default=None, help="client-side tokens/minute")
    p.add_argument("--provider", default="openai", choices=["openai", "anthropic", "gemini"],
                   help="the wire format (native dialects at the API root: a trailing /v1 of "
                   "--url is dropped)")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    import semex

    url = args.url
    if args.provider != "openai" and url.rstrip("/").endswith("/v1"):
        url = url.rstrip("/")[:-3]
    extra = {"max_tokens": 64} if args.provider == "anthropic" else {}
    lm = semex.LM(args.model, api_base=url, api_key="sk-bench", max_concurrency=args.c,
                  workers=args.workers, timeout=args.timeout, max_retries=args.max_retries,
                  temperature=None, rpm=args.rpm, tpm=args.tpm, provider=args.provider,
                  **extra)
    rows = cm.prompts(args.n)
    with cm.Meter() as m:
        answers = semex.llm_batch(rows, model=lm, max_concurrent=args.c, errors="objects")
    ok = sum(isinstance(a, str) for a in answers)
    errs = [a for a in answers if not isinstance(a, str)]
    mismatches = sum(isinstance(a, str) and a != cm.expected(i) for i, a in enumerate(answers))
    u = lm.total_usage
    notes = f"workers={args.workers}"
    if args.provider != "openai":
        notes += f", provider={args.provider}" + (", max_tokens=64" if extra else "")
    if args.rpm or args.tpm:
        notes += f", client-side rpm={args.rpm:g} tpm={args.tpm:g}" if args.tpm else \
            f", client-side rpm={args.rpm:g}"
    name = "semex llm_batch" + ("" if args.provider == "openai" else f" ({args.provider})")
    rc = cm.emit(name, args, m, ok=ok, errors=len(errs), mismatches=mismatches,
                 retried=u.retries, got_429=u.rate_limited, requests=u.requests,
                 prompt_tokens=u.prompt_tokens,
                 answered=len(answers), error_kinds=cm.count_kinds(errs), notes=notes,
                 version=semex.__version__)
    lm.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
