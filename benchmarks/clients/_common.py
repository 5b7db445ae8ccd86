"""Shared plumbing for the benchmark clients in this folder (not a client itself).

Every client script takes the same command line

    python benchmarks/clients/<client>.py --url http://127.0.0.1:PORT/v1 --n N -c C
        [--model mock] [--max-retries R] [--timeout S]

sends one request per row (row i carries the user message "prompt i"; the mock provider,
benchmarks/mock/, answers "echo: prompt i"; requests with a response_format get a
schema-shaped JSON answer instead, see mock_string_value), and prints ONE JSON line on stdout:

    client, n, c, wall_s, rps (rows / wall), ok, errors, mismatches, rows_lost,
    retried, got_429, cpu_user_s, cpu_sys_s, cpu_us_per_req, max_rss_mb, notes, ...

ok         rows that came back with an answer
errors     rows that came back as an error (HTTP status, transport, parse ...)
mismatches rows whose answer is some other row's (a row mix-up); counted inside ok
rows_lost  n - ok - errors: rows the client neither answered nor reported; must be 0
retried    HTTP attempts beyond one per row (retries), where the client can tell; else null
got_429    429 answers the client saw, where it can tell; else null
CPU        user+sys of this process (all its threads) from getrusage, around the timed run
           only (imports and set-up excluded), divided by n
max_rss_mb the process's peak RSS (ru_maxrss), imports included
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", required=True, help="API base, e.g. http://127.0.0.1:PORT/v1")
    p.add_argument("--n", "-n", type=int, default=20000, help="rows (requests)")
    p.add_argument("-c", "--concurrency", dest="c", type=int, default=1000,
                   help="most requests in flight")
    p.add_argument("--model", default="mock")
    p.add_argument("--max-retries", type=int, default=6,
                   help="retry budget per request, for clients that have one")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.n < 1 or args.c < 1:
        p.error("--n and -c must be positive")


def prompts(n: int):
    return [f"prompt {i}" for i in range(n)]


def expected(i: int) -> str:
    return f"echo: prompt {i}"


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def mock_string_value(field: str, document: str) -> str:
    """What the mock answers for a string field `field` of a structured (response_format)
    request about `document` (the text after "Document:" / under "Document <k>:", trailing
    whitespace trimmed): "<field>:<8 hex digits of FNV-1a 32 of its UTF-8 bytes>"."""
    return f"{field}:{fnv1a32(document.encode('utf-8', 'surrogatepass')):08x}"


_DOC_RE = re.compile(r"prompt (\d+)(?!\d)")


def doc_index(raw: str):
    """The row number of the document quoted in an echoed extraction prompt, or None.

    The extraction prompts (semex, LOTUS) end with the document's text ("prompt i"); the
    mock echoes that last message back, so the *last* "prompt <digits>" in the answer
    names the row the answer belongs to."""
    if not isinstance(raw, str):
        return None
    found = _DOC_RE.findall(raw)
    return int(found[-1]) if found else None


def run_timed(coro_factory, use_uvloop: bool):
    """Run coro_factory() to completion on a fresh event loop (uvloop's if asked), timed by a
    Meter that excludes the loop's creation. Returns (result, meter)."""
    import asyncio

    if use_uvloop:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner, Meter() as meter:
        result = runner.run(coro_factory())
    return result, meter


def tally(results):
    """(ok, errors, mismatches) of a client's per-row results: the answer text, None for a
    row never answered, or the exception it ended with."""
    errs = [r for r in results if not isinstance(r, str) and r is not None]
    ok = sum(isinstance(r, str) for r in results)
    mismatches = sum(isinstance(r, str) and r != expected(i) for i, r in enumerate(results))
    return ok, errs, mismatches


class Meter:
    """Wall time and getrusage around the timed part of a run."""

    def __enter__(self):
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.r1 = resource.getrusage(resource.RUSAGE_SELF)
        return False

    def fields(self, n: int) -> dict:
        user = self.r1.ru_utime - self.r0.ru_utime
        sys_ = self.r1.ru_stime - self.r0.ru_stime
        return {
            "wall_s": round(self.wall, 4),
            "rps": round(n / self.wall, 1) if self.wall > 0 else None,
            "cpu_user_s": round(user, 4),
            "cpu_sys_s": round(sys_, 4),
            "cpu_us_per_req": round((user + sys_) / n * 1e6, 2),
            "max_rss_mb": round(self.r1.ru_maxrss / 1024.0, 1),  # Linux: KiB
        }


def emit(client: str, args, meter: Meter, *, ok: int, errors: int, mismatches: int,
         retried=None, got_429=None, **extra) -> int:
    out = {"client": client, "n": args.n, "c": args.c}
    out.update(meter.fields(args.n))
    out.update({
        "ok": ok,
        "errors": errors,
        "mismatches": mismatches,
        "rows_lost": args.n - ok - errors,
        "retried": retried,
        "got_429": got_429,
    })
    out.update(extra)
    print(json.dumps(out), flush=True)
    return 0 if out["rows_lost"] == 0 else 3


def quiet_third_parties() -> None:
    """No network from set-up code (LiteLLM's price map, hub look-ups)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def raise_nofile() -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def count_kinds(exc_list) -> dict:
    kinds: dict = {}
    for e in exc_list:
        k = type(e).__name__
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
