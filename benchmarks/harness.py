#!/usr/bin/env python3
"""One command, every client, every workload: writes benchmarks/RESULTS.md and throughput.png.

    make -C benchmarks
    /work/.benchvenv/bin/python benchmarks/harness.py [--quick] [--only semex,openai,...]
        [--concurrency 64,256,1000,4000,10000] [--skip-workloads faults,ratelimit]

Run it with the interpreter of the venv that holds semex and the peers (openai, httpx,
aiohttp, litellm, lotus-ai, matplotlib, uvloop); each client runs in that interpreter as its
own subprocess (benchmarks/clients/*.py), against a fresh benchmarks/build/mockserver per run
(so the server's counters belong to that run alone). Within each configuration the clients
run one after another, their order rotated from one configuration to the next.

Workloads
  (a) throughput  N chat requests (default 20,000), server latency 50±25 ms, at every
                  concurrency C; wrk -t1 -cC -d10s (wrk_chat.lua) at each C as the physical
                  limit of this machine and mock.
  (b) faults      the same at C=1000 with 1% faults: --fail-rate 0.005 --drop-rate 0.0025
                  --truncate-rate 0.0025.
  (c) ratelimit   server --rpm 6000 --tpm 600000 (100 req/s), C=64 (--rl-concurrency), each
                  client given about --rl-seconds (default 60) of work at the allowed rate;
                  semex with rpm/tpm set on its LM, peers with their own retry logic.

Slow clients: every client gets at most --budget-s seconds of work per configuration (its
N is cut to budget × its throughput, projected from its previous run, never below C so
that C requests can be in flight) and is skipped where even N = C would take more than
--max-run-s; a run that exceeds --timeout-s is killed and the client skipped at higher C.
Every cut and skip is written into RESULTS.md.

Side by side, one configuration (what compare_llm_batch.py and perf_matrix.py used to do):
  harness.py --only semex,semex-raw,aiohttp --concurrency 1000 --repeat 3 \
      --skip-workloads faults,ratelimit,memory,steady,inflight --out -
prints the tables instead of writing RESULTS.md (semex-raw: the C engine alone, one
Engine.submit of prebuilt bodies, so the gap to semex llm_batch is the Python layer). Two
builds of semex in one run, e.g. before and after a change (each a venv with that build):
  harness.py --variant old=/tmp/old-venv/bin/python --variant new=.venv/bin/python \
      --only semex,semex-raw,aiohttp ... --out -
runs every semex client once per variant (rows "semex llm_batch [old]", "... [new]"),
interleaved with the other clients, against the same fresh mock per run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLIENT_DIR = os.path.join(HERE, "clients")
MOCK = os.path.join(HERE, "build", "mockserver")
WRK_LUA = os.path.join(HERE, "wrk_chat.lua")

LATENCY_MS, JITTER_MS = 50.0, 25.0
FAULTS = ["--fail-rate", "0.005", "--drop-rate", "0.0025", "--truncate-rate", "0.0025"]
RL_RPM, RL_TPM = 6000, 600000

# key -> label, script + fixed args, whether it takes --max-retries, and a prior estimate of
# its rows/s at C=64 on the 2-core dev machine (only used to size its first run).
# pool_scan: clients on httpx/httpcore pools, whose per-request CPU grows with the number of
# requests waiting in the pool (measured: ~C^0.3-0.5), so their next run is sized for that.
CLIENTS = {
    "semex": dict(label="semex llm_batch", argv=["semex_llm_batch.py"], retries=False,
                  prior=1200),
    "semex-raw": dict(label="semex engine raw (no Python layer)",
                      argv=["semex_engine_raw.py"], retries=False, prior=1500),
    "semex-w2": dict(label="semex llm_batch workers=2", argv=["semex_llm_batch.py",
                     "--workers", "2"], retries=False, prior=1200),
    "semex-extract-1": dict(label="semex sem_extract 1 doc/call",
                            argv=["semex_sem_extract.py", "--batch-size", "1"],
                            retries=False, prior=600),
    "semex-extract-10": dict(label="semex sem_extract batch_size=10",
                             argv=["semex_sem_extract.py", "--batch-size", "10"],
                             retries=False, prior=400),
    "openai": dict(label="AsyncOpenAI (httpx, default)", argv=["openai_async.py"],
                   retries=True, prior=450, pool_scan=True),
    "openai-aiohttp": dict(label="AsyncOpenAI (aiohttp transport)",
                           argv=["openai_async.py", "--transport", "aiohttp"],
                           retries=True, prior=600),
    # the Anthropic Messages dialect on the same mock (POST /v1/messages): semex's native
    # reader beside the official SDK
    "semex-anthropic": dict(label="semex llm_batch (Anthropic dialect)",
                            argv=["semex_llm_batch.py", "--provider", "anthropic"],
                            retries=False, prior=1200),
    "anthropic": dict(label="AsyncAnthropic (httpx, default)", argv=["anthropic_async.py"],
                      retries=True, prior=400, pool_scan=True),
    "aiohttp": dict(label="aiohttp raw (asyncio)", argv=["aiohttp_raw.py"], retries=False,
                    prior=1100),
    "aiohttp-uvloop": dict(label="aiohttp raw (uvloop)", argv=["aiohttp_raw.py", "--uvloop"],
                           retries=False, prior=1100),
    "httpx": dict(label="httpx.AsyncClient raw", argv=["httpx_raw.py"], retries=False,
                  prior=90, pool_scan=True),
    "litellm": dict(label="LiteLLM acompletion", argv=["litellm_async.py"], retries=True,
                    prior=190),
    "lotus": dict(label="LOTUS sem_extract", argv=["lotus_extract.py"], retries=True,
                  prior=130),
}
# semex-raw is a profiling reference (no prompts, no parsing), not a client a user runs.
DEFAULT_CLIENTS = [k for k in CLIENTS if k != "semex-raw"]
# (c) is long per client: the uvloop twin of raw aiohttp adds nothing there.
RL_EXCLUDE = {"aiohttp-uvloop", "semex-w2", "semex-raw"}
# Rows/s a client can reach under (c)'s limits, to give each about --rl-seconds of work:
# 100 req/s for plain chat calls (their ~20-token bodies keep the token bucket out of play);
# the extraction prompts are long enough that --tpm (10,000 tokens/s, a call costing its body
# bytes / 4) binds first. The mock answers semex's response_format with a valid row, so semex
# sends 1 call per row at batch_size=1 and 1 per 10 rows at batch_size=10. Measured bodies
# (N=2000, json_schema): ~672 bytes = 168 tokens per 1-document call -> 10,000/168 = 59.5
# calls/s = ~59 rows/s; ~1,346 bytes = 336 tokens per 10-document call -> 29.7 calls/s =
# ~297 rows/s (a 14 s check under these limits gave 63 and 314 rows/s: the buckets start
# with one second's worth, 10,000 tokens, which a short run feels more). LOTUS: ~132 tokens
# per call, 1 call/row -> ~75 rows/s, 70 kept (its own pacing).
# (f) 10,000 really in flight (1 s latency): the clients that get there in seconds.
INFLIGHT_CLIENTS = ("semex", "aiohttp", "aiohttp-uvloop", "openai-aiohttp")
# (d) steady state: the clients fast enough for N=100,000 to take seconds, not minutes.
STEADY_CLIENTS = ("semex", "semex-extract-1", "aiohttp")
RL_ROWS_PER_S = {"semex-extract-1": 59.0, "semex-extract-10": 295.0, "lotus": 70.0}


# ----------------------------------------------------------------------------- helpers

def base_key(key: str) -> str:
    """The client a key runs: "semex@old" (a --variant's copy) -> "semex"."""
    return key.split("@", 1)[0]


def add_variants(keys, variants):
    """keys with every semex client replaced by one copy per --variant LABEL=PYTHON (run
    with that interpreter, labelled "[LABEL]")."""
    if not variants:
        return keys
    out = []
    for key in keys:
        if not key.startswith("semex"):
            out.append(key)
            continue
        for label, python in variants:
            vk = f"{key}@{label}"
            CLIENTS[vk] = dict(CLIENTS[key], label=f"{CLIENTS[key]['label']} [{label}]",
                               python=python)
            out.append(vk)
    return out


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001 - environment facts are best effort
        return ""


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m\nout={}\n"
            "for p in ['semex','openai','anthropic','httpx','httpx2','aiohttp','litellm',"
            "'lotus-ai',"
            "'torch','uvloop','matplotlib','pandas','numpy']:\n"
            "    try: out[p]=m.version(p)\n"
            "    except Exception: out[p]=None\n"
            "print(json.dumps(out))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True,
                                         timeout=60).stdout)
    except Exception:  # noqa: BLE001
        return {}


