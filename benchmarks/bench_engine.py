#!/usr/bin/env python3
"""Raw semex._engine client (no prompt building, no answer parsing) for engine profiling.

    python benchmarks/bench_engine.py --url http://127.0.0.1:PORT/v1 -n 20000 -c 1000
        [--mode raw|llm_batch] [--workers 1] [--prompt-bytes 0] [--sample-ms 0]

raw:       one Engine.submit of all n bodies (the same bodies bench_semex.py sends), one wait.
llm_batch: semex.llm_batch through an LM, as bench_semex.py does.

Prints one JSON line: wall, req/s, wall / ideal (n * 0.05 / c, pass --latency-ms), CPU per
request (getrusage), peak RSS (ru_maxrss) and the VmRSS sampled every --sample-ms from a
thread (baseline before the run, peak during it), plus the mock server's /_stats
(max_open_connections shows whether connections were reused).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
import urllib.request


def vmrss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def server_stats(url: str) -> dict:
    base = url.split("/v1")[0]
    try:
        with urllib.request.urlopen(base + "/_stats", timeout=5) as r:
            return json.loads(r.read())
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return {"error": str(exc)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("-c", type=int, default=1000)
    p.add_argument("--mode", choices=["raw", "llm_batch"], default="raw")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--sample-ms", type=float, default=0.0,
                   help="also sample VmRSS every this many ms (costs CPU; 0: off, ru_maxrss only)")
    p.add_argument("--prompt-bytes", type=int, default=0,
                   help="pad each prompt to about this many bytes (the mock echoes it back, so "
                        "responses grow by as much)")
    args = p.parse_args(argv)

    if args.mode == "raw":
        # Load the extension alone: importing the semex package pulls in pandas/numpy,
        # whose memory would hide the engine's own.
        import glob
        import importlib.util
        import os
        so = None
        for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) + sys.path:
            hits = glob.glob(os.path.join(d or ".", "semex", "_engine*.so"))
            if hits:
                so = hits[0]
                break
        spec = importlib.util.spec_from_file_location("_engine", so)
        _engine = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_engine)
    else:
        import semex

    pad = " " + "x" * max(0, args.prompt_bytes - 12) if args.prompt_bytes else ""
    prompts = [f"prompt {i}{pad}" for i in range(args.n)]
    stats0 = server_stats(args.url)
    rss_base = vmrss_kb()
    peak = [rss_base]
    stop = threading.Event()

    def sampler():
        if args.sample_ms <= 0:
            return
        while not stop.is_set():
            v = vmrss_kb()
            if v > peak[0]:
                peak[0] = v
            time.sleep(args.sample_ms / 1000.0)

    th = threading.Thread(target=sampler, daemon=True)
    errors = 0
    lat = {}
    if args.mode == "raw":
        eng = _engine.Engine(workers=args.workers, max_in_flight=args.c)
        headers = ["Content-Type: application/json", "Authorization: Bearer sk-bench"]
        bodies = [json.dumps({"model": "mock", "messages": [{"role": "user", "content": s}]})
                  .encode() for s in prompts]
        rss_base = vmrss_kb()
        peak[0] = rss_base
        th.start()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        b = eng.submit(args.url + "/chat/completions", headers, bodies, timeout=300)
        b.wait()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        res = b.results()
        errors = sum(1 for r in res if r[0] != _engine.OK)
        lats = sorted(r[6] for r in res)
        lat = {"lat_mean_ms": round(sum(lats) / len(lats) * 1e3, 2),
               "lat_p50_ms": round(lats[len(lats) // 2] * 1e3, 2),
               "lat_p99_ms": round(lats[int(len(lats) * 0.99)] * 1e3, 2),
               # the first c requests open the connections; the rest reuse them
               "lat_first_c_mean_ms": round(sum(r[6] for r in res[:args.c]) /
                                            max(1, len(res[:args.c])) * 1e3, 2),
               "lat_rest_mean_ms": round(sum(r[6] for r in res[args.c:]) /
                                         max(1, len(res[args.c:])) * 1e3, 2)}
        del res, b
        eng.close()
    else:
        lm = semex.LM("mock", api_base=args.url, api_key="sk-bench", max_concurrency=args.c,
                      workers=args.workers, timeout=300, temperature=None)
        th.start()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        answers = semex.llm_batch(prompts, model=lm, max_concurrent=args.c, errors="objects")
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        errors = sum(not isinstance(a, str) for a in answers)
        lm.close()
    stop.set()
    th.join()
    stats1 = server_stats(args.url)
    ideal = args.n * args.latency_ms / 1000.0 / args.c
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({
        "mode": args.mode, "n": args.n, "c": args.c, "prompt_bytes": args.prompt_bytes,
        "wall_s": round(wall, 4), "rps": round(args.n / wall, 1),
        "of_ideal": round(wall / ideal, 3),
        "cpu_us_per_req": round(cpu / args.n * 1e6, 2),
        "cpu_user_s": round(r1.ru_utime - r0.ru_utime, 3),
        "cpu_sys_s": round(r1.ru_stime - r0.ru_stime, 3),
        "max_rss_mb": round(r1.ru_maxrss / 1024.0, 1),
        "vmrss_base_mb": round(rss_base / 1024.0, 1),
        "vmrss_peak_mb": round(peak[0] / 1024.0, 1),
        "errors": errors,
        "server_requests": stats1.get("requests", 0) - stats0.get("requests", 0),
        "server_max_open": stats1.get("max_open_connections"),
        **lat,
        "t0_monotonic": t0, "t1_monotonic": t0 + wall,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
