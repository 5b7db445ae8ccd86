"""Token budgets that settle against usage: how much of a TPM limit llm_batch holds when
max_tokens is far above what the answers use.

The C mock's --tpm-usage limiter counts what each answer's usage says (prompt + completion
tokens), as a provider that settles at the end of a request does. Each request needs its
prompt's tokens (body bytes/4) in the bucket to be admitted, and it sends
x-ratelimit-*-tokens headers. llm_batch runs with the same tpm and max_tokens = 8x the
typical answer. It runs twice: settle_tokens=True (new: each reservation of characters/4 +
max_tokens is settled when the answer's usage arrives) and settle_tokens=False (old: the
reservation is the charge, as before). The two alternate in one run against a fresh mock
each, in a process of their own.

    make -C benchmarks && .venv/bin/python benchmarks/bench_tpm.py [--seconds 30] [--repeat 2]
        [--tpm 2400000] [--c 256] [--out benchmarks/TPM-RESULTS.md --json benchmarks/tpm.json]

Reported per run:
- achieved TPM: the mock's usage tokens of its 200s per minute of the client's wall time, as
  a share of the limit. Also the same net of the one second's burst that the mock's bucket
  holds at the start.
- 429 share: the mock's 429s over all the requests it received.
- rows lost: rows with no answer.
- the engine's settlements and refunds.
--python NAME=PATH runs a build's venv instead (the settle_tokens option is then left out
for a NAME starting with "prev": a build from before it existed).
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
import json, sys, threading, time
import semex
cfg = json.loads(sys.argv[1])
emb = {}
def embed_side():
    rm = semex.EmbeddingModel("emb", api_base=cfg["url"], api_key="sk-bench",
                              tpm=cfg["embed_tpm"], max_concurrency=cfg["c"])
    texts = ["text %d %s" % (i, "y" * cfg["prompt_chars"]) for i in range(cfg["embed_n"])]
    t = time.perf_counter()
    m = semex.embed(texts, rm, batch_size=8, progress=False)
    emb.update(wall=time.perf_counter() - t, rows=int(m.shape[0]),
               client_429=rm.engine_stats()["http_429"] if hasattr(rm, "engine_stats") else None)
th = threading.Thread(target=embed_side) if cfg.get("embed_n") else None
if th:
    th.start()
kw = {} if cfg["settle"] is None else {"settle_tokens": cfg["settle"]}
lm = semex.LM("mock", api_base=cfg["url"], api_key="sk-bench", tpm=cfg["tpm"],
              max_tokens=cfg["max_tokens"], max_concurrency=cfg["c"], temperature=None, **kw)
pad = "x" * cfg["prompt_chars"]
prompts = ["row %d %s" % (i, pad) for i in range(cfg["n"])]
t0 = time.perf_counter()
out = semex.llm_batch(prompts, lm, max_concurrent=cfg["c"], errors="objects")
wall = time.perf_counter() - t0
ok = sum(1 for i, r in enumerate(out) if r == "echo: " + prompts[i])
errors = sum(1 for r in out if not isinstance(r, str))
if th:
    th.join()
st = lm.engine_stats()
u = lm.total_usage
print(json.dumps({"wall": wall, "ok": ok, "errors": errors, "client_429": st["http_429"],
                  "settled": st.get("tokens_settled"), "refunded": st.get("tokens_refunded"),
                  "overrun": st.get("tokens_overrun"), "prompt_tokens": u.prompt_tokens,
                  "completion_tokens": u.completion_tokens, "embed": emb}))
"""


