#!/usr/bin/env python3
"""LOTUS client: df.sem_extract(["text"], {"answer": None}) over a DataFrame of N rows.

    python benchmarks/clients/lotus_extract.py --url http://127.0.0.1:PORT/v1 --n 2000 -c 64
        [--max-retries R] [--rate-limit RPM]

lotus.settings.configure(lm=LM(model="openai/<model>", api_base=URL, api_key=...,
max_batch_size=C, max_retries=R)), cache off (LOTUS's default). LOTUS is synchronous: LM
calls litellm.batch_completion, a ThreadPoolExecutor of max_batch_size threads each running
the blocking litellm.completion (so C threads). --rate-limit sets LM(rate_limit=RPM), LOTUS's
own requests-per-minute pacing (it caps max_batch_size at RPM and sleeps between batches).

LOTUS asks for {"type": "json_object"} without a schema; the mock answers
{"answer": "answer:<FNV-1a 32 of the whole user message>"}, and every row's value is checked
against LOTUS's own prompt for that row (task_instructions.df2multimodal_info +
extract_formatter), so a row mix-up shows as a mismatch.
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
    p.add_argument("--pool", action="store_true",
                   help="give LiteLLM's synchronous OpenAI calls one httpx.Client with "
                        "Limits(max_connections=C, max_keepalive_connections=C) through "
                        "litellm.client_session (default: LiteLLM's own client, httpx's "
                        "default pool of 100 connections, 20 kept alive)")
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
    if args.pool:
        import httpx
        import litellm
        litellm.client_session = httpx.Client(
            limits=httpx.Limits(max_connections=args.c, max_keepalive_connections=args.c),
            timeout=args.timeout, follow_redirects=True)
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
        # LOTUS asks for {"type": "json_object"} without a schema: the mock answers
        # {"answer": "answer:<FNV-1a of the whole user message>"}, so row i's expected value
        # comes from LOTUS's own prompt for row i.
        from lotus.templates import task_instructions
        values = list(out["answer"])
        ok, errors = len(values), 0
        mismatches = unchecked = 0
        docs = task_instructions.df2multimodal_info(df, ["text"])  # LOTUS's own rendering
        for i, value in enumerate(values):
            messages = task_instructions.extract_formatter(lm, docs[i], {"answer": None},
                                                           False, None)
            user = [m["content"] for m in messages if m.get("role") == "user"][-1]
            if not isinstance(value, str):
                unchecked += 1
            elif value != cm.mock_string_value("answer", user):
                mismatches += 1
    notes = (f"max_batch_size={args.c} (threads), max_retries={args.max_retries}, cache off"
             + (f", rate_limit={args.rate_limit}" if args.rate_limit else "")
             + (f", litellm.client_session pool of {args.c}" if args.pool else "")
             + "; every row's value checked")
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
