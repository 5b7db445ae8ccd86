"""Differential check of csrc/nativejson.c against semex's Python readers over a corpus.

    python diff_nativejson.py DUMP_BINARY DIR_OR_FILE...

DUMP_BINARY is fuzz_nativejson.c built with -DSX_FUZZ_DUMP. Each file is one dialect byte
(even: Anthropic, odd: Gemini) and a body. For every body the C reader says it parsed, the
content, finish reason and usage counts must be what semex.providers' reader of that dialect
gives from json.loads (a forced tool's input, which C hands over as its raw JSON text, is
compared as the value it parses to); a body json.loads or the Python reader refuses must not
be parsed. Needs semex importable. Exit status 1 and one line per mismatch if any.
"""
import json
import os
import subprocess
import sys

from semex.providers.anthropic import Anthropic
from semex.providers.gemini import Gemini

# The dump is built with clang's ASan: a preloaded gcc libasan (make test-asan) is not its.
_DUMP_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}

# The readers only need their read(); building them needs no network and no key.
READERS = {0: Anthropic(), 1: Gemini()}


def reference(data: bytes):
    """(content, finish, tokens, tool) as the Python reader gives them, or None if the C
    reader must not claim this body."""
    if not data:
        return None
    dialect, body = data[0] & 1, data[1:]
    try:
        answer = json.loads(body)
        if not isinstance(answer, dict):
            return None
        content, finish, p, c, t = READERS[dialect].read(answer)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return None
    if dialect == 1 and not answer.get("candidates"):
        return None  # a blocked prompt: Python's alone
    for name, value in (("p", p), ("c", c), ("t", t)):
        if value >= 10 ** 18:
            return None
    tool = None
    if dialect == 0:
        for block in answer["content"]:
            if block.get("type") == "tool_use" and "input" in block:
                tool = block["input"]
                break
    enc = (lambda s: None if s is None else s.encode("utf-8", "surrogatepass").hex())
    return enc(content), enc(finish), [p, c, t], tool


def main(argv):
    dump, paths = argv[1], argv[2:]
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p))
        else:
            files.append(p)
    parsed = bad = 0
    for start in range(0, len(files), 500):
        chunk = files[start:start + 500]
        out = subprocess.run([dump] + chunk, check=True, capture_output=True,
                             env=_DUMP_ENV).stdout
        for path, line in zip(chunk, out.decode().splitlines()):
            got = json.loads(line)
            if not got["parsed"]:
                continue
            parsed += 1
            with open(path, "rb") as f:
                want = reference(f.read())
            have = (got["content"], got["finish"], got["tokens"])
            if want is not None and want[3] is not None:  # a tool's input: compare values
                try:
                    same = json.loads(bytes.fromhex(have[0])) == want[3]
                except (ValueError, TypeError):
                    same = False
                ok = same and have[1:] == (want[1], want[2])
            else:
                ok = want is not None and have == tuple(want[:3])
            if not ok:
                bad += 1
                print(f"MISMATCH {path}: nativejson {have}, python {want}")
    print(f"{len(files)} bodies, {parsed} parsed by nativejson, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