def start_mock(args, embed=False):
    argv = [MOCK, "--port", "0", "--stdin-watch", "--latency-ms", str(args.latency_ms),
            "--jitter-ms", str(args.jitter_ms), "--tpm", str(args.tpm), "--tpm-usage"]
    if embed:
        argv += ["--embed-tpm", str(args.embed_tpm)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT"):
        sys.exit(f"mockserver did not start: {line!r}")
    return proc, int(line.split()[1]), " ".join(argv[1:])


def stats(port):
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/_stats", timeout=10) as r:
        return json.loads(r.read())


def typical_answer_tokens(prompt_chars):
    """The mock's completion_tokens for "echo: row <i> <pad>": escaped bytes/4 + 1."""
    return (len("echo: row 1000 ") + prompt_chars) // 4 + 1


def run_one(args, name, python, settle, n, embed_n=0):
    proc, port, mock_argv = start_mock(args, embed=bool(embed_n))
    cfg = dict(url=f"http://127.0.0.1:{port}/v1", tpm=args.tpm, c=args.c, n=n,
               max_tokens=args.max_tokens, prompt_chars=args.prompt_chars, settle=settle,
               embed_tpm=args.embed_tpm, embed_n=embed_n)
    try:
        t0 = time.time()
        p = subprocess.run([python, "-c", CLIENT, json.dumps(cfg)], capture_output=True,
                           text=True, timeout=args.timeout)
        if p.returncode != 0:
            sys.exit(f"{name}: client failed:\n{p.stderr[-2000:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        srv = stats(port)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    wall = res["wall"]
    burst = args.tpm / 60.0
    used = srv["usage_tokens"]
    res.update(name=name, n=n, mock=mock_argv, started=t0,
               server_requests=srv["requests"], server_200=srv["responses_200"],
               server_429=srv["responses_429"], usage_tokens=used,
               achieved_tpm=used / wall * 60.0,
               share=used / wall * 60.0 / args.tpm,
               share_net=(used - burst) / wall * 60.0 / args.tpm,
               share_429=srv["responses_429"] / max(1, srv["requests"]),
               lost=n - res["ok"] - res["errors"], rows_per_s=n / wall)
    if embed_n:
        e = res["embed"]
        res["embed_share"] = srv["embed_usage_tokens"] / e["wall"] * 60.0 / args.embed_tpm
        res["embed_share_net"] = ((srv["embed_usage_tokens"] - args.embed_tpm / 60.0)
                                  / e["wall"] * 60.0 / args.embed_tpm)
        print(f"   embeddings beside it: {e['rows']} rows in {e['wall']:.1f} s, "
              f"{100 * res['embed_share']:.1f}% of --embed-tpm "
              f"({100 * res['embed_share_net']:.1f}% net)", file=sys.stderr, flush=True)
    print(f"{name}: {res['achieved_tpm']:,.0f} TPM = {100 * res['share']:.1f}% "
          f"({100 * res['share_net']:.1f}% net of the start burst), 429s "
          f"{100 * res['share_429']:.2f}%, lost {res['lost']}, {res['rows_per_s']:.1f} rows/s",
          file=sys.stderr, flush=True)
    return res


def table(results, args):
    typ = typical_answer_tokens(args.prompt_chars)
    L = ["| build | N | wall s | rows/s | achieved TPM | % of limit | % net of start burst "
         "| 429 share | rows lost | settlements | refunded tokens |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        settled = "—" if r.get("settled") is None else f"{r['settled']:,}"
        refunded = "—" if r.get("refunded") is None else f"{r['refunded']:,.0f}"
        L.append(f"| {r['name']} | {r['n']:,} | {r['wall']:.1f} | {r['rows_per_s']:.1f} | "
                 f"{r['achieved_tpm']:,.0f} | {100 * r['share']:.1f}% | "
                 f"{100 * r['share_net']:.1f}% | {100 * r['share_429']:.2f}% | "
                 f"**{r['lost']}** | {settled} | {refunded} |")
    head = (f"TPM limit {args.tpm:,.0f} (mock `--tpm {args.tpm:g} --tpm-usage`, latency "
            f"{args.latency_ms:g}±{args.jitter_ms:g} ms), C = {args.c}, prompts of "
            f"~{args.prompt_chars + 10} characters, typical answer {typ} completion tokens, "
            f"max_tokens = {args.max_tokens} ({args.max_tokens / typ:.1f}× the typical answer).")
    return head + "\n\n" + "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tpm", type=float, default=2_400_000)
    ap.add_argument("--c", type=int, default=256)
    ap.add_argument("--prompt-chars", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="default 8x the typical answer's completion tokens")
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="work per run at the allowed rate (new); old runs get the same N")
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--jitter-ms", type=float, default=25)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--python", action="append", default=[], metavar="NAME=PATH",
                    help="also run a build's venv (its settle_tokens default)")
    ap.add_argument("--old-n", type=int, default=None,
                    help="rows for the old runs (default: as many as the new ones)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--embed-tpm", type=float, default=1_200_000,
                    help="the mock's --embed-tpm for the chat + embeddings run")
    ap.add_argument("--no-embed", action="store_true",
                    help="skip the chat + embeddings run (new build only)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not os.access(MOCK, os.X_OK):
        sys.exit(f"{MOCK} is missing: run make -C benchmarks first")
    typ = typical_answer_tokens(args.prompt_chars)
    args.max_tokens = args.max_tokens or 8 * typ
    prompt_tokens = (args.prompt_chars + 160) // 4  # body bytes/4, measured ~ this
    allowed_rps = args.tpm / 60.0 / (prompt_tokens + typ)
    n = int(allowed_rps * args.seconds)
    runs = [("new (settle_tokens=True)", sys.executable, True, n),
            ("old (settle_tokens=False)", sys.executable, False, args.old_n or n)]
    for spec in args.python:
        name, _, path = spec.partition("=")
        runs.append((name, path, None if name.startswith("prev") else True, args.old_n or n))
    results = []
    for _ in range(args.repeat):
        for name, python, settle, rows in runs:
            results.append(run_one(args, name, python, settle, rows))
    text = table(results, args)
    emb_text = ""
    if not args.no_embed:
        # Chat and embeddings at once against a provider that limits them separately
        # (--tpm and --embed-tpm): each holds its own limit, neither starves the other.
        embed_tok = (len("text 1000 ") + args.prompt_chars + 3) / 4.0 + 40 / 8.0
        embed_n = int(args.embed_tpm / 60.0 / embed_tok * args.seconds)
        r = run_one(args, "new, chat + embeddings at once", sys.executable, True, n, embed_n)
        e = r["embed"]
        emb_text = (
            f"Chat and embeddings at once, one process: llm_batch as above (`tpm={args.tpm:g}`) "
            f"and `semex.embed` of {e['rows']:,} texts (batch_size=8, "
            f"`EmbeddingModel(tpm={args.embed_tpm:g})`), mock `--tpm {args.tpm:g} "
            f"--tpm-usage --embed-tpm {args.embed_tpm:g}`: each has a bucket of its own.\n\n"
            "| side | wall s | % of its limit | % net of start burst | 429s (client) |\n"
            "|---|---:|---:|---:|---:|\n"
            f"| chat | {r['wall']:.1f} | {100 * r['share']:.1f}% | {100 * r['share_net']:.1f}% "
            f"| {r['client_429']} |\n"
            f"| embeddings | {e['wall']:.1f} | {100 * r['embed_share']:.1f}% | "
            f"{100 * r['embed_share_net']:.1f}% | {e.get('client_429')} |\n"
            f"\nThe mock answered {100 * r['share_429']:.2f}% of all requests 429 in that run.")
        results.append(r)
        text += "\n\n" + emb_text
    print(text)
    cmd = "python " + " ".join([os.path.relpath(__file__, os.path.dirname(HERE))] + sys.argv[1:])
    if args.out:
        with open(args.out, "w") as f:
            f.write("# TPM settlement: old vs new\n\n")
            f.write(f"`{cmd}` on {time.strftime('%Y-%m-%d %H:%M %Z')}, "
                    f"{os.cpu_count()} cores shared by the client and the mock.\n\n")
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "command": cmd, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
