#!/usr/bin/env python3
"""LOTUS client: df.sem_extract(["text"], {"answer": None}) over a DataFrame of N rows.

    python benchmarks/clients/lotus_extract.py --url http://127.0.0.1:PORT/v1 --n 2000 -c 64
        [--max-retries R] [--rate-limit RPM]

lotus.settings.configure(lm=LM(model="openai/<model>", api_base=URL, api_key=...,
max_batch_size=C, max_retries=R)), cache off (LOTUS's default). LOTUS is synchronous: LM
calls litellm.batch_completion, a ThreadPoolExecutor of max_batch_size threads each running
the blocking litellm.completion (so C threads). --rate-limit sets LM(rate_limit=RPM), LOTUS's
own requests-per-minute pacing (it caps max_batch_size at RPM and sleeps between batches).

The mock echoes the prompt, so every answer fails LOTUS's JSON parse and the row's
extracted value is {} (LOTUS does not flag it); values are not checked. A row mix-up is
still detectable from raw_output (the echo of row i's prompt, which ends with document i).
A failed request makes LOTUS raise from inside sem_extract (the failed call returns an
exception object that LOTUS then reads as a response), which aborts the whole call: then
every row is counted as an error and "aborted" holds the exception.
"""
from __future__ import annotations

import sys

import _common as cm


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--rate-limit", type=int, default=None, help="LOTUS LM(rate_limit=RPM)")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    cm.quiet_third_parties()
    import logging
    import os

    os.environ.setdefault("AIOHTTP_CONNECTOR_LIMIT", str(args.c))
    import pandas as pd
    import lotus
    from lotus.models import LM
    from importlib.metadata import version
    logging.getLogger("lotus").setLevel(logging.WARNING)

    kw = dict(model="openai/" + args.model, api_base=args.url, api_key="sk-bench",
              max_batch_size=args.c, max_retries=args.max_retries, timeout=args.timeout)
    if args.rate_limit:
        kw["rate_limit"] = args.rate_limit
    lm = LM(**kw)
    lotus.settings.configure(lm=lm, enable_cache=False)
    df = pd.DataFrame({"text": cm.prompts(args.n)})
    aborted = None
    with cm.Meter() as m:
        try:
            out = df.sem_extract(["text"], {"answer": None}, return_raw_outputs=True)
        except Exception as exc:  # noqa: BLE001 - LOTUS aborts the call on a failed row
            aborted = f"{type(exc).__name__}: {str(exc)[:300]}"
            out = None
    if out is None:
        ok, errors, mismatches, unchecked = 0, args.n, 0, 0
    else:
        raws = list(out["raw_output"])
        ok, errors = len(raws), 0
        mismatches = unchecked = 0
        for i, raw in enumerate(raws):
            j = cm.doc_index(raw)
            if j is None:
                unchecked += 1
            elif j != i:
                mismatches += 1
    notes = (f"max_batch_size={args.c} (threads), max_retries={args.max_retries}, cache off"
             + (f", rate_limit={args.rate_limit}" if args.rate_limit else "")
             + "; values not checked (the mock echoes)")
    try:
        prompt_tokens = lm.stats.physical_usage.prompt_tokens
    except AttributeError:
        prompt_tokens = None
    return cm.emit("LOTUS sem_extract", args, m, ok=ok, errors=errors, mismatches=mismatches,
                   retried=None, got_429=None, aborted=aborted, raw_unchecked=unchecked,
                   prompt_tokens=prompt_tokens,
                   notes=notes, version=version("lotus-ai"))


if __name__ == "__main__":
    sys.exit(main())
