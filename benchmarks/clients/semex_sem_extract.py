#!/usr/bin/env python3
"""semex.sem_extract client: N documents {"text": "prompt i"}, output_cols {"answer": None}.

    python benchmarks/clients/semex_sem_extract.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--batch-size 1|10] [--rpm R --tpm T] [--structured-output json_schema|json_object]

--batch-size 1 sends one document per call (use_batch_processing=False); 10 puts ten
numbered documents in one prompt. LM(max_concurrency=C), max_concurrent_batches=C, and
structured_output json_schema (semex's default: OpenAI's response_format json_schema) or
json_object (llama.cpp's {"type": "json_object", "schema": ...}).

The mock provider answers a response_format request with a JSON object shaped by its
schema (benchmarks/build/mockserver --help): a string field is "<name>:<FNV-1a 32 hex of the
document's text>", where the document is the text semex rendered for the row
(semex.extract.render_document: "[text]: prompt i") and put after "Document:" or under
"Document <k>:", and a batch item's "id" is its k. So every row is checked: "mismatches"
counts rows whose value is not the one computed here for that row's own document (a row
mix-up, a lost or mangled value). "errors" counts rows that came back with an error,
ResponseFormatError included (the mock answers every shape semex asks for, so there
should be none; "format_errors" gives their number). "rps" is rows per second;
"requests" (HTTP attempts) should be ~1 per row at batch size 1 and ~1/10 at 10.
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
    p.add_argument("--structured-output", choices=["json_schema", "json_object"],
                   default="json_schema")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    import semex
    from semex import errors as E
    try:
        from semex.extract import render_document
    except ImportError:  # an older semex: its rendering then was the same
        def render_document(doc):
            return "\n".join(f"[{k}]: {v}" for k, v in doc.items())

    lm = semex.LM(args.model, api_base=args.url, api_key="sk-bench", max_concurrency=args.c,
                  workers=args.workers, timeout=args.timeout, max_retries=args.max_retries,
                  temperature=None, rpm=args.rpm, tpm=args.tpm,
                  structured_output=args.structured_output)
    docs = [{"text": p_} for p_ in cm.prompts(args.n)]
    expected = [cm.mock_string_value("answer", render_document(d)) for d in docs]
    opts = dict(progress=False, max_concurrent_batches=args.c)
    if args.batch_size <= 1:
        opts["use_batch_processing"] = False
    else:
        opts["batch_size"] = args.batch_size
    with cm.Meter() as m:
        res = semex.sem_extract(docs, lm, {"answer": None}, **opts)
    errs = [e for e in res.errors if e is not None]
    fmt = sum(isinstance(e, E.ResponseFormatError) for e in errs)
    mismatches, examples = 0, []
    for i, (row, err) in enumerate(zip(res.outputs, res.errors)):
        if err is None and row.get("answer") != expected[i]:
            mismatches += 1
            if len(examples) < 3:
                examples.append({"row": i, "got": row.get("answer"), "want": expected[i]})
    u = res.usage
    rc = cm.emit(f"semex sem_extract b={args.batch_size}", args, m, ok=len(res.outputs) - len(errs),
                 errors=len(errs), mismatches=mismatches, retried=u.retries,
                 got_429=u.rate_limited, requests=u.requests,
                 calls_per_row=round(u.requests / args.n, 3), prompt_tokens=u.prompt_tokens,
                 format_errors=fmt, error_kinds=cm.count_kinds(errs),
                 mismatch_examples=examples, structured_output=args.structured_output,
                 notes=(f"every value checked against the mock's schema answer "
                        f"({args.structured_output})"),
                 version=semex.__version__)
    lm.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
