"""Peak memory of ``df.sem_extract`` over N short rows, against the C mock at 0 ms latency.

    PYTHONPATH=python python benchmarks/bench_extract_memory.py [--n 1000000]

The target ("memory flat in the number of rows") is checked on **peak RSS growth**: the
process's peak resident set during the call (VmHWM from /proc/self/status, after resetting it
to the current RSS by writing "5" to /proc/self/clear_refs just before the call) minus its RSS
right before the call (frame built, semex and pandas imported, engine warmed by a tiny call,
garbage collected, ``malloc_trim``-ed and pyarrow's pool released, so that the call cannot
quietly reuse memory freed while building the frame). The verdict is growth <= 2 x the input
frame's own size, ``df.memory_usage(deep=True).sum()``; the absolute peak RSS is printed
beside it. If clear_refs cannot be written, the peak comes from a thread sampling VmRSS every
2 ms (``peak_method`` says which; sampling can miss a short spike).

The frame: one str column ``text`` = f"order {i}: customer {i % 9973} bought item {i % 313}"
(every row distinct). Output columns ``customer`` and ``item``. The mock answers a
``response_format`` json_schema with schema-shaped objects, string fields as
``<field>:<FNV-1a-32 of the document text, 8 hex>``; every row of the result is checked
against that (``--server fake`` uses tests/fakeserver.py instead, where a field is
``<field>:<document's first line without its "[column]: " prefix>``; slow, for small N).

Prints one JSON line, then a one-line verdict.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIELDS = {"customer": "the customer's number", "item": "the item's number"}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Give freed memory back to the OS, so the call cannot quietly reuse what building the
    frame left behind (pyarrow's pool keeps tens of MB of freed pages otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass


class Sampler(threading.Thread):
    """Fallback peak: VmRSS sampled every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = status_kb("VmRSS")
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, status_kb("VmRSS"))


def start_server(kind: str, mock: str):
    if kind == "mock":
        cmd = [mock, "--port", "0", "--latency-ms", "0", "--stdin-watch"]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "tests", "fakeserver.py"), "--port", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"{cmd[0]} did not print 'PORT <n>' (got {line!r})")
    return proc, int(line.split()[1])


def fnv1a32(texts):
    """FNV-1a 32-bit of each string's UTF-8 bytes, vectorised over the rows."""
    import numpy as np
    import pyarrow as pa

    arr = pa.array(texts, type=pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
    lengths = np.diff(offsets)
    h = np.full(len(arr), 0x811C9DC5, dtype=np.uint64)
    for pos in range(int(lengths.max()) if len(arr) else 0):
        live = lengths > pos
        byte = data[np.minimum(offsets[:-1] + pos, len(data) - 1)].astype(np.uint64)
        h = np.where(live, ((h ^ byte) * 16777619) & 0xFFFFFFFF, h)
    return h


def expected_values(df, kind: str):
    import pandas as pd

    rendered = "[text]: " + df["text"]
    if kind == "fake":
        return {name: name + ":" + df["text"] for name in FIELDS}
    hexes = pd.Series([f"{x:08x}" for x in fnv1a32(rendered).tolist()], index=df.index)
    return {name: name + ":" + hexes for name in FIELDS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--server", choices=["mock", "fake"], default="mock")
    ap.add_argument("--mock", default=os.path.join(HERE, "build", "mockserver"))
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=64,
                    help="LM max_concurrency and max_concurrent_batches")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip checking every row")
    args = ap.parse_args()

    proc, port = start_server(args.server, args.mock)
    try:
        import pandas as pd
        import semex

        n = args.n
        df = pd.DataFrame({"text": pd.array(
            [f"order {i}: customer {i % 9973} bought item {i % 313}" for i in range(n)],
            dtype="str")})
        frame_bytes = int(df.memory_usage(deep=True).sum())
        lm = semex.LM("mock", api_base=f"http://127.0.0.1:{port}/v1", api_key="bench",
                      max_concurrency=args.concurrency)
        options = dict(model=lm, batch_size=args.batch_size,
                       max_concurrent_batches=args.concurrency, progress=args.progress)
        warm = pd.DataFrame({"text": ["warm up one", "warm up two"]}).sem_extract(
            ["text"], FIELDS, **options)
        if args.server == "mock" and not str(warm.loc[0, "customer"]).startswith("customer:"):
            raise SystemExit("the mock does not answer response_format with schema-shaped "
                             f"JSON yet (got {warm.loc[0, 'customer']!r}); rebuild it "
                             "(make -C benchmarks) or use --server fake")
        del warm
        trim()
        rss_before = status_kb("VmRSS")
        exact = reset_peak()
        sampler = None
        if not exact:
            sampler = Sampler()
            sampler.start()
        started = time.perf_counter()
        out = df.sem_extract(["text"], FIELDS, **options)
        wall = time.perf_counter() - started
        if exact:
            peak = status_kb("VmHWM")
        else:
            sampler.stop.set()
            sampler.join()
            peak = sampler.peak
        rss_after = status_kb("VmRSS")

        bad = errors = None
        if not args.no_check:
            expected = expected_values(df, args.server)
            bad = sum(int((out[name] != want).sum()) for name, want in expected.items())
            errors = int(out["extract_error"].notna().sum())
        growth = (peak - rss_before) * 1024
        result = {
            "bench": "extract_memory", "n": n, "server": args.server,
            "semex": os.path.dirname(semex.__file__), "pandas": pd.__version__,
            "batch_size": args.batch_size, "concurrency": args.concurrency,
            "frame_bytes": frame_bytes, "rss_before_bytes": rss_before * 1024,
            "peak_rss_bytes": peak * 1024, "peak_growth_bytes": growth,
            "rss_after_bytes": rss_after * 1024,
            "result_frame_bytes": int(out.memory_usage(deep=True).sum()),
            "growth_over_frame": round(growth / frame_bytes, 3), "target": 2.0,
            "peak_method": "VmHWM after clear_refs" if exact else "VmRSS sampled every 2 ms",
            "wall_s": round(wall, 2), "rows_per_s": round(n / wall),
            "bad_values": bad, "error_rows": errors,
            "dtypes": {c: str(out[c].dtype) for c in (*FIELDS, "extract_error")},
        }
        print(json.dumps(result))
        ok = growth <= 2 * frame_bytes
        if bad is None:
            checked = "rows not checked"
        elif bad == 0 and errors == 0:
            checked = "every row checked"
        else:
            checked = f"{bad} bad values, {errors} error rows"
        print(f"{'PASS' if ok else 'FAIL'}: peak RSS growth {growth / 1e6:.1f} MB = "
              f"{growth / frame_bytes:.2f} x the frame's {frame_bytes / 1e6:.1f} MB (target "
              f"<= 2x); absolute peak {peak / 1024:.0f} MB; {wall:.1f} s; {checked}")
        return 0 if ok and not bad and not errors else 1
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
