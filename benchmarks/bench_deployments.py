#!/usr/bin/env python3
"""One LM over several deployments (LM(deployments=[...])) against rate-limited C mocks,
side by side in one run, beside LiteLLM's Router when its interpreter is given.

    make -C benchmarks
    python benchmarks/bench_deployments.py --rpm 6000 --seconds 30 \
        [--peer-python /path/to/venv-with-litellm/bin/python]

Each mock (benchmarks/build/mockserver --rpm R --latency-ms 50) answers 429 with OpenAI's
headers beyond R requests/min: one deployment of R/60 requests/s. Runs, each against fresh
mocks, each given --seconds of work at its allowed rate:
  1 deployment           LM(rpm=R) on one mock: the ceiling of one deployment
  2 deployments          LM(deployments=[(url1, key, R), (url2, key, R)]): should be 2x
  2, limits not given    the same without rpm: each deployment's limit is learned from its
                         429s (headers) alone
  2, one dies half-way   the first mock is killed at half the run: the other takes the rest
  LiteLLM Router         Router(model_list=[... rpm=R each]) under a semaphore of C
Reported: rows/s against the allowed rate (the sum of the live deployments' rates), the
mocks' 429 share, the split between deployments, rows lost.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "build", "mockserver")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Mock:
    def __init__(self, *extra: str):
        self.proc = subprocess.Popen([MOCK, "--port", "0", "--stdin-watch", *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT"):
            raise RuntimeError(f"mockserver did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.last = {"requests": 0, "responses_429": 0}

    def stats(self) -> dict:
        if self.proc.poll() is None:
            with _opener.open(f"http://127.0.0.1:{self.port}/_stats", timeout=10) as r:
                self.last = json.loads(r.read())
        return self.last

    def kill(self) -> None:
        self.stats()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.terminate()
            self.proc.wait(timeout=10)


def semex_run(label, mocks, deployments, n, concurrency, kill_at=None, **lm_options):
    import semex

    if deployments is None:
        lm = semex.LM("mock", api_base=mocks[0].base, api_key="sk-bench",
                      max_concurrency=concurrency, **lm_options)
    else:
        lm = semex.LM("mock", deployments=deployments, max_concurrency=concurrency,
                      **lm_options)
    prompts = [f"prompt {i}" for i in range(n)]
    killer = None
    if kill_at is not None:
        killer = threading.Timer(kill_at, mocks[0].kill)
        killer.start()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    out = semex.llm_batch(prompts, lm, max_concurrent=concurrency, errors="objects")
    wall = time.monotonic() - started
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if killer is not None:
        killer.join()
    usage = out.usage
    split = {}
    if usage.by_deployment:
        split = {f"d{i}": u.answered for i, u in enumerate(usage.by_deployment.values())}
    lm.close()
    ok = sum(1 for i, o in enumerate(out) if o == f"echo: {prompts[i]}")
    return ok, wall, split, cpu


def litellm_run(peer_python, mocks, rpm, n, concurrency):
    cmd = [peer_python, os.path.join(HERE, "clients", "litellm_router.py"), "--urls",
           ",".join(m.base for m in mocks), "--rpm", str(int(rpm)), "--n", str(n), "-c",
           str(concurrency)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rpm", type=float, default=6000, help="each mock's limit (requests/min)")
    p.add_argument("--seconds", type=float, default=30, help="work per run at its rate")
    p.add_argument("--latency-ms", type=float, default=50)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--peer-python", default=None,
                   help="an interpreter with litellm, to run its Router beside semex")
    p.add_argument("--json", default=None, help="also write the records here")
    args = p.parse_args()
    rate = args.rpm / 60.0
    mock_args = ("--rpm", str(int(args.rpm)), "--latency-ms", str(args.latency_ms))
    print(f"each deployment: a mock limited to {args.rpm:g} rpm = {rate:g} req/s, "
          f"{args.latency_ms:g} ms latency; C={args.concurrency}; {args.seconds:g} s of work "
          "per run", flush=True)
    records = []

    def report(label, ok, n, wall, allowed, mocks, split=None, notes="", cpu=None):
        st = [m.stats() for m in mocks]
        requests = sum(s["requests"] for s in st)
        refused = sum(s["responses_429"] for s in st)
        per = split or {f"d{i}": s["requests"] - s["responses_429"] for i, s in enumerate(st)}
        rec = {"label": label, "rows": n, "ok": ok, "lost": n - ok, "wall_s": round(wall, 2),
               "rows_per_s": round(ok / wall, 1), "allowed_per_s": allowed,
               "of_allowed": round(ok / wall / allowed, 3), "requests": requests,
               "answered_429": refused, "share_429": round(refused / max(1, requests), 4),
               "split": per, "client_cpu_us_per_row": round(1e6 * cpu / n) if cpu else None,
               "notes": notes}
        records.append(rec)
        print(f"  {label:<30} {rec['rows_per_s']:7.1f} rows/s = {100 * rec['of_allowed']:5.1f}% "
              f"of {allowed:g}/s, 429s {100 * rec['share_429']:5.2f}% of {requests} requests, "
              f"split {per}, lost {rec['lost']}, client CPU {rec['client_cpu_us_per_row']} "
              f"us/row {notes}", flush=True)

    n1 = int(rate * args.seconds)
    n2 = 2 * n1
    # 1 deployment
    m = [Mock(*mock_args)]
    ok, wall, split, cpu = semex_run("1", m, None, n1, args.concurrency, rpm=args.rpm)
    report("semex, 1 deployment", ok, n1, wall, rate, m, cpu=cpu)
    [x.stop() for x in m]
    # 2 deployments
    m = [Mock(*mock_args), Mock(*mock_args)]
    deps = [(x.base, "sk-bench", args.rpm) for x in m]
    ok, wall, split, cpu = semex_run("2", m, deps, n2, args.concurrency)
    report("semex, 2 deployments", ok, n2, wall, 2 * rate, m, split, cpu=cpu)
    [x.stop() for x in m]
    # 2 deployments, limits learned from their 429s
    m = [Mock(*mock_args), Mock(*mock_args)]
    deps = [(x.base, "sk-bench") for x in m]
    ok, wall, split, cpu = semex_run("2u", m, deps, n2, args.concurrency)
    report("semex, 2, limits not given", ok, n2, wall, 2 * rate, m, split, cpu=cpu)
    [x.stop() for x in m]
    # 2 deployments, the first killed half-way: rows it had in flight are retried elsewhere
    m = [Mock(*mock_args), Mock(*mock_args)]
    deps = [(x.base, "sk-bench", args.rpm) for x in m]
    n_kill = int(1.5 * n1)  # 2x the rate for the first half, 1x after: ~ args.seconds
    ok, wall, split, cpu = semex_run("2k", m, deps, n_kill, args.concurrency,
                                kill_at=args.seconds / 2)
    half = args.seconds / 2  # allowed: 2 deployments' rate until the kill, one's after
    allowed = (2 * rate * half + rate * max(0.0, wall - half)) / wall
    report("semex, 2, one killed half-way", ok, n_kill, wall, round(allowed, 1), m, split,
           notes=f"(mock 0 killed after {args.seconds / 2:g} s)", cpu=cpu)
    [x.stop() for x in m]
    if args.peer_python:
        m = [Mock(*mock_args), Mock(*mock_args)]
        rec = litellm_run(args.peer_python, m, args.rpm, n2, args.concurrency)
        report(f"LiteLLM Router {rec['version']}", rec["ok"], n2, rec["wall_s"], 2 * rate, m,
               notes=f"simple-shuffle, rpm={int(args.rpm)} each, num_retries=6; errors "
                     f"{rec['error_kinds']}", cpu=rec["cpu_s"])
        [x.stop() for x in m]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
