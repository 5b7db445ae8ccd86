#!/usr/bin/env python3
"""Raw aiohttp client: benchmarks/bench_aiohttp.py's request loop, reused unchanged.

    python benchmarks/clients/aiohttp_raw.py --url http://127.0.0.1:PORT/v1 --n 20000 -c 1000
        [--uvloop]

Imports bench_aiohttp and runs its run() (C workers over one ClientSession with
TCPConnector(limit=C), each taking the next row; no retries: a 429/5xx/transport failure is
that row's error) inside this folder's timing and output line. --url is the API base;
/chat/completions is appended. bench_aiohttp counts failures but not 429s separately, so
got_429 is null here (the harness reports the server's count); retried is 0 (it never
retries).
"""
from __future__ import annotations

import os
import sys

import _common as cm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_aiohttp  # noqa: E402  (benchmarks/bench_aiohttp.py)


def main(argv=None) -> int:
    p = cm.parser(__doc__.splitlines()[0])
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args(argv)
    cm.check_args(p, args)
    cm.raise_nofile()
    inner = bench_aiohttp.parse_args(
        ["--url", args.url.rstrip("/") + "/chat/completions", "-n", str(args.n), "-c",
         str(args.c), "--model", args.model, "--timeout", str(args.timeout)]
        + (["--uvloop"] if args.uvloop else []))
    (errors, mismatches), m = cm.run_timed(lambda: bench_aiohttp.run(inner), args.uvloop)
    import aiohttp
    # bench_aiohttp's workers take every row exactly once and count each failure, so a row
    # is either ok (possibly mismatched) or an error.
    return cm.emit("aiohttp" + (" (uvloop)" if args.uvloop else ""), args, m,
                   ok=args.n - errors, errors=errors, mismatches=mismatches, retried=0,
                   got_429=None, notes="bench_aiohttp.run; no retries",
                   version=aiohttp.__version__)


if __name__ == "__main__":
    sys.exit(main())
