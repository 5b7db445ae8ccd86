#!/usr/bin/env python3
"""Check semex._engine.read_rows (csrc/rowjson.c + module_rows.c) against sem_extract's
Python reader (json.loads' lenient decoder + extract.single_answer + OutputSpec.validate)
over every file of the given corpus directories: a row the C reader reads must be exactly
the row Python makes of it, types included. Files that are not UTF-8 are skipped (answers
reach the reader as str).

    python tests/fuzz/diff_rowjson.py DIR [DIR ...]
"""
import os
import sys

from semex import _engine
from semex._schema import OutputSpec, RowInvalid, parse_json_answer
from semex.extract import single_answer


def main(dirs):
    specs = [OutputSpec({"topic": None, "sender": None, "n": None}, True),
             OutputSpec({"topic": None, "results": None}, False, reasoning=True)]
    texts = []
    for folder in dirs:
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            with open(os.path.join(folder, name), "rb") as f:
                try:
                    texts.append(f.read().decode("utf-8"))
                except UnicodeDecodeError:
                    pass
    read = 0
    for spec in specs:
        names, kinds = spec.row_reader()
        flags, columns = _engine.read_rows(texts, names, kinds)
        for i, text in enumerate(texts):
            if not flags[i]:
                continue
            read += 1
            row = {name: columns[k][i] for k, name in enumerate(names)}
            try:
                want = spec.validate(single_answer(parse_json_answer(text), spec))
            except (ValueError, RowInvalid) as exc:
                sys.exit(f"diff_rowjson: C read {text!r} as {row}, Python refuses it: {exc}")
            if row != want or any(type(row[n]) is not type(want[n]) for n in names):
                sys.exit(f"diff_rowjson: {text!r}: C {row!r} != Python {want!r}")
    print(f"diff_rowjson: {len(texts)} inputs, {read} rows read in C, all equal to Python's")


if __name__ == "__main__":
    main(sys.argv[1:])
