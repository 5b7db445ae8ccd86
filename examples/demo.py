"""semex demo: structured fields from support tickets with a real LLM.

    make demo        (sets everything up, then runs this file)

Without OPENAI_API_KEY it starts a real local model (SmolLM2-135M-Instruct on llama.cpp's
OpenAI-compatible server, CPU only) and stops it afterwards. With OPENAI_API_KEY (and
optionally OPENAI_BASE_URL, SEMEX_MODEL) it uses that provider instead.
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import os
import sys
import time

import pandas as pd
from pydantic import BaseModel, Field

import semex

HERE = os.path.dirname(os.path.abspath(__file__))


class Sentiment(str, enum.Enum):
    positive = "positive"
    negative = "negative"
    neutral = "neutral"


class Ticket(BaseModel):
    product: str = Field(description="the product's name as written in the ticket")
    issue: str = Field(description="the customer's problem or request in a few words")
    sentiment: Sentiment = Field(description="the customer's mood")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "tickets.jsonl"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N tickets")
    args = parser.parse_args()

    df = pd.read_json(args.data, lines=True)
    if args.limit:
        df = df.head(args.limit)

    with contextlib.ExitStack() as stack:
        if os.environ.get("OPENAI_API_KEY"):
            lm = semex.LM(max_concurrency=32)
            batch = True
            print(f"provider: {lm.api_base}, model {lm.model}")
        else:
            started = time.monotonic()
            # a 135M-parameter model: one ticket per prompt, JSON constrained by the schema
            lm = stack.enter_context(semex.LM.local(max_tokens=96, timeout=120))
            server = lm.local_server
            print(f"local model: {os.path.basename(server.model_path)} on {server.base_url} "
                  f"(started in {time.monotonic() - started:.1f} s)")
            print("This is SmolLM2-135M, a tiny model that runs on any CPU: the demo shows "
                  "semex's mechanics\n(typed rows, order, usage), and many of its answers "
                  "will be wrong. For real answers run it\nagainst a provider: "
                  "OPENAI_API_KEY=sk-... make demo (optionally OPENAI_BASE_URL, "
                  "SEMEX_MODEL).\n")
            batch = False
        started = time.monotonic()
        result = df.sem_extract(["ticket"], Ticket, model=lm, use_batch_processing=batch,
                                batch_size=6, progress_bar_desc="Extracting tickets")
        wall = time.monotonic() - started

    shown = result.assign(ticket=result["ticket"].str.slice(0, 48) + "…")
    with pd.option_context("display.max_colwidth", 40, "display.width", 160):
        print(shown.drop(columns=["id"]).to_string(index=False))
    failed = int(result["extract_error"].notna().sum())
    print(f"\n{len(result)} tickets: {len(result) - failed} extracted, {failed} failed, "
          f"in {wall:.1f} s")
    lm.print_total_usage()
    return 1 if failed == len(result) else 0


if __name__ == "__main__":
    sys.exit(main())
