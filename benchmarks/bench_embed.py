#!/usr/bin/env python3
"""N chunks embedded by semex.embed vs openai.AsyncOpenAI.embeddings (and LOTUS), on the C mock.

    make -C benchmarks
    python benchmarks/bench_embed.py --n 100000 --dim 256 --batch 256 -c 16 \
        [--latency-ms 20] [--mock-threads 1] [--python /work/.benchvenv/bin/python]
        [--clients semex,openai]

Both clients send the same requests: `--batch` chunks per POST /embeddings, at most `-c`
in flight, encoding_format "base64" (openai-python's default; semex's too), and both end
with one float32 array (N, dim) in input order. The AsyncOpenAI client is the usual
script: one task per batch under an asyncio.Semaphore(c), each answer's vectors copied into
a preallocated numpy array (the SDK decodes base64 into a list of Python floats per
vector). Each client runs in a fresh process of `--python` (which needs semex, numpy and
openai installed); it reports wall time and, from getrusage around the run only, CPU per
chunk, and its RSS growth during the run (peak RSS minus RSS before it) beside the array's
own size. One run each; the mock answers after --latency-ms.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

CLIENT = textwrap.dedent(r'''
    import asyncio, json, resource, sys, time
    import numpy as np

    kind, url, n, dim, batch, c = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    texts = [f"chunk {i}: some words of a document, split for retrieval" for i in range(n)]

    def rss_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

    if kind == "ingest":  # semex.ingest into Qdrant's local mode, in a fresh directory
        import tempfile
        import semex
        rm = semex.EmbeddingModel("mock", api_base=url, api_key="sk-bench", dimensions=dim,
                                  max_batch_inputs=batch, max_concurrency=c)
        where = tempfile.mkdtemp(prefix="semex-bench-ingest-")
        chunks = [{"id": i, "text": t} for i, t in enumerate(texts)]
        def run():
            report = semex.ingest(chunks, where, model=rm, progress=False, store_text=False)
            assert report.upserted == n, report
            return np.zeros((n, dim), dtype=np.float32)  # the vectors live in the store
    elif kind == "semex":
        import semex
        rm = semex.EmbeddingModel("mock", api_base=url, api_key="sk-bench", dimensions=dim,
                                  max_batch_inputs=batch, max_concurrency=c)
        def run():
            return semex.embed(texts, rm, progress=False)
    elif kind == "lotus":
        # LOTUS's HTTP retrieval model (LiteLLM embeddings, one batch at a time, as LOTUS
        # runs it); LiteLLM reads the OpenAI-compatible base and key from the environment
        import os
        os.environ["OPENAI_API_BASE"] = url
        os.environ["OPENAI_API_KEY"] = "sk-bench"
        from lotus.models import LiteLLMRM
        rm = LiteLLMRM(model="openai/mock", max_batch_size=batch)
        def run():
            return np.asarray(rm(texts), dtype=np.float32)
    else:
        import openai
        # the SDK's own HTTP client: its pool (1,000 connections) is far above c
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=6)
        async def main():
            out = np.empty((n, dim), dtype=np.float32)
            sem = asyncio.Semaphore(c)
            async def one(start):
                async with sem:
                    resp = await client.embeddings.create(
                        model="mock", input=texts[start:start + batch], dimensions=dim)
                for item in resp.data:
                    out[start + item.index] = item.embedding
            await asyncio.gather(*(one(s) for s in range(0, n, batch)))
            return out
        def run():
            return asyncio.run(main())

    before_rss = rss_mb()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out = run()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    peak = r1.ru_maxrss / 1024
    print(json.dumps({"client": kind, "n": n, "dim": dim, "wall_s": round(wall, 3),
                      "chunks_per_s": round(n / wall), "cpu_us_per_chunk": round(cpu / n * 1e6, 1),
                      "rss_before_mb": round(before_rss, 1), "peak_rss_mb": round(peak, 1),
                      "rss_growth_mb": round(peak - before_rss, 1),
                      "array_mb": round(out.nbytes / 2**20, 1),
                      "checksum": float(np.float64(out.astype(np.float64).sum()))}))
''')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("-c", type=int, default=16)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--mock-threads", type=int, default=1)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--clients", default="semex,openai",
                   help="any of semex, openai, lotus (LOTUS's LiteLLMRM; needs lotus-ai in "
                        "--python), ingest (semex.ingest into Qdrant local mode)")
    args = p.parse_args()
    mock = os.path.join(HERE, "build", "mockserver")
    if not os.path.exists(mock):
        subprocess.run(["make", "-s", "-C", HERE], check=True)
    # --embed-dim: LOTUS sends no "dimensions", so the mock's default must be --dim too
    proc = subprocess.Popen([mock, "--port", "0", "--stdin-watch", "--latency-ms",
                             str(args.latency_ms), "--threads", str(args.mock_threads),
                             "--embed-dim", str(args.dim)],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}/v1"
        rows = []
        for kind in args.clients.split(","):
            res = subprocess.run([args.python, "-c", CLIENT, kind, url, str(args.n),
                                  str(args.dim), str(args.batch), str(args.c)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{kind} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
                return 1
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    first = rows[0] if rows and rows[0]["client"] == "semex" else None
    for b in rows[1:] if first else []:
        if b["client"] == "ingest":
            continue
        a = first
        same = "same" if a["checksum"] == b["checksum"] else "DIFFERENT"
        print(f"{a['client']}/{b['client']}: throughput x{a['chunks_per_s'] / b['chunks_per_s']:.1f}, "
              f"CPU per chunk x{a['cpu_us_per_chunk'] / b['cpu_us_per_chunk']:.2f}, "
              f"RSS growth {a['rss_growth_mb']} vs {b['rss_growth_mb']} MB for a "
              f"{a['array_mb']} MB array; arrays {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
