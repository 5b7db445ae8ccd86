"""Differential check of csrc/chatjson.c against json.loads over a corpus.

    python diff_chatjson.py DUMP_BINARY DIR_OR_FILE...

DUMP_BINARY is fuzz_chatjson.c built with -DSX_FUZZ_DUMP (make -C tests/fuzz dump). For
every body the C reader says it parsed, the content, finish_reason and usage counts must be
exactly what json.loads gives under the rules chatjson.h documents; a body json.loads refuses
must not be parsed. (Falling back on a body json.loads reads is allowed: that is the fast
path declining.) Exit status 1 and one line per mismatch if any; prints the counts.
"""
import json
import os
import subprocess
import sys

_MISSING = object()


def reference(body: bytes):
    """(content, finish, tokens) as json.loads reads them, or None if chatjson must not
    claim this body (json.loads refuses it, or a field is of a kind chatjson leaves to
    Python)."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    try:
        message = answer["choices"][0]["message"]
        content = message["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if content is not None and not isinstance(content, str):
        return None
    finish = answer["choices"][0].get("finish_reason", None)
    if finish is not None and not isinstance(finish, str):
        return None
    tokens = [0, 0, 0]
    usage = answer.get("usage", None)
    if isinstance(usage, dict):
        for i, k in enumerate(("prompt_tokens", "completion_tokens", "total_tokens")):
            v = usage.get(k, None)
            if v is None:
                continue
            if type(v) is not int or v < 0 or v >= 10 ** 18:
                return None
            tokens[i] = v
    elif usage is not None:
        return None
    enc = (lambda s: None if s is None else s.encode("utf-8", "surrogatepass").hex())
    return enc(content), enc(finish), tokens


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
        out = subprocess.run([dump] + chunk, check=True, capture_output=True).stdout
        for path, line in zip(chunk, out.decode().splitlines()):
            got = json.loads(line)
            if not got["parsed"]:
                continue
            parsed += 1
            with open(path, "rb") as f:
                want = reference(f.read())
            have = (got["content"], got["finish"], got["tokens"])
            if want is None or tuple(want) != have:
                bad += 1
                print(f"MISMATCH {path}: chatjson {have}, json.loads {want}")
    print(f"{len(files)} bodies, {parsed} parsed by chatjson, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