def semex_source(python: str) -> str:
    """Where the semex under test came from: the installed copy's time, and the state of
    the work tree now (read-only git commands)."""
    code = ("import os, time, semex; f = os.path.dirname(semex.__file__); "
            "print(f, time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(os.path.getmtime("
            "os.path.join(f, '__init__.py')))))")
    try:
        where = subprocess.run([python, "-c", code], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001
        where = "?"
    head = sh(f"git -C {shlex.quote(ROOT)} rev-parse --short HEAD")
    dirty = sh(f"git -C {shlex.quote(ROOT)} status --porcelain -- csrc python setup.py "
               "pyproject.toml").replace("\n", ", ")
    return (f"installed at {where or '?'}; work tree {ROOT} now at {head or '?'}"
            + (f" with uncommitted changes ({dirty})" if dirty else ", clean"))


def proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Mock:
    """A fresh benchmarks/build/mockserver on a free loopback port."""

    def __init__(self, extra):
        self.argv = [MOCK, "--port", "0", "--latency-ms", f"{LATENCY_MS:g}", "--jitter-ms",
                     f"{JITTER_MS:g}", "--stdin-watch"] + list(extra)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT"):
            self.stop()
            raise RuntimeError(f"mockserver did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats",
                                        timeout=10) as r:
                out = json.loads(r.read())
        except Exception as exc:  # noqa: BLE001
            out = {"error": str(exc)}
        out["cpu_s"] = proc_cpu_s(self.proc.pid)
        return out

    def stop(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cut_note(n, n_budget, n_full, budget_s, est):
    if n >= n_full:
        return ""
    if n > n_budget:
        return (f"N = C = {n:,}, the floor (its {budget_s:.0f} s budget at ~{est:,.0f} rows/s "
                f"would give {n_budget:,})")
    return f"N cut to {n:,} (time budget {budget_s:.0f} s at ~{est:,.0f} rows/s)"


_CUT_RE = re.compile(r"N cut to ([\d,]+) \(time budget ([\d.]+) s at ~([\d,]+) rows/s\)")


def renote(rec, n_full):
    """Re-derive a stored cut note (results.json written before cut_note told floors apart)."""
    m = _CUT_RE.match(rec.get("note") or "")
    if m and "n" in rec:
        budget, est = float(m.group(2)), float(m.group(3).replace(",", ""))
        rec["note"] = cut_note(rec["n"], min(n_full, nice_n(budget * est)), n_full, budget, est)


def nice_n(x: float) -> int:
    """Round down to two significant digits (1,234 -> 1,200)."""
    x = int(x)
    if x < 100:
        return max(1, x)
    p = 10 ** (len(str(x)) - 2)
    return x // p * p


# ------------------------------------------------------------------------------ runner

class Harness:
    def __init__(self, args):
        self.args = args
        self.python = args.python
        self.records = []          # every run, as dicts
        self.rps_seen = {}         # client key -> (C, rows/s) of its latest throughput run
        self.dead_at = {}          # client key -> C where it timed out / failed to start
        self.env = dict(os.environ)
        self.env.pop("PYTHONPATH", None)
        self.env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONUNBUFFERED="1")
        self.t_start = time.time()

    def log(self, *a):
        el = time.time() - self.t_start
        print(f"[{el:7.1f}s]", *a, file=sys.stderr, flush=True)

    # -- sizing -----------------------------------------------------------------------------
    def estimate_rps(self, key: str, c: int) -> float:
        seen = self.rps_seen.get(key)
        if seen is None:
            return float(CLIENTS[key]["prior"])
        c0, rps = seen
        if c > c0 and CLIENTS[key].get("pool_scan"):
            rps *= (c0 / c) ** 0.5
        return rps

    def plan(self, key: str, c: int, n_full: int):
        """(n, note) for this client at this C, or (None, reason) to skip it."""
        a = self.args
        if key in self.dead_at and c >= self.dead_at[key]:
            return None, f"skipped: failed or timed out at C={self.dead_at[key]:,}"
        est = self.estimate_rps(key, c)
        n_budget = min(n_full, nice_n(a.budget_s * est))
        floor = min(n_full, c)
        n = max(n_budget, floor)
        proj = n / est
        if proj > a.max_run_s:
            return None, (f"skipped: N={n:,} would take ~{proj:,.0f} s at the ~{est:,.0f} "
                          f"rows/s projected from its previous run (limit {a.max_run_s:.0f} s)")
        return n, cut_note(n, n_budget, n_full, a.budget_s, est)

    # -- one client run ---------------------------------------------------------------------
    def run_client(self, key, workload, c, n, mock_extra, extra_args=(), note="",
                   max_retries=None, rnd=1):
        spec = CLIENTS[key]
        mock = Mock(mock_extra)
        cmd = [spec.get("python", self.python), os.path.join(CLIENT_DIR, spec["argv"][0])] + spec["argv"][1:] + [
            "--url", mock.base, "--n", str(n), "-c", str(c)] + list(extra_args)
        if spec["retries"] and max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        rec = {"workload": workload, "key": key, "label": spec["label"], "c": c, "n": n,
               "note": note, "round": rnd, "cmd": " ".join(shlex.quote(x) for x in cmd[1:]),
               "mock": " ".join(mock.argv[1:])}
        self.log(f"{workload} C={c:,} {spec['label']} N={n:,}"
                 + (f" (run {rnd})" if rnd > 1 else "") + " ...")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                               timeout=self.args.timeout_s, cwd=HERE)
            rec["elapsed_s"] = round(time.perf_counter() - t0, 2)
            rec["rc"] = p.returncode
            line = next((ln for ln in reversed(p.stdout.strip().splitlines())
                         if ln.startswith("{")), None)
            if line:
                rec["result"] = json.loads(line)
            else:
                rec["failure"] = (f"exit {p.returncode}, no result line; stderr: "
                                  + p.stderr.strip()[-600:])
        except subprocess.TimeoutExpired:
            rec["elapsed_s"] = round(time.perf_counter() - t0, 2)
            rec["failure"] = f"timed out after {self.args.timeout_s:.0f} s (killed)"
        finally:
            rec["server"] = mock.stats()
            mock.stop()
        r = rec.get("result")
        if r and "unavailable" in r:
            rec["failure"] = r["unavailable"]
        if "failure" in rec:
            self.log(f"   FAILED: {rec['failure'][:300]}")
            if workload == "throughput":
                self.dead_at.setdefault(key, c)
        else:
            self.log(f"   {r['rps']:,.0f} rows/s wall {r['wall_s']:.2f}s cpu "
                     f"{r['cpu_us_per_req']:.0f}us/row rss {r['max_rss_mb']:.0f}MB "
                     f"ok {r['ok']} err {r['errors']} lost {r['rows_lost']} "
                     f"mism {r['mismatches']} | server req {rec['server'].get('requests')} "
                     f"429 {rec['server'].get('responses_429')}")
            if workload == "throughput":
                self.rps_seen[key] = (c, r["rps"])
        self.records.append(rec)
        return rec

    def run_wrk(self, c, seconds, key="wrk"):
        mock = Mock([])
        cmd = ["wrk", "-t1", f"-c{c}", f"-d{seconds}s", "-s", WRK_LUA,
               f"http://127.0.0.1:{mock.port}/v1/chat/completions"]
        rec = {"workload": "throughput", "key": key, "label": "wrk (reference)", "c": c,
               "seconds": seconds,
               "cmd": " ".join(cmd[:5]) + " benchmarks/wrk_chat.lua URL",
               "mock": " ".join(mock.argv[1:])}
        self.log(f"throughput C={c:,} wrk {seconds}s ...")
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
            out = p.stdout
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            m = re.search(r"Requests/sec:\s+([\d.]+)", out)
            tot = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
            errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                             r"timeout (\d+)", out)
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            lat = re.search(r"Latency\s+([\d.]+\w+)", out)
            rec["result"] = {
                "rps": float(m.group(1)) if m else None,
                "requests": int(tot.group(1)) if tot else None,
                "socket_errors": sum(int(x) for x in errs.groups()) if errs else 0,
                "non_2xx": int(non2xx.group(1)) if non2xx else 0,
                "mean_latency": lat.group(1) if lat else None,
                "cpu_s": round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
                               3),
                "max_rss_mb": round(ru1.ru_maxrss / 1024.0, 1),
            }
            if not m:
                rec["failure"] = "no Requests/sec in wrk output: " + (out + p.stderr)[-300:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            rec["failure"] = f"wrk failed: {exc}"
        finally:
            rec["server"] = mock.stats()
            mock.stop()
        r = rec.get("result") or {}
        self.log(f"   wrk {r.get('rps')} req/s, socket errors {r.get('socket_errors')}, "
                 f"non-2xx {r.get('non_2xx')}")
        self.records.append(rec)
        return rec

    # -- workloads --------------------------------------------------------------------------
    def order(self, keys, k):
        if not keys:
            return []
        k %= len(keys)
        return keys[k:] + keys[:k]

    def skip(self, workload, key, c, reason):
        self.log(f"{workload} C={c:,} {CLIENTS[key]['label']}: {reason}")
        self.records.append({"workload": workload, "key": key, "label": CLIENTS[key]["label"],
                             "c": c, "skipped": reason})

    def one_config(self, workload, keys, c, n_full, mock_extra, k):
        """Every client once (order rotated by k), then --repeat-1 more rounds of the clients
        whose run took at most --repeat-max-s (cheap to repeat on a noisy machine)."""
        cheap = []
        for key in self.order(keys, k):
            n, note = self.plan(key, c, n_full)
            if n is None:
                self.skip(workload, key, c, note)
                continue
            rec = self.run_client(key, workload, c, n, mock_extra, note=note, max_retries=6)
            x = rec.get("result")
            if x and "failure" not in rec and x["wall_s"] <= self.args.repeat_max_s:
                cheap.append((key, n, note))
        for rnd in range(2, self.args.repeat + 1):
            for key, n, note in self.order(cheap, rnd - 1):
                self.run_client(key, workload, c, n, mock_extra, note=note, max_retries=6,
                                rnd=rnd)

    def throughput(self, keys, conc, n_full, cfg_index):
        for j, c in enumerate(conc):
            if c <= 19000:
                self.run_wrk(c, self.args.wrk_seconds)
                # ...and for as long as the clients' runs last (whole seconds, at least 1):
                # wrk's own figure with its start-up and drain, beside theirs
                short = max(1, round(n_full * LATENCY_MS / 1000.0 / c))
                if short < self.args.wrk_seconds:
                    self.run_wrk(c, short, key="wrk-short")
            self.one_config("throughput", keys, c, n_full, [], cfg_index + j)
        return cfg_index + len(conc)

    def faults(self, keys, c, n_full, cfg_index):
        self.one_config("faults", keys, c, n_full, FAULTS, cfg_index)
        return cfg_index + 1

    def steady(self, keys, c, n, cfg_index):
        """(d) the same server as (a) at C, N large enough that start-up and the last
        requests' drain weigh little: the figure to hold beside wrk's steady state."""
        for key in self.order([k for k in keys if base_key(k) in STEADY_CLIENTS], cfg_index):
            for rnd in range(1, 3):
                self.run_client(key, "steady", c, n, [], max_retries=6, rnd=rnd,
                                note=f"N={n:,}: start-up and drain amortised")
        return cfg_index + 1

    def inflight(self, keys, c, n, latency_ms, cfg_index):
        """(f) C requests really in flight: at 50 ms no client on two cores completes the
        C/50 ms = 200,000 req/s that 10,000 in flight need, so the mock answers after
        latency_ms instead and N = 3 × C."""
        extra = ["--latency-ms", f"{latency_ms:g}", "--jitter-ms", "0"]
        for key in self.order([k for k in keys if base_key(k) in INFLIGHT_CLIENTS],
                              cfg_index):
            self.run_client(key, "inflight", c, n, extra, max_retries=6,
                            note=f"mock latency {latency_ms:g} ms, no jitter")
        return cfg_index + 1

    def memory(self, n):
        """(e) df.sem_extract over n short rows against the mock at 0 ms: peak RSS growth vs
        the input frame's size (benchmarks/bench_extract_memory.py, its own mock)."""
        py = self.args.mem_python or self.python
        cmd = [py, os.path.join(HERE, "bench_extract_memory.py"), "--n", str(n)]
        rec = {"workload": "memory", "key": "semex-memory", "label": "semex df.sem_extract",
               "c": 64, "n": n, "cmd": " ".join(shlex.quote(x) for x in cmd[1:]),
               "mock": "--latency-ms 0 (started by the script)", "python": py}
        self.log(f"memory N={n:,} ...")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                               timeout=self.args.timeout_s)
            lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
            rec["result"] = json.loads(lines[-1])
            rec["verdict_line"] = p.stdout.strip().splitlines()[-1]
            if p.returncode not in (0, 1):
                rec["failure"] = (p.stderr or p.stdout)[-400:]
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            rec["failure"] = f"{type(exc).__name__}: {exc}"
        self.records.append(rec)
        self.log("   " + rec.get("verdict_line", rec.get("failure", "?")))

    def ratelimit(self, keys, c, seconds, cfg_index):
        rate = RL_RPM / 60.0
        for key in self.order([k for k in keys if base_key(k) not in RL_EXCLUDE], cfg_index):
            secs = self.args.rl_semex_seconds if base_key(key) == "semex" else seconds
            n = nice_n(RL_ROWS_PER_S.get(base_key(key), rate) * secs)
            extra, note = [], f"~{secs:.0f} s of requests at the allowed rate"
            if key.startswith("semex"):
                extra = ["--rpm", str(RL_RPM), "--tpm", str(RL_TPM)]
                note += f"; LM(rpm={RL_RPM}, tpm={RL_TPM}), max_retries=6"
            elif base_key(key) == "lotus":
                extra = ["--rate-limit", str(RL_RPM)]
                note += (f"; LM(rate_limit={RL_RPM}) (LOTUS's pacing), "
                         f"max_retries={self.args.rl_peer_retries}")
            elif CLIENTS[key]["retries"]:
                note += f"; max_retries={self.args.rl_peer_retries} (SDK retries)"
            else:
                note += "; no retry logic (raw client): a 429 is that row's error"
            self.run_client(key, "ratelimit", c, n, ["--rpm", str(RL_RPM), "--tpm",
                                                     str(RL_TPM)],
                            extra_args=extra, note=note,
                            max_retries=self.args.rl_peer_retries)
        return cfg_index + 1


