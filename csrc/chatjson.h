/* chatjson.h — reads an OpenAI chat-completion answer without Python.
 *
 * Parsing every answer with json.loads on the Python thread was the largest share of
 * llm_batch's per-request CPU (~11 of ~25 µs) and it ran serially after the last response
 * of a window arrived. I/O workers call sx_chat_parse as each answer lands, off the GIL and
 * in parallel with Python; Python then only turns three spans and three numbers into
 * objects.
 *
 * This is a fast path, not a JSON library: it answers either "parsed, and exactly what
 * json.loads would have produced for these fields" or "not handled" (SX_CHAT_FALLBACK), and
 * then Python's json.loads decides (and raises its own errors). It handles the whole JSON
 * grammar (RFC 8259: validates every byte, strict UTF-8, no control characters in strings,
 * nothing after the value) and extracts:
 *   choices[0].message.content   string or null (required: its absence is a fallback)
 *   choices[0].finish_reason     string, null or absent
 *   usage.prompt_tokens / completion_tokens / total_tokens   non-negative integers, null
 *                                or absent (0)
 * Anything it is not sure to reproduce exactly falls back: NaN/Infinity literals, a
 * duplicate key on the extracted path, an escaped key on that path, a lone \uD800-style
 * surrogate in an extracted string, usage numbers that are not plain integers, integers of
 * more than SX_JSON_INT_DIGITS_SAFE (jsonscan.h) digits anywhere in the body, nesting deeper
 * than SX_CHAT_MAX_DEPTH, bodies over 4 GiB.
 *
 * On success the extracted strings are decoded in place (an escape never decodes longer
 * than it is written), so the buffer then no longer holds the original JSON. */
#ifndef SEMEX_CHATJSON_H
#define SEMEX_CHATJSON_H

#include <stddef.h>
#include <stdint.h>

#define SX_CHAT_MAX_DEPTH 64

enum {
    SX_CHAT_FALLBACK = 0,  /* not handled: let json.loads read the body */
    SX_CHAT_PARSED = 1,
};

/* Offsets and lengths are into the (rewritten) response buffer. */
typedef struct sx_chat {
    uint8_t parsed;          /* SX_CHAT_PARSED or SX_CHAT_FALLBACK */
    uint8_t content_null;    /* content was JSON null */
    uint8_t finish_null;     /* finish_reason null or absent */
    uint32_t content_off, content_len;  /* UTF-8, decoded */
    uint32_t finish_off, finish_len;
    int64_t prompt_tokens, completion_tokens, total_tokens;  /* 0 when absent or null */
} sx_chat;

/* Scans buf[0..len). Returns SX_CHAT_PARSED (and fills *out, decoding the two strings in
 * place) or SX_CHAT_FALLBACK (buf untouched, *out->parsed = 0). Thread-safe; no allocation. */
int sx_chat_parse(char *buf, size_t len, sx_chat *out);

/* One chat.completion.chunk of a streamed answer (the data of one server-sent event, see
 * sse.h), read under the same rules. Every field is optional in a chunk; extracted:
 *   choices[0].delta.content     a string, or null/absent (has_content = 0)
 *   choices[0].finish_reason     a string, or null/absent (has_finish = 0)
 *   usage.*_tokens               as above; has_usage when usage is an object
 *   error                        present and not null: has error = 1 and error_code is
 *                                error.code when that is a plain non-negative integer
 *                                (else -1); nothing else is extracted or decoded then
 * Also falls back when choices has more than one element or choices[0].index is not 0
 * (n > 1 streams interleave choices: json.loads' reader sorts them out). */
typedef struct sx_chat_chunk {
    uint8_t has_content, has_finish, has_usage, error;
    uint32_t content_off, content_len;  /* UTF-8, decoded in place */
    uint32_t finish_off, finish_len;
    int64_t prompt_tokens, completion_tokens, total_tokens;
    int64_t error_code;
} sx_chat_chunk;

/* Returns SX_CHAT_PARSED (strings decoded in place unless error) or SX_CHAT_FALLBACK (buf
 * untouched). Thread-safe; no allocation. */
int sx_chat_parse_chunk(char *buf, size_t len, sx_chat_chunk *out);

#endif
