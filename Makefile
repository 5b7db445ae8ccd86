# Developer entry points. `make test` is the README's test command and what CI runs first.
SHELL := /bin/bash
VENV ?= .venv
ASAN_VENV ?= .venv-asan
PYTEST_ARGS ?=

.PHONY: test test-asan test-c tsan fuzz demo clean

# The main job: a real LLM (local SmolLM2 on llama.cpp, or your provider when OPENAI_API_KEY
# is set) extracts fields from examples/tickets.jsonl. Later runs reuse the build.
demo:
	SEMEX_WERROR=1 .ci/setup.sh $(VENV)
	if [ -z "$${OPENAI_API_KEY:-}" ]; then .ci/setup-llm.sh $(VENV); fi
	$(VENV)/bin/python examples/demo.py

test:
	SEMEX_WERROR=1 .ci/setup.sh $(VENV)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The same suite against an AddressSanitizer + UBSan build of the extension.
test-asan:
	SEMEX_SANITIZE=1 SEMEX_WERROR=1 .ci/setup.sh $(ASAN_VENV)
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	$(ASAN_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# The engine's standalone C tests (no Python), plain and under ThreadSanitizer.
test-c:
	$(MAKE) -C tests/c test

tsan:
	$(MAKE) -C tests/c tsan

# libFuzzer runs of the header-hint and chat-answer parsers (FUZZ_TIME seconds each, default
# 60), then chatjson checked against json.loads over the grown corpus. Needs clang.
FUZZ_TIME ?= 60
fuzz:
	command -v clang >/dev/null || SEMEX_WERROR=1 .ci/setup.sh $(VENV)
	$(MAKE) -C tests/fuzz run FUZZ_TIME=$(FUZZ_TIME)

clean:
	rm -rf build $(VENV) $(ASAN_VENV) python/semex/*.so
	$(MAKE) -C tests/c clean || true
	$(MAKE) -C tests/fuzz clean || true