# ----------------------------------------------------------------------------- report

def fmt_int(x):
    return "—" if x is None else f"{x:,.0f}"


def fmt_f(x, d=2):
    return "—" if x is None else f"{x:.{d}f}"


def client_rows(records, workload, c):
    """One row per client: its only run, or the median run (by req/s) of its repeats, with
    "runs" = every repeat's req/s and "failed_runs" = repeats that failed."""
    groups = {}
    for r in records:
        if r["workload"] == workload and r["c"] == c and not r["key"].startswith("wrk"):
            groups.setdefault(r["key"], []).append(r)
    rows = []
    for key, runs in groups.items():
        ok = [r for r in runs if "result" in r and "failure" not in r]
        if len(ok) <= 1:
            rep_ = dict(ok[0] if ok else runs[0])
        else:
            ok.sort(key=lambda r: r["result"]["rps"])
            rep_ = dict(ok[(len(ok) - 1) // 2])
            rep_["runs"] = [r["result"]["rps"] for r in ok]
        rep_["failed_runs"] = len(runs) - len(ok) if ok else 0
        rows.append(rep_)
    return rows


def repeat_note(r) -> str:
    out = ""
    if r.get("runs"):
        rr = r["runs"]
        out = (f"median of {len(rr)} runs (req/s {rr[0]:,.0f}–{rr[-1]:,.0f}; the other "
               "columns are the median run's)")
    if r.get("failed_runs"):
        out += f"; {r['failed_runs']} more run(s) FAILED, see below"
    return out


def wrk_rps(records, c):
    for r in records:
        if r["workload"] == "throughput" and r["key"] == "wrk" and r["c"] == c:
            return (r.get("result") or {}).get("rps")
    return None


def throughput_table(records, workload, c, ref_rps):
    out = []
    head = ("| client | N | req/s | × wrk | wall / ideal | CPU µs/req | client cores busy | "
            "peak RSS MB | HTTP calls/row | retried | 429s (client / server) | errors | "
            "mismatched | rows lost | notes |")
    out.append(head)
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    if workload == "throughput":
        w = next((r for r in records if r["workload"] == "throughput" and r["key"] == "wrk"
                  and r["c"] == c), None)
        if w and "failure" in w:
            out.append(f"| wrk -t1 -c{c} (reference) | — | — | — | — | — | — | — | — | — | — | "
                       f"— | — | — | {w['failure'][:200].replace('|', '/')} |")
        elif w:
            wr = w.get("result") or {}
            cpu = (wr["cpu_s"] / wr["requests"] * 1e6) if wr.get("requests") else None
            busy = wr["cpu_s"] / w["seconds"] if w.get("seconds") else None
            out.append(f"| **wrk -t1 -c{c}** (reference) | {fmt_int(wr.get('requests'))} in "
                       f"{w.get('seconds', '?')} s | **{fmt_int(wr.get('rps'))}** | 1.00 | — | "
                       f"{fmt_f(cpu, 0)} | {fmt_f(busy)} | "
                       f"— | 1 | — | — / {w['server'].get('responses_429', '—')} | "
                       f"{wr.get('socket_errors', 0) + wr.get('non_2xx', 0)} | not checked | — | "
                       f"same request body every time; mean latency {wr.get('mean_latency')} |")
        ws = next((r for r in records if r["workload"] == "throughput" and
                   r["key"] == "wrk-short" and r["c"] == c and r.get("result")), None)
        if ws and w and (w.get("result") or {}).get("rps") and ws["result"].get("rps"):
            sr = ws["result"]
            out.append(f"| wrk -t1 -c{c}, {ws['seconds']} s | {fmt_int(sr.get('requests'))} in "
                       f"{ws['seconds']} s | {fmt_int(sr['rps'])} | "
                       f"{sr['rps'] / w['result']['rps']:.2f} | — | — | — | — | 1 | — | — | "
                       f"{sr.get('socket_errors', 0) + sr.get('non_2xx', 0)} | not checked | — | "
                       "as long as the clients' runs: wrk's own start-up and drain included |")
    for r in client_rows(records, workload, c):
        if "skipped" in r:
            out.append(f"| {r['label']} | — | — | — | — | — | — | — | — | — | — | — | — | — | "
                       f"{r['skipped']} |")
            continue
        srv = r.get("server", {})
        if "failure" in r:
            out.append(f"| {r['label']} | {r['n']:,} | — | — | — | — | — | — | — | — | — / "
                       f"{srv.get('responses_429', '—')} | — | — | all? | "
                       f"FAILED: {r['failure'][:200].replace('|', '/')} |")
            continue
        x = r["result"]
        ideal = x["n"] * LATENCY_MS / 1000.0 / c
        calls = (srv.get("requests") or 0) / x["n"] if srv.get("requests") is not None else None
        notes = "; ".join(s for s in (repeat_note(r), r.get("note"), x.get("notes")) if s)
        if x.get("aborted"):
            notes += f"; ABORTED: {x['aborted'][:160]}"
        if x.get("error_kinds"):
            notes += "; errors: " + ", ".join(f"{k} {v}" for k, v in x["error_kinds"].items())
        if x.get("format_errors"):
            notes += (f"; {x['format_errors']:,} rows ResponseFormatError (none expected: the "
                      "mock answers the schema)")
        g429 = "—" if x.get("got_429") is None else f"{x['got_429']:,}"
        retried = "—" if x.get("retried") is None else f"{x['retried']:,}"
        vs = (x["rps"] / ref_rps) if ref_rps else None
        out.append(
            f"| {r['label']} | {x['n']:,} | {fmt_int(x['rps'])} | "
            f"{fmt_f(vs, 3 if vs is not None and vs < 0.1 else 2)} | "
            f"{fmt_f(x['wall_s'] / ideal)}× | {fmt_f(x['cpu_us_per_req'], 0)} | "
            f"{fmt_f((x['cpu_user_s'] + x['cpu_sys_s']) / x['wall_s'])} | "
            f"{fmt_f(x['max_rss_mb'], 0)} | {fmt_f(calls)} | {retried} | {g429} / "
            f"{srv.get('responses_429', '—')} | {x['errors']:,} | {x['mismatches']:,} | "
            f"**{x['rows_lost']:,}** | {notes.replace('|', '/')} |")
    return "\n".join(out)


def allowed_rate(x: dict, srv: dict):
    """(calls/s the mock allows this client, how it was found).

    --rpm allows 100 calls/s; --tpm allows 10,000 tokens/s, a call costing body bytes / 4
    tokens. The mock reports prompt_tokens = body bytes / 4 + 1 in each 200 answer, so a
    client that sums them (semex, LOTUS) tells us its tokens per call; the other clients send
    ~70-byte bodies (~18 tokens), where the request bucket binds."""
    rpm_rate, tpm_rate = RL_RPM / 60.0, RL_TPM / 60.0
    ok200 = srv.get("responses_200") or 0
    if x.get("prompt_tokens") and ok200:
        per_call = max(1.0, x["prompt_tokens"] / ok200 - 1.0)
        return min(rpm_rate, tpm_rate / per_call), f"{per_call:.0f} tokens/call"
    return rpm_rate, "short bodies"


def ratelimit_table(records, c):
    out = ["| client | N rows | wall s | server 200s/s | allowed calls/s | % of allowed | "
           "server 429s | 429 share (server) | client 429s | retried | errors | rows lost | "
           "CPU µs/row | notes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in client_rows(records, "ratelimit", c):
        srv = r.get("server", {})
        if "failure" in r or "skipped" in r:
            why = r.get("failure") or r.get("skipped")
            out.append(f"| {r['label']} | {r.get('n', '—')} | — | — | — | — | "
                       f"{srv.get('responses_429', '—')} | — | — | — | — | all? | — | "
                       f"FAILED: {why[:200].replace('|', '/')} |")
            continue
        x = r["result"]
        ok200 = srv.get("responses_200") or 0
        reqs = srv.get("requests") or 0
        s429 = srv.get("responses_429") or 0
        achieved = ok200 / x["wall_s"] if x["wall_s"] else None
        allowed, how = allowed_rate(x, srv)
        notes = "; ".join(s for s in (r.get("note"), x.get("notes")) if s)
        if x.get("aborted"):
            notes += f"; ABORTED: {x['aborted'][:160]}"
        if x.get("error_kinds"):
            notes += "; errors: " + ", ".join(f"{k} {v}" for k, v in x["error_kinds"].items())
        if x["wall_s"] < 5:
            notes += ("; finished in under 5 s, so the bucket's initial one-second burst "
                      "inflates its rate")
        g429 = "—" if x.get("got_429") is None else f"{x['got_429']:,}"
        retried = "—" if x.get("retried") is None else f"{x['retried']:,}"
        out.append(
            f"| {r['label']} | {x['n']:,} | {x['wall_s']:.1f} | {fmt_f(achieved, 1)} | "
            f"{allowed:.1f} ({how}) | "
            f"{fmt_f(100 * achieved / allowed if achieved else None, 1)}% | {s429:,} | "
            f"{fmt_f(100 * s429 / reqs if reqs else None, 2)}% | {g429} | {retried} | "
            f"{x['errors']:,} | **{x['rows_lost']:,}** | {fmt_f(x['cpu_us_per_req'], 0)} | "
            f"{notes.replace('|', '/')} |")
    return "\n".join(out)


def find(records, workload, key, c):
    for r in client_rows(records, workload, c):
        if r["key"] == key and "result" in r and "failure" not in r:
            return r
    return None


def inflight_table(records, c, latency_ms):
    out = ["| client | N | wall s | wall / ideal | peak RSS MB | mock's max open connections | "
           "CPU µs/req | errors | rows lost | mismatched | notes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in client_rows(records, "inflight", c):
        srv = r.get("server", {})
        if "failure" in r or "skipped" in r:
            out.append(f"| {r['label']} | {r.get('n', '—')} | — | — | — | "
                       f"{srv.get('max_open_connections', '—')} | — | — | all? | — | FAILED: "
                       f"{str(r.get('failure') or r.get('skipped'))[:200].replace('|', '/')} |")
            continue
        x = r["result"]
        ideal = x["n"] * latency_ms / 1000.0 / c
        out.append(f"| {r['label']} | {x['n']:,} | {x['wall_s']:.2f} | "
                   f"{x['wall_s'] / ideal:.2f}× | **{x['max_rss_mb']:.0f}** | "
                   f"{srv.get('max_open_connections', '—')} | {fmt_f(x['cpu_us_per_req'], 0)} | "
                   f"{x['errors']:,} | {x['rows_lost']:,} | {x.get('mismatches', '—')} | "
                   f"{(r.get('note') or '').replace('|', '/')} |")
    return "\n".join(out)


def memory_section(records):
    out = ["## (e) Memory: df.sem_extract over many short rows\n",
           "`benchmarks/bench_extract_memory.py`: a DataFrame of N distinct short rows "
           "(`order i: customer i%9973 bought item i%313`), two output fields, batch_size=10, "
           "64 prompts in flight, the mock at 0 ms latency (started by the script), every "
           "row's values checked. Target: **peak RSS growth** during the call (VmHWM after "
           "resetting it via /proc/self/clear_refs, minus RSS just before the call) ≤ 2× the "
           "input frame's own size (`df.memory_usage(deep=True).sum()`).\n",
           "| N | pandas | frame MB | RSS before MB | peak RSS MB | growth MB | growth / frame "
           "| result frame MB | wall s | rows/s | bad values | error rows | verdict |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if r["workload"] != "memory":
            continue
        x = r.get("result")
        if not x:
            out.append(f"| {r['n']:,} | — | — | — | — | — | — | — | — | — | — | — | FAILED: "
                       f"{str(r.get('failure'))[:200].replace('|', '/')} |")
            continue
        mb = 1e6
        ok = x["peak_growth_bytes"] <= 2 * x["frame_bytes"] and not x["bad_values"] \
            and not x["error_rows"]
        out.append(f"| {x['n']:,} | {x['pandas']} | {x['frame_bytes'] / mb:.1f} | "
                   f"{x['rss_before_bytes'] / mb:.0f} | {x['peak_rss_bytes'] / mb:.0f} | "
                   f"{x['peak_growth_bytes'] / mb:.1f} | **{x['growth_over_frame']:.2f}×** | "
                   f"{x['result_frame_bytes'] / mb:.1f} | {x['wall_s']:.1f} | "
                   f"{x['rows_per_s']:,} | {x['bad_values']} | {x['error_rows']} | "
                   f"{'met' if ok else 'missed'} ({x['peak_method']}) |")
    return "\n".join(out) + "\n"


def zero_overhead_wall(n, c, seeds=5):
    """Expected wall time of a client with no overhead at all against this mock: n requests,
    c always in flight (a freed slot sends the next request at once), each taking a
    latency drawn uniformly from [LATENCY_MS - JITTER_MS, LATENCY_MS + JITTER_MS]. It
    exceeds the ideal n * latency / c because the last requests drain one by one."""
    import heapq
    import random
    lo, hi = (LATENCY_MS - JITTER_MS) / 1000.0, (LATENCY_MS + JITTER_MS) / 1000.0
    walls = []
    for seed in range(seeds):
        rng = random.Random(seed)
        free_at = [0.0] * min(c, n)
        for _ in range(n):
            t = heapq.heappop(free_at)
            heapq.heappush(free_at, t + rng.uniform(lo, hi))
        walls.append(max(free_at))
    return sum(walls) / len(walls)


def targets(records, conc):
    lines = []

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    for c in conc:
        w = next((r for r in records if r["workload"] == "throughput" and r["key"] == "wrk"
                  and r["c"] == c and r.get("result")), None)
        srv = (w or {}).get("server") or {}
        reqs = (w or {}).get("result", {}).get("requests")
        if not (w and srv.get("cpu_s") and reqs):
            continue
        us = srv["cpu_s"] / reqs * 1e6
        # HTTP requests per second the mock served each client (sem_extract batches send
        # fewer requests than rows)
        fastest = max(((r.get("server") or {}).get("requests", 0) / r["result"]["wall_s"]
                       for r in client_rows(records, "throughput", c)
                       if r.get("result") and "failure" not in r and r["result"]["wall_s"]),
                      default=None)
        if fastest:
            lines.append(f"- mock not the bottleneck at C={c:,}: under wrk it spent {us:.1f} µs "
                         f"of CPU per request, i.e. ~{1e6 / us:,.0f} req/s on one core = "
                         f"{1e6 / us / fastest:.1f}× the fastest client's HTTP request rate "
                         f"here ({fastest:,.0f} req/s) → {verdict(1e6 / us >= 3 * fastest)}")
    s = find(records, "throughput", "semex", 1000)
    if s:
        x = s["result"]
        ideal = x["n"] * LATENCY_MS / 1000.0 / 1000
        ratio = x["wall_s"] / ideal
        busy = (x["cpu_user_s"] + x["cpu_sys_s"]) / x["wall_s"]
        bound = zero_overhead_wall(x["n"], 1000)
        lines.append(f"- semex within 1.05× of ideal at C=1000: wall/ideal = {ratio:.3f}× "
                     f"({x['wall_s']:.3f} s vs {ideal:.3f} s; the semex process kept "
                     f"{busy:.2f} cores busy) → {verdict(ratio <= 1.05)}. A client with no "
                     f"overhead at all would take {bound:.3f} s = {bound / ideal:.3f}× ideal "
                     f"here (simulated: the last requests of N={x['n']:,} drain one by one "
                     "with latencies of 25–75 ms), so at this N the target leaves "
                     f"{100 * (1.05 * ideal - bound) / bound:.1f}% for connection set-up, "
                     f"Python and the engine; semex used {100 * (x['wall_s'] - bound) / bound:.1f}%"
                     " over that floor.")
        s2 = find(records, "throughput", "semex-w2", 1000)
        if s2:
            lines.append(f"  - with workers=2: {s2['result']['rps']:,.0f} req/s, wall/ideal "
                         f"{s2['result']['wall_s'] / ideal:.2f}×")
        w = wrk_rps(records, 1000)
        if w:
            lines.append(f"- semex within 1.10× of wrk at C=1000: wrk {w:,.0f} req/s / semex "
                         f"{x['rps']:,.0f} req/s = {w / x['rps']:.2f}× → "
                         f"{verdict(w / x['rps'] <= 1.10)} (wrk's figure is a 10 s steady "
                         "state, without start-up or drain)")
        st = find(records, "steady", "semex", 1000)
        if st:
            y = st["result"]
            ideal_s = y["n"] * LATENCY_MS / 1000.0 / 1000
            bound_s = zero_overhead_wall(y["n"], 1000, seeds=2)
            lines.append(f"- steady state (d), N={y['n']:,} at C=1000: wall/ideal "
                         f"{y['wall_s'] / ideal_s:.3f}× (no-overhead floor "
                         f"{bound_s / ideal_s:.3f}×) → {verdict(y['wall_s'] / ideal_s <= 1.05)}"
                         + (f"; wrk / semex = {w:,.0f} / {y['rps']:,.0f} = {w / y['rps']:.2f}× → "
                            f"{verdict(w / y['rps'] <= 1.10)}" if w else ""))
        # Issue 14 §2: one document per request at llm_batch's speed, every value checked.
        for wl, label in (("throughput", "(a)"), ("steady", "(d)")):
            e1 = find(records, wl, "semex-extract-1", 1000)
            if e1 and w:
                z = e1["result"]
                ok = z["rps"] >= 0.90 * w and z["cpu_us_per_req"] <= 40 and \
                    not z.get("mismatches") and not z.get("errors")
                ws = next((r["result"]["rps"] for r in records if r["key"] == "wrk-short"
                           and r["c"] == 1000 and (r.get("result") or {}).get("rps")), None)
                short = (f"; wrk's own {ws:,.0f} req/s over a run as short as this one's → "
                         f"{z['rps'] / ws:.2f}×" if ws and wl == "throughput" else "")
                lines.append(f"- sem_extract batch_size=1 at C=1000 {label}, N={z['n']:,}: "
                             f"{z['rps']:,.0f} rows/s = {z['rps'] / w:.2f}× wrk's 10 s steady "
                             f"state (target ≥ 0.90×){short}; "
                             f"{z['cpu_us_per_req']:.0f} µs client CPU per row (target ≤ 40), "
                             f"{z.get('mismatches', 0)} mismatched → {verdict(ok)}")
        for key, lim in (("openai", 10), ("openai-aiohttp", 10), ("aiohttp", 3),
                         ("aiohttp-uvloop", 3)):
            p = find(records, "throughput", key, 1000)
            if p:
                pc, sc = p["result"]["cpu_us_per_req"], x["cpu_us_per_req"]
                lines.append(f"- semex CPU/request ≤ 1/{lim} of {p['label']} at C=1000: "
                             f"{sc:.0f} vs {pc:.0f} µs = 1/{pc / sc:.1f} → "
                             f"{verdict(sc * lim <= pc)}")
    else:
        lines.append("- semex at C=1000: no result")
    for c in conc:  # the Anthropic dialect: the same margins over its official SDK
        s, p = find(records, "throughput", "semex-anthropic", c), \
            find(records, "throughput", "anthropic", c)
        if s and p:
            x, y = s["result"], p["result"]
            lines.append(f"- Anthropic dialect at C={c:,}: semex {x['rps']:,.0f} req/s vs "
                         f"AsyncAnthropic {y['rps']:,.0f} = {x['rps'] / y['rps']:.1f}× "
                         f"(≥ 5×) → {verdict(x['rps'] >= 5 * y['rps'])}; CPU/request "
                         f"{x['cpu_us_per_req']:.0f} vs {y['cpu_us_per_req']:.0f} µs = 1/"
                         f"{y['cpu_us_per_req'] / x['cpu_us_per_req']:.1f} (≤ 1/5) → "
                         f"{verdict(x['cpu_us_per_req'] * 5 <= y['cpu_us_per_req'])}")
    s = find(records, "inflight", "semex", 10000) or find(records, "throughput", "semex", 10000)
    if s:
        x = s["result"]
        srv = s["server"]
        lines.append(f"- 10,000 in flight under 300 MB RSS: semex peak RSS {x['max_rss_mb']:.0f} "
                     f"MB (server saw at most {srv.get('max_open_connections')} connections "
                     f"open) → {verdict(x['max_rss_mb'] < 300)}")
    elif 10000 in conc:
        lines.append("- 10,000 in flight: no semex result at C=10000")
    for r in records:
        if r["workload"] == "memory" and r.get("result"):
            x = r["result"]
            ok = x["peak_growth_bytes"] <= 2 * x["frame_bytes"] and not x["bad_values"] \
                and not x["error_rows"]
            lines.append(f"- sem_extract over {x['n']:,} rows: peak RSS growth "
                         f"{x['peak_growth_bytes'] / 1e6:.1f} MB = {x['growth_over_frame']:.2f}× "
                         f"the frame's {x['frame_bytes'] / 1e6:.1f} MB (absolute peak "
                         f"{x['peak_rss_bytes'] / 1e6:.0f} MB), {x['bad_values']} bad values → "
                         f"{verdict(ok)}")
    rl = [r for r in records if r["workload"] == "ratelimit" and r["key"] == "semex"
          and "result" in r]
    if rl:
        r = rl[0]
        x, srv = r["result"], r["server"]
        ach = (srv.get("responses_200") or 0) / x["wall_s"]
        allowed, _ = allowed_rate(x, srv)
        share = 100 * (srv.get("responses_429") or 0) / max(1, srv.get("requests") or 0)
        ok = ach >= 0.97 * allowed and share < 1 and x["rows_lost"] == 0 and x["errors"] == 0
        lines.append(f"- under the rate limit (semex llm_batch) ≥97% of the allowed "
                     f"{allowed:.0f} req/s, <1% 429s, nothing lost: {ach:.1f} req/s "
                     f"({100 * ach / allowed:.1f}%) over {x['wall_s']:.0f} s, 429 share "
                     f"{share:.2f}%, rows lost {x['rows_lost']}, errors {x['errors']} → "
                     f"{verdict(ok)}")
    return "\n".join(lines)


def plot(records, conc, path):
    if not path:
        return
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path} not drawn", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 6))
    wx = [c for c in conc if wrk_rps(records, c)]
    if wx:
        ax.plot(wx, [wrk_rps(records, c) for c in wx], "k--", lw=2, marker="s",
                label="wrk -t1 (physical limit)")
    ax.plot(conc, [c / (LATENCY_MS / 1000.0) for c in conc], ":", color="grey",
            label="ideal C / 50 ms")
    keys = []
    for r in records:
        if r["workload"] == "throughput" and not r["key"].startswith("wrk") and \
                r["key"] not in keys:
            keys.append(r["key"])
    colors = plt.get_cmap("tab20").colors
    markers = "o^vD<>phX*sP"
    for i, key in enumerate(keys):
        pts = [(r["c"], r["result"]["rps"]) for r in records
               if r["workload"] == "throughput" and r["key"] == key and "result" in r
               and "failure" not in r]
        if pts:
            pts.sort()
            semex = key.startswith("semex")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                    color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                    lw=2.2 if semex else 1.3, ls="-" if semex else "-.",
                    label=next(r["label"] for r in records if r["key"] == key))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(conc)
    ax.set_xticklabels([f"{c:,}" for c in conc])
    ax.minorticks_off()
    ax.set_xlabel("concurrency C (requests in flight)")
    ax.set_ylabel("rows answered per second")
    ax.set_title(f"(a) rows/s vs concurrency, mock latency {LATENCY_MS:g}±{JITTER_MS:g} ms, "
                 f"{os.cpu_count()} cores shared by client and mock", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(h: Harness, meta: dict, path: str):
    a = h.args
    recs = h.records
    L = []
    L.append("# semex benchmark results\n")
    L.append(f"Written by `benchmarks/harness.py`{' (--quick smoke run)' if a.quick else ''}; "
             "every number below comes from that one run.\n")
    L.append("## Run\n")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']} (total wall {meta['wall_min']:.1f} min)")
    for sup in meta.get("supplements", []):
        L.append(f"- then, for {sup['workloads']}: `{sup['command']}` on {sup['date']} "
                 f"({sup['wall_min']:.1f} min); its records were merged into results.json")
    if a.from_json:
        L.append(f"- tables re-rendered from that run's results.json by `harness.py --from-json` "
                 f"on {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} (no "
                 "new measurements)")
    L.append(f"- machine: `nproc` = {meta['nproc']}, `uname -m` = {meta['uname_m']}, CPU "
             f"{meta['cpu']}, {meta['mem']}; `ulimit -n` = {meta['nofile']}")
    L.append(f"- load average (1/5/15 min) at start: {meta['load_start']}; at end: "
             f"{meta['load_end']} (the 2 cores are shared by client, mock and whatever else "
             "runs on the machine)")
    L.append(f"- Python {meta['python']} ({a.python}); wrk: {meta['wrk']}")
    if meta.get("semex_source"):
        L.append(f"- semex under test: {meta['semex_source']}")
    for v in meta.get("variants", []):
        L.append(f"- variant [{v['label']}]: `{v['python']}`, semex {v.get('version')}, "
                 f"{v.get('source')}")
    L.append("- packages: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v))
    L.append(f"- mock: `benchmarks/build/mockserver` (1 thread), a fresh one per run, latency "
             f"{LATENCY_MS:g}±{JITTER_MS:g} ms uniform; ideal wall = N × 50 ms / C")
    L.append("")
    L.append("## How to read the tables\n")
    L.append("- **req/s**: rows answered per second (N / the client's wall time, set-up and "
             "imports excluded). For the semex sem_extract and LOTUS rows it is documents "
             "per second; *HTTP calls/row* (the mock's request count / N) shows how many "
             "calls that took.")
    L.append("- **CPU µs/req**: the client process's user+sys CPU (getrusage, all threads) "
             "over the timed run / N; **client cores busy** = that CPU / wall (1.00 = one core "
             "saturated; the machine has 2, shared with the mock). **peak RSS**: ru_maxrss, "
             "imports included.")
    L.append("- **retried**: HTTP attempts beyond one per row, where the client can tell "
             "(semex: usage.retries; AsyncOpenAI/httpx: request hooks; raw aiohttp never "
             "retries) — '—' where it cannot (LiteLLM, LOTUS); the server's request count "
             "(HTTP calls/row) shows the retries there. **429s**: as the client saw them / "
             "as the mock counted them.")
    L.append("- **rows lost** = N − ok − errors: rows neither answered nor reported as an "
             "error. **mismatched**: rows answered with another row's text (the chat "
             "clients check `echo: prompt i`; semex sem_extract checks every row's extracted "
             "value against the mock's schema answer for document i, see below).")
    L.append("- sem_extract against this mock: a request with a `response_format` "
             "(json_schema, or json_object with or without a schema) gets a deterministic "
             "JSON object shaped by the schema instead of the echo: a string field is "
             "`<field>:<FNV-1a 32 hex of the document text>`, the document being the text "
             "after `Document:` or under `Document <k>:` (one item per numbered document in "
             "semex's batch shape `{\"results\": [{\"id\": k, ...}]}`; rules in "
             "`mockserver --help`). So semex needs 1 call/row at batch_size=1 and 0.1 at "
             "batch_size=10, and its client checks every extracted value against the one "
             "computed for that row's own document (a `ResponseFormatError` is an error). "
             "LOTUS sends `{\"type\": \"json_object\"}` without a schema and gets "
             "`{\"answer\": \"answer:<hash of its whole user message>\"}` (1 call/row); "
             "its client recomputes that hash from LOTUS's own prompt for each row, so "
             "LOTUS's values are checked too.")
    L.append("- peers' settings: AsyncOpenAI with `asyncio.Semaphore(C)` over N gathered tasks "
             "and `Limits(max_connections=C, max_keepalive_connections=C)` (openai "
             f"{meta['versions'].get('openai')} is built on httpx2, so that is "
             "`httpx2.Limits`); its aiohttp transport is `openai.DefaultAioHttpClient` "
             "(`openai[aiohttp]`); raw aiohttp is `bench_aiohttp.py`'s loop as is "
             "(TCPConnector(limit=C), C workers); raw httpx: one AsyncClient with the same "
             "Limits, C workers, no retries; LiteLLM `acompletion(model='openai/mock', "
             "api_base=...)` under a semaphore, its aiohttp transport with "
             "its connector limits raised to C (AIOHTTP_CONNECTOR_LIMIT and "
             "AIOHTTP_CONNECTOR_LIMIT_PER_HOST, default 1000 and 500; each row's notes say which "
             "were set); LOTUS `LM(model='openai/mock', api_base=..., "
             "max_batch_size=C)` = C threads of blocking litellm.completion, cache off. "
             "Retry budgets: semex max_retries=6 (default); AsyncOpenAI, LiteLLM and LOTUS "
             f"max_retries=6 in (a) and (b), {a.rl_peer_retries} under the rate limit.")
    cuts = [r for r in recs if "skipped" in r or "failure" in r
            or (r.get("round", 1) == 1 and (r.get("note") or "").startswith(("N cut", "N = C")))]
    L.append("")
    L.append("## (a) Throughput: N chat requests, latency 50±25 ms\n")
    L.append(f"N = {a.n:,} per client unless the row says otherwise (clients are given at "
             f"most {a.budget_s:.0f} s of work per concurrency: slower clients run fewer rows, "
             f"never fewer than C, and are skipped where even that would take more than "
             f"{a.max_run_s:.0f} s). wrk runs {a.wrk_seconds} s with one thread and C "
             f"connections, resending one fixed body: the most this mock and machine deliver "
             "at that C."
             + (f" Clients whose first run took at most {a.repeat_max_s:g} s ran {a.repeat} "
                "times (in rotating order, after the first round); their row is the median "
                "run by req/s, with the range in the notes." if a.repeat > 1 else "")
             + "\n")
    L.append("![throughput](throughput.png)\n")
    for c in a.conc:
        ref = wrk_rps(recs, c)
        ideal_rps = c / (LATENCY_MS / 1000.0)
        L.append(f"### C = {c:,} (ideal {ideal_rps:,.0f} req/s; wrk "
                 f"{fmt_int(ref)} req/s)\n")
        L.append(throughput_table(recs, "throughput", c, ref))
        L.append("")
    if not a.skip_faults:
        L.append(f"## (b) Faults: C = {a.fault_c:,}, 1% of requests fail\n")
        L.append("Mock: `" + " ".join(FAULTS) + "` (500/503, connection dropped after the "
                 "request, half a body then close; seeded). N as in (a), cut for slow "
                 "clients the same way. Raw aiohttp and raw httpx do not retry, so their "
                 "failed requests are their errors; × wrk uses (a)'s wrk at this C.\n")
        L.append(throughput_table(recs, "faults", a.fault_c, wrk_rps(recs, a.fault_c)))
        L.append("")
    if not a.skip_steady:
        L.append(f"## (d) Steady state: N = {a.steady_n:,} at C = {a.steady_c:,}\n")
        L.append("Same server as (a). At N=20,000 (a 1 s run) connection set-up and the drain "
                 "of the last requests weigh several percent; here they weigh little, which "
                 "is what wrk's 10 s run measures. Each client runs twice; median shown.\n")
        L.append(throughput_table(recs, "steady", a.steady_c, wrk_rps(recs, a.steady_c)))
        L.append("")
    if not a.skip_inflight:
        L.append(f"## (f) {a.inflight_c:,} in flight: latency {a.inflight_latency_ms:g} ms, "
                 f"N = {3 * a.inflight_c:,}\n")
        L.append(f"At 50 ms, {a.inflight_c:,} in flight would need "
                 f"{a.inflight_c / (LATENCY_MS / 1000):,.0f} answers per second, beyond any client "
                 "(and wrk) on two cores, so in (a) at C=10,000 far fewer are actually in "
                 "flight (see the mock's open connections). Here the mock answers after "
                 f"{a.inflight_latency_ms:g} ms, so holding {a.inflight_c:,} in flight takes only "
                 f"{a.inflight_c / (a.inflight_latency_ms / 1000):,.0f} answers/s; *peak RSS* is "
                 "the figure to read, and the mock's `max_open_connections` shows how many were "
                 "really in flight at once.\n")
        L.append(inflight_table(recs, a.inflight_c, a.inflight_latency_ms))
        L.append("")
    if not a.skip_memory:
        L.append(memory_section(recs))
    if not a.skip_ratelimit:
        L.append(f"## (c) Rate-limited server: --rpm {RL_RPM} --tpm {RL_TPM} (100 req/s), "
                 f"C = {a.rl_c}\n")
        L.append(f"semex llm_batch gets about {a.rl_semex_seconds:.0f} s of work at the allowed "
                 f"rate (≈{RL_RPM / 60 * a.rl_semex_seconds:,.0f} calls: the issue's 3 minutes); "
                 f"every other client about {a.rl_seconds:.0f} s "
                 f"(≈{RL_RPM / 60 * a.rl_seconds:,.0f} calls, cut to keep the whole run bounded). The mock's token buckets hold one second's "
                 "worth (100 requests, 10,000 tokens) at start, so a perfect client reaches "
                 "slightly above the allowed rate over a short run. *server 200s/s* = the "
                 "mock's 200 answers / the client's wall time. *allowed calls/s* = min(100, "
                 "10,000 tokens/s ÷ tokens per call), a call costing its body bytes / 4: the "
                 "chat clients' short bodies (~18 tokens) leave 100 calls/s, while the "
                 "extraction prompts (semex sem_extract, LOTUS) are long enough for --tpm to "
                 "bind first (tokens per call from the mock's usage answers). *429 share* = "
                 "the mock's 429 answers / all requests it received.\n")
        L.append(ratelimit_table(recs, a.rl_c))
        L.append("")
    L.append("## Targets\n")
    L.append(targets(recs, a.conc))
    L.append("")
    if cuts:
        L.append("## Cuts, skips and failures\n")
        for r in cuts:
            why = r.get("skipped") or r.get("failure") or r.get("note")
            L.append(f"- {r['workload']} C={r['c']:,} {r['label']}: {why}")
        L.append("")
    L.append("## Commands of every run\n")
    L.append("Client commands are relative to `benchmarks/`, run with the interpreter above; "
             "the mock's arguments follow.\n")
    L.append("```")
    for r in recs:
        if "cmd" in r:
            L.append(f"{r['workload']:10s} {r['cmd']}    # mock {r['mock']}")
    L.append("```")
    if path == "-":
        sys.stdout.write("\n".join(L) + "\n")
        return
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# -------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N=1000, C in {64, 256}, short budgets (~3 minutes)")
    p.add_argument("--only", default=None,
                   help="comma-separated client keys: " + ",".join(CLIENTS))
    p.add_argument("--concurrency", default=None, help="comma-separated C list for (a)")
    p.add_argument("-n", "--n", type=int, default=None, help="rows per run in (a)/(b)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds of work a client gets per configuration (default 25)")
    p.add_argument("--max-run-s", type=float, default=180.0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--wrk-seconds", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per client and configuration in (a)/(b) for clients whose "
                        "first run took at most --repeat-max-s; tables show the median run")
    p.add_argument("--repeat-max-s", type=float, default=8.0)
    p.add_argument("--fault-c", type=int, default=1000)
    p.add_argument("--rl-c", type=int, default=64)
    p.add_argument("--rl-seconds", type=float, default=None)
    p.add_argument("--rl-peer-retries", type=int, default=20)
    p.add_argument("--rl-semex-seconds", type=float, default=None,
                   help="seconds of work for semex llm_batch under the rate limit (default "
                        "180: the issue's 3 minutes; the peers get --rl-seconds)")
    p.add_argument("--steady-n", type=int, default=100000)
    p.add_argument("--inflight-c", type=int, default=10000)
    p.add_argument("--inflight-latency-ms", type=float, default=1000.0)
    p.add_argument("--mem-n", type=int, default=None,
                   help="rows for (e) sem_extract memory (default 1,000,000; --quick 50,000)")
    p.add_argument("--mem-python", default=None,
                   help="interpreter for (e) (default --python); it needs semex, pandas, "
                        "numpy and pyarrow")
    p.add_argument("--steady-c", type=int, default=1000)
    p.add_argument("--skip-workloads", default="",
                   help="comma-separated: throughput,faults,steady,inflight,memory,ratelimit")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the clients (the venv with semex and the peers)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=PYTHON",
                   help="run every semex client with this interpreter too (repeatable; "
                        "with it, semex clients run only under the variants): two builds "
                        "side by side in one run")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"),
                   help="the report; '-': print it (and write --png/--json only if given)")
    p.add_argument("--png", default=None, help="default benchmarks/throughput.png")
    p.add_argument("--json", default=None, help="default benchmarks/results.json")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="run nothing: re-render RESULTS.md and the plot from a results.json "
                        "(pass the options of the run that wrote it)")
    a = p.parse_args(argv)
    if a.out != "-":
        a.png = a.png or os.path.join(HERE, "throughput.png")
        a.json = a.json or os.path.join(HERE, "results.json")
    variants = []
    for v in a.variant:
        label, sep, python = v.partition("=")
        if not sep or not label or not python or "@" in label:
            p.error(f"--variant wants LABEL=PYTHON, got {v!r}")
        python = os.path.abspath(python) if os.sep in python else python
        if not (os.access(python, os.X_OK) or shutil.which(python)):
            p.error(f"--variant {label}: {python} is not an executable")
        variants.append((label, python))
    if a.quick:
        a.n = a.n or 1000
        a.conc = [int(x) for x in (a.concurrency or "64,256").split(",")]
        a.budget_s = a.budget_s or 2.0
        a.wrk_seconds = a.wrk_seconds or 2
        a.rl_seconds = a.rl_seconds or 5.0
        a.rl_semex_seconds = a.rl_semex_seconds or a.rl_seconds
        a.mem_n = a.mem_n or 50000
        a.repeat = 1
        if a.fault_c == 1000:
            a.fault_c = 256
    else:
        a.n = a.n or 20000
        a.conc = [int(x) for x in (a.concurrency or "64,256,1000,4000,10000").split(",")]
        a.budget_s = a.budget_s or 25.0
        a.wrk_seconds = a.wrk_seconds or 10
        a.rl_seconds = a.rl_seconds or 60.0
        a.rl_semex_seconds = a.rl_semex_seconds or 180.0
        a.mem_n = a.mem_n or 1000000
    skip = {s.strip() for s in a.skip_workloads.split(",") if s.strip()}
    a.skip_faults = "faults" in skip
    a.skip_ratelimit = "ratelimit" in skip
    a.skip_steady = "steady" in skip or a.quick
    a.skip_memory = "memory" in skip
    a.skip_inflight = "inflight" in skip or a.quick
    keys = DEFAULT_CLIENTS if not a.only else [k.strip() for k in a.only.split(",")]
    for k in keys:
        if k not in CLIENTS:
            p.error(f"unknown client {k!r}; known: {', '.join(CLIENTS)}")
    keys = add_variants(keys, variants)
    if not os.access(MOCK, os.X_OK):
        p.error(f"{MOCK} is missing: run make -C benchmarks first")
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass

    meta = {
        "command": " ".join([sys.executable, os.path.relpath(os.path.abspath(__file__), ROOT)]
                            + (argv if argv is not None else sys.argv[1:])),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": sh("nproc"), "uname_m": sh("uname -m"), "cpu": cpu_model(),
        "mem": sh("free -h | awk '/Mem:/{print $2\" RAM\"}'"),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "load_start": loadavg(), "python": platform.python_version(),
        "wrk": sh("wrk --version 2>&1 | head -1").split(" Copyright")[0],
        "versions": versions(a.python),
        "semex_source": semex_source(a.python),
        "variants": [dict(label=lb, python=py, version=versions(py).get("semex"),
                          source=semex_source(py)) for lb, py in variants],
    }
    h = Harness(a)
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        h.records = saved["records"]
        for r in h.records:
            renote(r, a.n)
        meta = saved["meta"]
        for r in h.records:  # a --variant copy's key, so that its rows find their label
            if "@" in r["key"] and r["key"] not in CLIENTS and base_key(r["key"]) in CLIENTS:
                CLIENTS[r["key"]] = dict(CLIENTS[base_key(r["key"])], label=r["label"])
        if a.json and a.from_json != a.json:
            with open(a.json, "w") as f:
                json.dump({"meta": meta, "records": h.records}, f, indent=1)
        if "throughput" not in skip:
            plot(h.records, a.conc, a.png)
        write_report(h, meta, a.out)
        h.log(f"re-rendered {a.out} from {a.from_json}")
        return 0
    h.log(f"load average at start: {meta['load_start']}; clients: {', '.join(keys)}")
    k = 0
    if "throughput" not in skip:
        k = h.throughput(keys, a.conc, a.n, k)
    if not a.skip_faults:
        k = h.faults(keys, a.fault_c, a.n, k)
    if not a.skip_steady:
        k = h.steady(keys, a.steady_c, a.steady_n, k)
    if not a.skip_inflight:
        k = h.inflight(keys, a.inflight_c, 3 * a.inflight_c, a.inflight_latency_ms, k)
    if not a.skip_memory:
        h.memory(a.mem_n)
    if not a.skip_ratelimit:
        k = h.ratelimit(keys, a.rl_c, a.rl_seconds, k)
    meta["load_end"] = loadavg()
    meta["wall_min"] = (time.time() - h.t_start) / 60.0
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "records": h.records}, f, indent=1)
    if "throughput" not in skip:
        plot(h.records, a.conc, a.png)
    write_report(h, meta, a.out)
    written = [x for x in (a.out if a.out != "-" else None,
                           a.png if "throughput" not in skip else None, a.json) if x]
    h.log(f"done in {meta['wall_min']:.1f} min; load average at end: {meta['load_end']}; "
          + ("wrote " + ", ".join(written) if written else "printed the report"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
