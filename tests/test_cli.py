"""The ``semex`` command line (semex.cli), run for real against the fake server."""
import io
import json
import logging
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest

import semex
from semex import cli

KEY_ENV = "SEMEX_CLI_TEST_KEY"
OUTS = ["--out", "sentiment=positive/negative/neutral", "--out", "product"]


@pytest.fixture
def run(server, monkeypatch, capsys):
    """run(*args) -> (exit code, stdout, stderr) of ``semex extract ...`` in-process."""
    monkeypatch.setenv(KEY_ENV, server.api_key)

    def go(*args, base=True):
        argv = ["extract", *map(str, args)]
        if base:
            argv += ["--api-base", server.base_url, "--api-key-env", KEY_ENV,
                     "--model", "test-model", "--no-progress"]
        code = cli.main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return go


def write_csv(path, texts, **extra):
    pd.DataFrame({"id": [f"{i:03d}" for i in range(len(texts))], "text": texts, **extra}
                 ).to_csv(path, index=False)
    return path


def assert_one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("semex: error: "), err
    assert "Traceback" not in err


def test_csv_to_csv_on_stdout_in_row_order(run, server, tmp_path):
    texts = [f"review number {i}" for i in range(7)] + ["naïve café, \"quoted\"", "東京の店"]
    src = write_csv(tmp_path / "in.csv", texts)
    code, out, err = run(src, "--col", "text", *OUTS, "--batch-size", "2")
    assert code == 0, err
    frame = pd.read_csv(io.StringIO(out), dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["id", "text", "sentiment", "product", "extract_error"]
    assert list(frame["id"]) == [f"{i:03d}" for i in range(len(texts))]  # text, zeros kept
    assert list(frame["text"]) == texts
    assert list(frame["sentiment"]) == [f"sentiment:{t}" for t in texts]
    assert list(frame["product"]) == [f"product:{t}" for t in texts]
    assert (frame["extract_error"] == "").all()
    ndocs = [r["ndocs"] for r in server.log()]
    assert sum(ndocs) == len(texts) and max(ndocs) == 2  # two documents per prompt
    summary = err.strip().splitlines()
    assert summary[0].startswith(f"semex: {len(texts)} rows in ")
    assert f"{len(texts)} ok, 0 failed" in summary[0]
    assert "requests/s" in err and "prompt +" in err and "completion" in err
    assert summary[-1] == f"semex: all {len(texts)} rows extracted to stdout"


def test_jsonl_to_parquet_with_quotes_and_two_input_columns(run, tmp_path):
    pytest.importorskip("pyarrow")
    src = tmp_path / "in.jsonl"
    rows = [{"title": f"t{i}", "stars": i, "body": f"body {i}"} for i in range(5)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dst = tmp_path / "out.parquet"
    code, out, err = run(src, "--col", "title", "--col", "body", *OUTS, "--quotes", "-o", dst)
    assert code == 0, err
    assert out == ""
    frame = pd.read_parquet(dst)
    assert list(frame.columns) == ["title", "stars", "body", "sentiment", "product",
                                   "sentiment_quote", "product_quote", "extract_error"]
    assert list(frame["stars"]) == list(range(5))  # JSON numbers stay numbers
    # a document's first line is its first column: "[title]: t<i>"
    assert list(frame["sentiment"]) == [f"sentiment:t{i}" for i in range(5)]
    assert list(frame["product_quote"]) == [f"t{i}" for i in range(5)]
    assert list(frame["extract_error"]) == [""] * 5
    assert err.strip().splitlines()[-1] == f"semex: all 5 rows extracted to {dst}"


def test_a_failed_row_exits_1_and_fills_the_error_column(run, server, tmp_path):
    texts = ["fine one", "broken [[fail=404]]", "fine two"]
    src = write_csv(tmp_path / "in.csv", texts)
    dst = tmp_path / "out.jsonl"
    code, out, err = run(src, "--col", "text", *OUTS, "--batch-size", "1",
                         "--max-retries", "0", "-o", dst)
    assert code == 1
    frame = pd.read_json(dst, lines=True, dtype=False)
    assert list(frame["sentiment"][[0, 2]]) == ["sentiment:fine one", "sentiment:fine two"]
    assert pd.isna(frame["sentiment"][1])
    assert list(frame["extract_error"][[0, 2]]) == ["", ""]
    assert "404" in frame["extract_error"][1]
    assert len(server.log()) == 3  # one request per row, no retries
    lines = err.strip().splitlines()
    assert "2 ok, 1 failed" in lines[0]
    assert lines[-1].startswith("semex: 1 row failed (first: row 1: HTTP 404")
    assert "Traceback" not in err


def test_python_dash_m_semex_in_a_subprocess(server, tmp_path):
    texts = ["alpha", "beta", "gamma"]
    src = write_csv(tmp_path / "in.csv", texts)
    dst = tmp_path / "out.csv"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(semex.__file__)))
    env = dict(os.environ, **{KEY_ENV: server.api_key})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "semex", "extract", str(src), "--col", "text", *OUTS,
         "-o", str(dst), "--api-base", server.base_url, "--api-key-env", KEY_ENV,
         "--model", "test-model"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "\r" not in proc.stderr  # stderr is not a terminal: no progress bar
    frame = pd.read_csv(dst, dtype=str, keep_default_na=False)
    assert list(frame["product"]) == [f"product:{t}" for t in texts]
    assert proc.stderr.strip().splitlines()[-1] == f"semex: all 3 rows extracted to {dst}"
    assert server.api_key not in proc.stdout + proc.stderr


