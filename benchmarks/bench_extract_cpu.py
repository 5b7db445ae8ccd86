#!/usr/bin/env python3
"""df.sem_extract at batch_size=1 on the C mock: rows/s and client CPU per row.

    make -C benchmarks
    PYTHONPATH=python python benchmarks/bench_extract_cpu.py --label new
    PYTHONPATH=/path/to/old/package python benchmarks/bench_extract_cpu.py --label old

Run two builds one after the other (alternating, in one shell session) to compare them:
the machine's noise moves both. Every row's values are checked.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="semex")
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("-c", type=int, default=1000, help="requests in flight")
    p.add_argument("--latency-ms", type=float, default=50)
    p.add_argument("--repeat", type=int, default=3, help="runs; the best CPU is reported")
    args = p.parse_args()

    import pandas as pd

    import semex

    mock = subprocess.Popen([os.path.join(HERE, "build", "mockserver"), "--port", "0",
                             "--latency-ms", f"{args.latency_ms:g}", "--stdin-watch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(mock.stdout.readline().split()[1])
    lm = semex.LM("m", api_base=f"http://127.0.0.1:{port}/v1", api_key="sk-bench",
                  max_concurrency=args.c, temperature=None)
    df = pd.DataFrame({"text": [f"mail {i}: quarterly gas report ({i % 97}) please review"
                                for i in range(args.n)]})
    fields = {"topic": None, "sender": None}
    df.head(100).sem_extract(["text"], fields, model=lm, batch_size=1, progress=False)
    best = None
    for _ in range(args.repeat):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        out = df.sem_extract(["text"], fields, model=lm, batch_size=1, progress=False)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        if not (out["extract_error"].isna().all() and out["topic"].str.startswith("topic:").all()):
            print("rows failed or values wrong", file=sys.stderr)
            return 1
        rec = (args.n / wall, cpu / args.n * 1e6)
        best = rec if best is None or rec[1] < best[1] else best
    print(f"{args.label}: {best[0]:,.0f} rows/s, {best[1]:.1f} us client CPU/row "
          f"(best of {args.repeat}; n={args.n}, c={args.c}, {args.latency_ms:g} ms)")
    lm.close()
    mock.stdin.close()
    mock.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
