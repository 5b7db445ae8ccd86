/* nativejson.h — reads the answers of the native provider APIs without Python: Anthropic's
 * Messages API and Gemini's generateContent, into the same sx_chat a chat completion fills
 * (chatjson.h), so everything above the reader is shared.
 *
 * The contract is chatjson's: SX_CHAT_PARSED with exactly the fields Python's reader of the
 * same dialect (python/semex/providers/) produces from json.loads, or SX_CHAT_FALLBACK and
 * the body untouched for Python to read (and report). The whole body is validated (RFC 8259,
 * strict UTF-8); duplicate or escaped keys on the extracted path, escaped block types, more
 * than SX_NATIVE_MAX_PARTS text pieces and nesting deeper than SX_CHAT_MAX_DEPTH fall back.
 *
 * Anthropic (POST /v1/messages):
 *   content      array of blocks (required: absent or not an array falls back). The answer
 *                is the `input` of the first block of type "tool_use" as its raw JSON text
 *                (structured output through a forced tool), else the concatenated `text` of
 *                the blocks of type "text" (a text block without a string `text` falls back),
 *                else null. Other block types (thinking, ...) are skipped.
 *   stop_reason  string, null or absent -> finish
 *   usage        prompt = input_tokens + cache_creation_input_tokens +
 *                cache_read_input_tokens, completion = output_tokens, total = their sum
 * Gemini (POST /v1beta/models/{model}:generateContent):
 *   candidates[0]   required (absent or empty falls back: a prompt blocked before any
 *                   candidate is Python's to report)
 *     .content.parts[*].text   concatenated, parts with "thought": true left out; null when
 *                   the candidate has no content or no text part (a blocked candidate)
 *     .finishReason  string, null or absent -> finish
 *   usageMetadata   prompt = promptTokenCount, completion = candidatesTokenCount +
 *                   thoughtsTokenCount, total = totalTokenCount
 * Token counts are non-negative integers, null or absent (0); anything else falls back. */
#ifndef SEMEX_NATIVEJSON_H
#define SEMEX_NATIVEJSON_H

#include <stddef.h>

#include "chatjson.h"

#define SX_NATIVE_MAX_PARTS 32

/* The wire format of a batch's answers (sx_request_opts.parse_chat). */
enum {
    SX_DIALECT_NONE = 0,       /* not read by the engine */
    SX_DIALECT_OPENAI = 1,     /* chat completions (chatjson.h), event streams included */
    SX_DIALECT_ANTHROPIC = 2,  /* Anthropic Messages */
    SX_DIALECT_GEMINI = 3,     /* Gemini generateContent */
};

/* Thread-safe, no allocation; strings decoded in place on success (chatjson.h). */
int sx_anthropic_parse(char *buf, size_t len, sx_chat *out);
int sx_gemini_parse(char *buf, size_t len, sx_chat *out);

/* The reader of `dialect` (SX_DIALECT_OPENAI..GEMINI); any other value: SX_CHAT_FALLBACK. */
int sx_answer_parse(int dialect, char *buf, size_t len, sx_chat *out);

#endif
