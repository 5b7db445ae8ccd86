#!/usr/bin/env python3
"""df.sem_extract at batch_size=1 on the C mock beside llm_batch of the same prompts: rows/s,
client CPU per row, and the share of it spent on the Python thread.

    make -C benchmarks
    python benchmarks/bench_extract_cpu.py --label new
    PYTHONPATH=/path/to/old/package python benchmarks/bench_extract_cpu.py --label old

Both clients run in one process against one mock, interleaved, ``--repeat`` times each;
the machine's noise moves both, so compare them within a run (and two builds one after the
other, alternating). Every extracted value is checked. *python thread* is the calling
thread's CPU (time.thread_time): what the Python layer costs per row; the rest of the
process's CPU is the engine's I/O worker (libcurl, answer parsing).
"""
from __future__ import annotations

import argparse
import os
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
    p.add_argument("--repeat", type=int, default=3, help="runs of each client")
    args = p.parse_args()

    import pandas as pd

    import semex

    mock = subprocess.Popen([os.path.join(HERE, "build", "mockserver"), "--port", "0",
                             "--latency-ms", f"{args.latency_ms:g}", "--stdin-watch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(mock.stdout.readline().split()[1])
    lm = semex.LM("m", api_base=f"http://127.0.0.1:{port}/v1", api_key="sk-bench",
                  max_concurrency=args.c, temperature=None)
    texts = [f"mail {i}: quarterly gas report ({i % 97}) please review"
             for i in range(args.n)]
    df = pd.DataFrame({"text": texts})
    prompts = ["Document:\n[text]: " + t for t in texts]
    fields = {"topic": None, "sender": None}
    df.head(100).sem_extract(["text"], fields, model=lm, batch_size=1, progress=False)

    def extract():
        out = df.sem_extract(["text"], fields, model=lm, batch_size=1, progress=False)
        return out["extract_error"].isna().all() and out["topic"].str.startswith(
            "topic:").all()

    def batch():
        out = semex.llm_batch(prompts, model=lm, max_concurrent=args.c, progress=False)
        return not out.errors or all(e is None for e in out.errors)

    runs = {"df.sem_extract batch_size=1": (extract, []), "llm_batch": (batch, [])}
    for _ in range(args.repeat):
        for name, (fn, records) in runs.items():
            c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
            ok = fn()
            wall = time.perf_counter() - w0
            cpu, thread = time.process_time() - c0, time.thread_time() - t0
            if not ok:
                print(f"{name}: rows failed or values wrong", file=sys.stderr)
                return 1
            records.append((args.n / wall, cpu / args.n * 1e6, thread / args.n * 1e6))
    print(f"{args.label} (n={args.n}, c={args.c}, {args.latency_ms:g} ms mock; "
          f"{args.repeat} runs each, ranges):")
    for name, (_, records) in runs.items():
        rate = sorted(r[0] for r in records)
        cpu = sorted(r[1] for r in records)
        thread = sorted(r[2] for r in records)
        print(f"  {name:28s} {rate[0]:,.0f}-{rate[-1]:,.0f} rows/s, "
              f"{cpu[0]:.0f}-{cpu[-1]:.0f} us CPU/row, python thread "
              f"{thread[0]:.1f}-{thread[-1]:.1f} us/row")
    lm.close()
    mock.stdin.close()
    mock.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
