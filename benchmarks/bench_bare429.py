"""Bare 429s: how much of a gateway's limit llm_batch holds when the server says only 429.

The C mock's --bare-rate/--bare-burst limiter answers 429 with no Retry-After and no
x-ratelimit-* headers (as nginx limit_req ... burst=B nodelay does). For each scenario a
fresh mock is started and each semex build (one venv per build: --python NAME=PATH, e.g.
the old build from main and this one) runs the same llm_batch in its own process; builds
alternate within each scenario, repetition by repetition, so machine noise hits both alike.

    python benchmarks/bench_bare429.py \
        --python old=/path/to/main/.venv/bin/python@800 --python new=.venv/bin/python \
        --out benchmarks/bare429.md --json benchmarks/bare429.json --png benchmarks/bare429.png

Scenarios: 200 req/s allowed, burst 20, 20 ms latency; C = 200 and 1,000 in flight; with
rpm given (the gateway's true 12,000/min) and without; "halved": the limit halves after
10 s and is restored after 20 s (no rpm given); "headers": the mock's own header-sending
limiter (--rpm 12000) with rpm given, to show the header path is unchanged.

Reported per run: achieved rate (rows answered / wall, and the mock's 200s per second over
the run), that as a share of what the limiter allowed over the same wall time (rate x wall
+ burst, the halved interval counted at half), the share of requests answered 429 (the
mock's count), and rows lost (no answer). --png plots the 200s per 100 ms over time,
smoothed over 1 s, one panel per scenario, each build a line.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "build", "mockserver")

CLIENT = r"""
import json, sys, time
import semex
cfg = json.loads(sys.argv[1])
lm = semex.LM("mock", api_base=cfg["url"], api_key="sk-bench", rpm=cfg["rpm"],
              max_concurrency=cfg["c"], max_retries=cfg["retries"])
prompts = ["row %d" % i for i in range(cfg["n"])]
t0 = time.perf_counter()
out = semex.llm_batch(prompts, lm, max_concurrent=cfg["c"], errors="objects")
wall = time.perf_counter() - t0
ok = sum(1 for i, r in enumerate(out) if r == "echo: row %d" % i)
errors = sum(1 for e in out.errors if e is not None) if hasattr(out, "errors") else 0
stats = lm.engine_stats()
print(json.dumps({"wall": wall, "ok": ok, "errors": errors, "client_429": stats["http_429"],
                  "episodes": stats.get("bare_429_episodes"),
                  "learned_rpm": stats.get("learned_rpm")}))