def test_stdin_to_stdout(server, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, server.api_key)
    monkeypatch.setattr(sys, "stdin", io.StringIO("text\nfrom stdin\n"))
    code = cli.main(["extract", "-", "--col", "text", "--out", "topic", "--api-base",
                     server.base_url, "--api-key-env", KEY_ENV])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == ["text,topic,extract_error", "from stdin,topic:from stdin,"]


def _usage_cases(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["a", "b"])
    (tmp_path / "in.txt").write_text("text\na\n")
    (tmp_path / "in.json").write_text('[{"text": "a"}]')
    return {
        "missing input file": ([tmp_path / "nope.csv", "--col", "text", "--out", "x"],
                               "no such file"),
        "unknown extension": ([tmp_path / "in.txt", "--col", "text", "--out", "x"],
                              "unknown input format .txt"),
        ".json refused": ([tmp_path / "in.json", "--col", "text", "--out", "x"], ".jsonl"),
        "unknown output extension": ([src, "--col", "text", "--out", "x", "-o",
                                      tmp_path / "out.xlsx"], "unknown output format"),
        "missing --col column": ([src, "--col", "txt", "--out", "x"],
                                 "no column 'txt'; its columns: id, text"),
        "--out without a name": ([src, "--col", "text", "--out", "=positive/negative"],
                                 "needs a name"),
        "--out naming an input column": ([src, "--col", "text", "--out", "id"],
                                         "already has column(s) 'id'"),
        "bad flag": ([src, "--col", "text", "--out", "x", "--frobnicate"],
                     "unrecognized arguments: --frobnicate"),
        "bad number": ([src, "--col", "text", "--out", "x", "--batch-size", "0"],
                       "--batch-size: must be an integer >= 1"),
        "no --out": ([src, "--col", "text"], "required: --out"),
        "no --col": ([src, "--out", "x"], "required: --col"),
        "output folder missing": ([src, "--col", "text", "--out", "x", "-o",
                                   tmp_path / "no" / "out.csv"], "does not exist"),
    }


@pytest.mark.parametrize("case", ["missing input file", "unknown extension", ".json refused",
                                  "unknown output extension", "missing --col column",
                                  "--out without a name", "--out naming an input column",
                                  "bad flag", "bad number", "no --out", "no --col",
                                  "output folder missing"])
def test_usage_errors_exit_2_with_one_line(run, server, tmp_path, case):
    args, expected = _usage_cases(tmp_path)[case]
    code, out, err = run(*args)
    assert code == 2, err
    assert out == ""
    assert_one_error_line(err)
    assert expected in err
    assert server.log() == []  # nothing was sent


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert_one_error_line(err)


