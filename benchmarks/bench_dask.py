#!/usr/bin/env python3
"""sem_extract on one process vs a Dask cluster of 2 and 4 workers, side by side in one run.

    make -C benchmarks
    PYTHONPATH=python python benchmarks/bench_dask.py --n 20000 --rpm 60000

Part 1, a rate-limited provider: a fresh C mock (benchmarks/build/mockserver --rpm R: 429
with OpenAI's headers past the limit) per run; the LM gets the same rpm, so the whole run
must stay within it. Compared: the pandas accessor in one process; Dask workers leasing one
budget from the scheduler (cluster_limit=True); a fixed share per worker
(cluster_limit="split"); every worker applying the full limit itself (cluster_limit=False,
what a naive port does). Reported: rows/s against the allowed rate, the share of requests
the mock answered 429, rows lost.

Part 2, an unlimited provider and a CPU-heavy per-row step after the call (--cpu-ms per row
of pure-Python work), where more worker processes help: one process vs 2 and 4 workers.

Machine noise: runs are one after another in the same invocation; read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "build", "mockserver")
FIELDS = {"topic": None, "sender": None}


class Mock:
    def __init__(self, *extra: str):
        self.proc = subprocess.Popen([MOCK, "--port", "0", "--stdin-watch", *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT"):
            raise RuntimeError(f"mockserver did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


def frame(n: int):
    import pandas as pd

    return pd.DataFrame({"id": range(n), "text": [f"mail {i}: quarterly gas report, please "
                                                   f"review ({i % 97})" for i in range(n)]})


def heavy(text: str, cpu_ms: float) -> int:
    """Pure-Python work standing for a real per-row step (parsing, normalizing, scoring)."""
    end = time.process_time() + cpu_ms / 1000.0
    x = 0
    while time.process_time() < end:
        x = (x * 31 + len(text)) % 1000003
    return x


def run(label, df, lm_options, mock, workers, cluster_limit, cpu_ms=0.0, concurrency=64):
    import semex

    lm = semex.LM("bench", api_base=mock.base, api_key="sk-bench", max_concurrency=concurrency,
                  timeout=60, **lm_options)
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if workers == 0:
            out = df.sem_extract(["text"], FIELDS, model=lm, batch_size=1, progress=False)
            if cpu_ms:
                out["score"] = [heavy(t, cpu_ms) for t in out["topic"].fillna("")]
        else:
            import dask.dataframe as dd
            import distributed

            import semex.dask  # noqa: F401

            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               silence_logs=50)
            client = distributed.Client(cluster)
            started = time.monotonic()  # the cluster's start-up is not the job's
            ddf = dd.from_pandas(df, npartitions=workers * 4)
            res = ddf.sem_extract(["text"], FIELDS, model=lm, batch_size=1,
                                  cluster_limit=cluster_limit)
            if cpu_ms:
                res = res.assign(score=res["topic"].fillna("").apply(
                    heavy, args=(cpu_ms,), meta=("score", "int64")))
            out = res.compute()
            client.close()
            cluster.close()
    wall = time.monotonic() - started
    lm.close()
    stats = mock.stats()
    lost = int(out["extract_error"].notna().sum())
    return {"label": label, "workers": workers, "rows": len(out), "wall_s": round(wall, 2),
            "rows_per_s": round(len(out) / wall, 1), "requests": stats["requests"],
            "answered_429": stats["responses_429"],
            "share_429": round(stats["responses_429"] / max(1, stats["requests"]), 4),
            "lost": lost}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="rows per run (part 1)")
    p.add_argument("--rpm", type=float, default=60000, help="the mock's and the LM's limit")
    p.add_argument("--latency-ms", type=float, default=50)
    p.add_argument("--workers", default="2,4", help="Dask cluster sizes to compare")
    p.add_argument("--cpu-n", type=int, default=2000, help="rows per run (part 2)")
    p.add_argument("--cpu-ms", type=float, default=5.0, help="CPU per row in part 2")
    p.add_argument("--json", default=None, help="also write the records here")
    args = p.parse_args()
    sizes = [int(x) for x in args.workers.split(",") if x]
    allowed = args.rpm / 60.0
    records = []

    df = frame(args.n)
    print(f"part 1: {args.n} rows, limit {args.rpm:g} rpm = {allowed:g}/s, "
          f"latency {args.latency_ms:g} ms", flush=True)
    configs = [("1 process (pandas accessor)", 0, True)]
    for w in sizes:
        configs += [(f"{w} workers, leased budget", w, True),
                    (f"{w} workers, fixed share", w, "split"),
                    (f"{w} workers, each the full limit", w, False)]
    for label, workers, limit in configs:
        mock = Mock("--rpm", f"{args.rpm:g}", "--latency-ms", f"{args.latency_ms:g}")
        try:
            rec = run(label, df, {"rpm": args.rpm}, mock, workers, limit)
        finally:
            mock.stop()
        rec["part"] = "rate-limited"
        rec["of_allowed"] = round(rec["rows_per_s"] / allowed, 3)
        records.append(rec)
        print(f"  {label:36s} {rec['rows_per_s']:8.1f} rows/s = {rec['of_allowed']:5.1%} of "
              f"allowed, 429s {rec['share_429']:6.2%} of {rec['requests']} requests, "
              f"lost {rec['lost']}", flush=True)

    df = frame(args.cpu_n)
    print(f"part 2: {args.cpu_n} rows, no limit, {args.cpu_ms:g} ms of CPU per row after the "
          "call", flush=True)
    for workers in [0] + sizes:
        label = "1 process" if workers == 0 else f"{workers} workers"
        mock = Mock("--latency-ms", f"{args.latency_ms:g}")
        try:
            rec = run(label, df, {}, mock, workers, False, cpu_ms=args.cpu_ms)
        finally:
            mock.stop()
        rec["part"] = "cpu-heavy"
        records.append(rec)
        print(f"  {label:36s} {rec['rows_per_s']:8.1f} rows/s, wall {rec['wall_s']} s",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
