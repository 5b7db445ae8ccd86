#!/usr/bin/env python3
"""A mode="batch" extraction end to end against the C mock's Batch API, beside the same
extraction online, in one run:

    make -C benchmarks && python benchmarks/bench_batch.py \\
        --data ../shared/data/enron-250.jsonl --batch-seconds 3

The mock (benchmarks/build/mockserver) answers a batch's lines with its online builders
once the batch's (fast-forwarded) life is over; --error-every K refuses every K-th line.
Each phase is ``df.sem_extract`` of the e-mails' text into three typed fields:

  online       the engine, one request per prompt
  batch        mode="batch": one upload, one batch, polling, two downloads
  batch again  the same call run again without an answer cache: the recorded batch is
               found and downloaded, nothing answered is paid twice; lines that failed are
               sent again in a new batch (as an online re-run retries its errors)
  with cache   the same with the answer cache on: the answers are stored as they are read
  cached       the same call again: answered from the cache, no network at all

Reported per phase: rows ok / failed, what the server saw (online requests, files,
batches, batch lines), wall time, tokens and cost (online prices $0.15/$0.60 per million,
batch at half), and whether the values equal the online run's. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import pandas as pd

import semex

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "build", "mockserver")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stats(root: str) -> dict:
    with _opener.open(root + "/_stats", timeout=5) as r:
        return json.load(r)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data",
                                                  "enron-250.jsonl"))
    p.add_argument("--batch-seconds", type=float, default=3.0)
    p.add_argument("--error-every", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="documents per prompt")
    args = p.parse_args(argv)
    if not os.path.exists(MOCK):
        sys.exit(f"{MOCK} is missing: run make -C benchmarks")
    frame = pd.read_json(args.data, lines=True)[["text"]]
    options = ["--batch-seconds", str(args.batch_seconds), "--latency-ms", "20"]
    if args.error_every:
        options += ["--batch-error-every", str(args.error_every)]
    proc = subprocess.Popen([MOCK, "--port", "0", "--stdin-watch", *options],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    root = f"http://127.0.0.1:{int(proc.stdout.readline().split()[1])}"
    fields = {"sender": "who sent the e-mail", "topic": "what it is about",
              "urgent": "whether it asks for something today"}
    folder = tempfile.mkdtemp(prefix="semex-bench-batch-")
    os.environ["SEMEX_CACHE_DIR"] = folder  # batch records of the cache-less phases
    rows, reference = [], None
    try:
        def phase(name, cache, mode):
            lm = semex.LM("gpt-4o-mini", api_base=root + "/v1", api_key="sk-bench",
                          cache=cache, input_price_per_million=0.15,
                          output_price_per_million=0.60, max_concurrency=64)
            before = stats(root)
            t0 = time.perf_counter()
            out = frame.sem_extract("text", fields, model=lm, batch_size=args.batch_size,
                                    use_batch_processing=args.batch_size > 1,
                                    progress=False, mode=mode)
            wall = time.perf_counter() - t0
            after = stats(root)
            usage = lm.total_usage
            lm.close()
            failed = int(out["extract_error"].notna().sum()) if "extract_error" in out else 0
            ok = out["extract_error"].isna() if "extract_error" in out else \
                pd.Series(True, index=out.index)
            values = out[list(fields)].astype(str).where(ok, None).values.tolist()
            same = "-" if reference is None else str(all(
                v == r for v, r, good in zip(values, reference, ok) if good)).lower()
            rows.append({
                "phase": name, "rows ok": len(out) - failed, "failed": failed,
                "online requests": after["requests"] - before["requests"],
                "files": after["batch_files"] - before["batch_files"],
                "batches": after["batches_created"] - before["batches_created"],
                "batch lines": after["batch_lines"] - before["batch_lines"],
                "wall s": round(wall, 2),
                "tokens": usage.prompt_tokens + usage.completion_tokens,
                "cost $": None if usage.cost is None else round(usage.cost, 5),
                "from cache": usage.cached,
                "ok rows equal online": same})
            return values

        mode = semex.BatchMode(poll_interval=0.2, max_poll_interval=1.0)
        reference = phase("online", False, None)
        phase("batch", False, mode)
        phase("batch again (no answer cache)", False, mode)
        # the default cache file of SEMEX_CACHE_DIR: where the phases above recorded their
        # batch, so this one finds it and stores its answers
        phase("batch, with the answer cache", True, mode)
        phase("cached re-run", True, mode)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    head = list(rows[0])
    print(f"{len(frame)} e-mails from {os.path.basename(args.data)}, 3 fields, batch_size "
          f"{args.batch_size}; mock batch life {args.batch_seconds} s"
          + (f", every {args.error_every}th line refused" if args.error_every else "") + "\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in head) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
