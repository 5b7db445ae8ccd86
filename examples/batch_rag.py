"""Batch RAG with semex: ingest chunks into Qdrant, retrieve for many questions at once,
then answer them all concurrently.

    python examples/batch_rag.py [--index DIR] [--k 2]

Without OPENAI_API_KEY it runs on this machine: SmolLM2-135M embeds in-process
(semex._local.LocalEmbedder) and answers on llama.cpp's server (.ci/setup-llm.sh installs
both). With OPENAI_API_KEY (and optionally OPENAI_BASE_URL) it uses the provider's
text-embedding-3-small and gpt-4o-mini. Needs `pip install 'semex[qdrant]'`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import semex

HERE = os.path.dirname(os.path.abspath(__file__))

QUESTIONS = [
    "Which product started smoking?",
    "What is wrong with the hiking boots order?",
    "Who is happy with their laptop?",
    "Which device has connection problems?",
]

PROMPT = ("Answer the question from the support tickets below, in one sentence.\n\n"
          "Tickets:\n{context}\n\nQuestion: {question}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="Qdrant directory (default: a temporary one)")
    parser.add_argument("--k", type=int, default=2, help="chunks retrieved per question")
    args = parser.parse_args()

    with open(os.path.join(HERE, "tickets.jsonl"), encoding="utf-8") as f:
        chunks = [{"id": row["id"], "text": row["ticket"]} for row in map(json.loads, f)]

    with contextlib.ExitStack() as stack:
        if os.environ.get("OPENAI_API_KEY"):
            rm, lm = semex.EmbeddingModel(), semex.LM()
        else:
            from semex._local import LocalEmbedder, LocalServer

            rm = LocalEmbedder()
            server = stack.enter_context(LocalServer())
            lm = semex.LM("smollm2-135m", api_base=server.base_url, api_key="",
                          max_tokens=60, max_concurrency=4)
        index = args.index or stack.enter_context(tempfile.TemporaryDirectory())
        stack.callback(semex.retrieval.close_stores)  # before the directory goes

        # 1. Ingest: embedded a window at a time and upserted as each window arrives;
        #    run it again and the ids already stored are skipped.
        report = semex.ingest(chunks, index, model=rm, progress=False)
        print(f"ingested {report.upserted}, already there {report.skipped}, "
              f"failed {report.failed}", file=sys.stderr)

        # 2. Retrieve for every question at once: one embedding call, one batch search.
        hits = semex.search(QUESTIONS, index, K=args.k, model=rm)

        # 3. Fill the prompts and answer them concurrently.
        prompts = [PROMPT.format(question=q, context="\n".join(f"- {h.payload['text']}"
                                                                for h in found))
                   for q, found in zip(QUESTIONS, hits)]
        answers = semex.llm_batch(prompts, model=lm, max_concurrent=8)
        for question, found, answer in zip(QUESTIONS, hits, answers):
            print(f"Q: {question}\n   retrieved ids {[h.id for h in found]}\n   A: {answer}")
        lm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