"""

SCENARIOS = {
    "C=200, rpm given": dict(c=200, rpm=12000, mock=["--bare-rate", "200", "--bare-burst", "20"]),
    "C=1000, rpm given": dict(c=1000, rpm=12000, mock=["--bare-rate", "200", "--bare-burst", "20"]),
    "C=200, no rpm": dict(c=200, rpm=None, mock=["--bare-rate", "200", "--bare-burst", "20"]),
    "C=1000, no rpm": dict(c=1000, rpm=None, mock=["--bare-rate", "200", "--bare-burst", "20"]),
    "halved 10-20 s, C=200, no rpm": dict(
        c=200, rpm=None, halve=(10, 20),
        mock=["--bare-rate", "200", "--bare-burst", "20", "--bare-halve-at", "10",
              "--bare-restore-at", "20"]),
    "headers (--rpm 12000), C=200, rpm given": dict(c=200, rpm=12000, headers=True,
                                                     mock=["--rpm", "12000"]),
}


def start_mock(args, extra):
    proc = subprocess.Popen([MOCK, "--port", "0", "--latency-ms", str(args.latency_ms),
                             "--stdin-watch"] + extra,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    port = int(line.split()[1])
    return proc, f"http://127.0.0.1:{port}"


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def allowed(sc, wall, rate, burst):
    if sc.get("headers"):
        return rate * wall + rate        # the mock's own bucket holds one second's worth
    total = rate * wall + burst
    if "halve" in sc:
        lo, hi = sc["halve"]
        overlap = max(0.0, min(wall, hi) - lo)
        total -= rate / 2 * overlap
    return total


def run_one(args, name, sc, build, python):
    proc, base = start_mock(args, sc["mock"])
    try:
        n = sc.get("n", args.n)
        cfg = {"url": base + "/v1", "rpm": sc["rpm"], "c": sc["c"], "n": n,
               "retries": args.max_retries}
        out = subprocess.run([python, "-c", CLIENT, json.dumps(cfg)], capture_output=True,
                             text=True, timeout=args.timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{build} {name}: client failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        stats = get(base + "/_stats")
        timeline = get(base + "/_timeline")
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    wall = res["wall"]
    permitted = allowed(sc, wall, args.rate, args.burst)
    res.update(scenario=name, build=build, n=n, c=sc["c"], rpm=sc["rpm"],
               rate=res["ok"] / wall, server_200=stats["responses_200"],
               server_429=stats["responses_429"], requests=stats["requests"],
               share_429=stats["responses_429"] / max(1, stats["requests"]),
               of_allowed=stats["responses_200"] / permitted, lost=n - res["ok"] - res["errors"],
               timeline=timeline)
    return res


def table(results):
    lines = ["| scenario | build | N | wall s | rows/s | % of allowed | 429 share (mock) | "
             "429s | errors | rows lost | bare-429 episodes | learned rpm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['build']} | {r['n']:,} | {r['wall']:.1f} | "
            f"{r['rate']:.1f} | {100 * r['of_allowed']:.1f}% | {100 * r['share_429']:.2f}% | "
            f"{r['server_429']:,} | {r['errors']} | **{r['lost']}** | "
            f"{'—' if r['episodes'] is None else r['episodes']} | "
            f"{'—' if not r['learned_rpm'] else round(r['learned_rpm'])} |")
    return "\n".join(lines)


def plot(results, path, xmax=60.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["scenario"] for r in results))
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)), sharex=False)
    if len(names) == 1:
        axes = [axes]
    for ax, name in zip(axes, names):
        for r in results:
            if r["scenario"] != name:
                continue
            ok = r["timeline"]["ok"]
            smooth = [sum(ok[max(0, i - 9):i + 1]) / (min(i + 1, 10) * 0.1) for i in range(len(ok))]
            ax.plot([i * 0.1 for i in range(len(ok))], smooth,
                    label=f"{r['build']}: {100 * r['of_allowed']:.0f}% of allowed, "
                          f"{100 * r['share_429']:.1f}% 429")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, xmax)
        ax.set_ylabel("200s/s (1 s mean)")
        ax.axhline(200, color="grey", lw=0.6, ls="--")
        ax.legend(fontsize=8, loc="lower right")
    axes[-1].set_xlabel("seconds since the first request")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", action="append", default=[],
                    help="NAME=PATH[@N] of a venv python with semex installed (repeatable); "
                         "@N runs that build's bare-429 scenarios with N rows instead of --n "
                         "(an old build that holds a seventh of the rate would take minutes)")
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--burst", type=float, default=20)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--max-retries", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", help="comma-separated scenario name prefixes")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out")
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--plot-xmax", type=float, default=60.0,
                    help="seconds shown in the plot (an old build may run for minutes)")
    ap.add_argument("--from-json", help="only redraw --png from a saved --json")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            plot(json.load(f), args.png, args.plot_xmax)
        return
    builds = []
    for spec in args.python:
        name, path = spec.split("=", 1)
        path, _, n = path.partition("@")
        builds.append((name, path, int(n) if n else None))
    if not os.path.exists(MOCK):
        subprocess.run(["make", "-s", "-C", HERE], check=True)
    names = list(SCENARIOS)
    if args.only:
        prefixes = args.only.split(",")
        names = [n for n in names if any(n.startswith(p) for p in prefixes)]
    results = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for name in names:
        for rep in range(args.repeat):
            order = builds if rep % 2 == 0 else builds[::-1]
            for build, python, n in order:
                sc = dict(SCENARIOS[name])
                if n and not sc.get("headers"):
                    sc["n"] = n
                r = run_one(args, name, sc, build, python)
                results.append(r)
                print(f"{name:42s} {build:4s} {r['rate']:7.1f} rows/s "
                      f"{100 * r['of_allowed']:5.1f}% of allowed, 429 {100 * r['share_429']:5.2f}%, "
                      f"lost {r['lost']}, errors {r['errors']}", flush=True)
    md = (f"bench_bare429.py, {started}: `{' '.join(sys.argv)}`\n\n" + table(results) + "\n")
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    if args.png:
        plot(results, args.png, args.plot_xmax)


if __name__ == "__main__":
    main()