def test_help_documents_every_flag(capsys):
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "extract" in top and "--version" in top
    assert cli.main(["extract", "--help"]) == 0
    text = capsys.readouterr().out
    flags = ["--col", "--out", "--model", "--api-base", "--api-key-env", "--batch-size",
             "--concurrency", "--rpm", "--tpm", "--max-retries", "--timeout", "--quotes",
             "--structured-output", "--local", "-o", "--output", "--no-progress", "-v",
             "--verbose", "--max-tokens", "--input-price", "--output-price", "--provider"]
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["extract"]
    declared = [s for a in sub._actions for s in a.option_strings]
    assert set(flags) <= set(declared)
    for flag in declared:
        assert flag in text, flag
    assert "json_schema,json_object,none" in text
    assert "ps" in text and "shell history" in text  # why there is no --api-key flag


def test_the_key_never_appears_even_with_verbose(run, server, tmp_path):
    src = write_csv(tmp_path / "in.csv", ["fine", "broken [[fail=404]]"])
    code, out, err = run(src, "--col", "text", *OUTS, "-v", "--batch-size", "1",
                         "--max-retries", "0")
    assert code == 1
    assert "DEBUG" in err  # -v: the semex logger at DEBUG on stderr
    assert server.api_key not in out + err
    assert "<set>" in err  # the LM's repr says a key is set, never which
    semex_logger = logging.getLogger("semex")  # -v's handler and level are undone after
    assert not any(type(h) is logging.StreamHandler for h in semex_logger.handlers)
    assert semex_logger.level == logging.NOTSET


def test_a_rejected_key_is_one_line_and_not_shown(run, server, tmp_path, monkeypatch):
    src = write_csv(tmp_path / "in.csv", ["a", "b"])
    wrong = "sk-wrong-KEY-9876543210"
    monkeypatch.setenv("SEMEX_CLI_WRONG_KEY", wrong)
    code, out, err = run(src, "--col", "text", "--out", "x", "-v", "--api-base",
                         server.base_url, "--api-key-env", "SEMEX_CLI_WRONG_KEY", base=False)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("semex: error: ")
    assert "401" in err and "SEMEX_CLI_WRONG_KEY" in err
    assert wrong not in out + err and server.api_key not in out + err


def test_a_server_refusing_connections_is_one_line(run, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = write_csv(tmp_path / "in.csv", ["a", "b"])
    code, out, err = run(src, "--col", "text", "--out", "x", "--max-retries", "0",
                         "--api-base", f"http://127.0.0.1:{port}/v1", base=False)
    assert code == 1
    assert out == ""
    assert_one_error_line(err)
    assert f"cannot reach http://127.0.0.1:{port}/v1" in err


def test_ctrl_c_exits_130_with_one_line(run, tmp_path, monkeypatch):
    src = write_csv(tmp_path / "in.csv", ["a"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(semex.accessor.SemExtractAccessor, "__call__", interrupted)
    code, out, err = run(src, "--col", "text", "--out", "x")
    assert code == 130
    assert err == "semex: interrupted\n"


def test_an_empty_table_writes_the_columns(run, server, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("text\n")
    code, out, err = run(src, "--col", "text", "--out", "x")
    assert code == 0, err
    assert out.splitlines() == ["text,x,extract_error"]
    assert server.log() == []


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_provider_flag_extracts_through_the_native_api(server, monkeypatch, capsys, tmp_path,
                                                       provider):
    variable = "ANTHROPIC_API_KEY" if provider == "anthropic" else "GOOGLE_API_KEY"
    for name in ("ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, server.api_key)  # the provider's own variable, by default
    src = write_csv(tmp_path / "in.csv", ["first doc", "second doc"])
    dst = tmp_path / "out.csv"
    code = cli.main(["extract", str(src), "--col", "text", *OUTS, "-o", str(dst),
                     "--provider", provider, "--api-base", server._root, "--model", "m",
                     "--no-progress", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    got = pd.read_csv(dst)
    assert list(got["product"]) == ["product:first doc", "product:second doc"]
    log = server.log()
    assert log and all(r["dialect"] == provider for r in log)
    assert all(r["auth_header"] == ("x-api-key" if provider == "anthropic"
                                    else "x-goog-api-key") for r in log)
