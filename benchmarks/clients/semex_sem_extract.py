#!/usr/bin/env python3
"""semex.sem_extract client: N documents {"text": "prompt i"}, output_cols {"answer": None}.

    python benchmarks/clients/semex_sem_extract.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--batch-size 1|10] [--rpm R --tpm T]

--batch-size 1 sends one document per call (use_batch_processing=False); 10 puts ten
numbered documents in one prompt. LM(max_concurrency=C), max_concurrent_batches=C.

The mock provider only echoes the prompt, so no answer is a valid extraction: every row
ends as ResponseFormatError after semex's own recovery (a rejected row is re-asked once
with the error in the prompt; a batch answer that cannot be read is halved down to single
documents). Those rows are counted as "format_errors", not as errors, and values are not
checked. "errors" counts every other failure (HTTP, transport, timeouts). A row mix-up is
still detectable: raw_outputs[i] echoes the prompt that was sent for row i, which ends
with document i's text, so "mismatches" counts raw answers quoting another row's document.
"rps" is rows per second; "requests" (HTTP attempts) shows how many calls that took.
"""
from __future__ import annotations

import sys

import _common as cm


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rpm", type=float, default=None)
    p.add_argument("--tpm", type=float, default=None)
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    import semex
    from semex import errors as E

    lm = semex.LM(args.model, api_base=args.url, api_key="sk-bench", max_concurrency=args.c,
                  workers=args.workers, timeout=args.timeout, max_retries=args.max_retries,
                  temperature=None, rpm=args.rpm, tpm=args.tpm)
    docs = [{"text": p_} for p_ in cm.prompts(args.n)]
    opts = dict(progress=False, max_concurrent_batches=args.c)
    if args.batch_size <= 1:
        opts["use_batch_processing"] = False
    else:
        opts["batch_size"] = args.batch_size
    with cm.Meter() as m:
        res = semex.sem_extract(docs, lm, {"answer": None}, **opts)
    n_out = len(res.outputs)
    errs = [e for e in res.errors if e is not None]
    fmt = sum(isinstance(e, E.ResponseFormatError) for e in errs)
    other = [e for e in errs if not isinstance(e, E.ResponseFormatError)]
    # an answered row: a value, or an answer that came back but could not be read
    ok = n_out - len(other)
    mismatches = 0
    unchecked = 0
    for i, raw in enumerate(res.raw_outputs):
        j = cm.doc_index(raw)
        if j is None:
            unchecked += 1
        elif j != i:
            mismatches += 1
    u = res.usage
    rc = cm.emit(f"semex sem_extract b={args.batch_size}", args, m, ok=ok, errors=len(other),
                 mismatches=mismatches, retried=u.retries, got_429=u.rate_limited,
                 requests=u.requests, prompt_tokens=u.prompt_tokens, format_errors=fmt,
                 raw_unchecked=unchecked,
                 error_kinds=cm.count_kinds(other),
                 notes=("values not checked (the mock echoes; every row is a "
                        "ResponseFormatError after semex's re-ask/split recovery)"),
                 version=semex.__version__)
    lm.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
