/* sse.h — reads a streamed chat answer (Content-Type: text/event-stream) into the shape of
 * a whole one.
 *
 * With "stream": true an OpenAI-compatible server answers with server-sent events, one
 * chat.completion.chunk per `data:` line, ended by `data: [DONE]`. An I/O worker feeds the
 * response body to this reader as it arrives; the reader splits it into events and reads
 * each chunk with chatjson (sx_chat_parse_chunk), so the finished answer is what a
 * non-streamed call gives: the content (every choices[0].delta.content, concatenated), the
 * last finish_reason and the last usage (sent in a final chunk when the request asked for
 * stream_options.include_usage). Like chatjson it is a fast path: whatever it is not sure to
 * reproduce exactly (a chunk chatjson leaves to json.loads, an allocation failure) makes the
 * whole answer SX_SSE_FALLBACK, and Python reads the raw body with the same rules.
 *
 * The event-stream rules it follows (WHATWG HTML, "server-sent events"): lines end in
 * \r\n, \n or \r; a blank line dispatches the event; `:` starts a comment (keep-alives);
 * `data:` lines of one event join with \n; one space after the colon is dropped; fields
 * other than data and event are ignored, as is a leading UTF-8 BOM. An event is read as a
 * chunk whatever its name, except `event: error`, whose data is the error. Events with empty
 * (or all-whitespace) data are ignored, and so is everything after [DONE] or an error. At
 * the end of the body a last line without its line break and an event without its blank
 * line still count (servers that close right after [DONE]) when their data reads whole;
 * if it does not (the body was cut inside it), that last event is ignored.
 *
 * The answer is complete when [DONE] arrived, or when the body ended after a chunk that
 * carried a finish_reason (a server that omits [DONE]). A body that ends otherwise was cut
 * (SX_SSE_CUT): the worker treats it as a connection error and retries it. An error object
 * inside the stream (a chunk with a top-level "error", or an `error` event) ends the answer
 * as SX_SSE_ERROR with that event's data as the error's body.
 *
 * The reader keeps offsets into the caller's raw body, never pointers, so the caller may
 * grow (realloc) it between calls; the raw bytes are never modified (each event's data is
 * copied before chatjson decodes it). Not thread-safe: one reader per transfer. */
#ifndef SEMEX_SSE_H
#define SEMEX_SSE_H

#include <stddef.h>
#include <stdint.h>

#include "chatjson.h"

typedef enum sx_sse_verdict {
    SX_SSE_COMPLETE = 0,   /* the answer: sx_sse_take_answer */
    SX_SSE_FALLBACK = 1,   /* let Python read the raw body */
    SX_SSE_CUT = 2,        /* ended before [DONE] or a finish_reason: retry */
    SX_SSE_ERROR = 3,      /* an error inside the stream: sx_sse_take_error */
} sx_sse_verdict;

typedef struct sx_sse {
    size_t line;            /* raw offset where the current (unfinished) line starts */
    size_t seek;            /* raw offset up to which that line was searched for its end */
    uint8_t started;        /* a leading BOM was looked for */
    uint8_t done;           /* data: [DONE] arrived */
    uint8_t fallback;       /* an event was left to Python; content stops growing */
    uint8_t error;          /* an error arrived; error_body holds its data */
    uint8_t content_seen;   /* a chunk had string content (else content is null) */
    uint8_t finish_seen;    /* a chunk had a string finish_reason */
    uint8_t event_error;    /* the event being assembled is named "error" */
    uint8_t has_data;       /* the event being assembled has a data line */
    uint8_t at_tail;        /* reading what follows the body's last blank line */
    size_t events;          /* events dispatched with data, [DONE] included */
    char *data;             /* the event being assembled: its data lines joined by \n */
    size_t data_len, data_cap;
    char *content;          /* the answer's text so far (decoded UTF-8) */
    size_t content_len, content_cap;
    char *finish;           /* the last finish_reason */
    size_t finish_len, finish_cap;
    int64_t prompt_tokens, completion_tokens, total_tokens;
    int64_t error_code;     /* error.code when a plain integer, else -1 */
    char *error_body;       /* the error event's data, as sent */
    size_t error_len;
} sx_sse;

/* A reader with nothing read and no memory held. */
void sx_sse_init(sx_sse *r);

/* Free what the reader holds and make it new again (sx_sse_init). */
void sx_sse_reset(sx_sse *r);

/* Read the complete lines of raw[0..len) not read yet (raw is the whole body so far;
 * raw[0..len) of an earlier call must be unchanged). An unfinished line waits for more. */
void sx_sse_feed(sx_sse *r, const char *raw, size_t len);

/* The body ended: read what is left of raw[0..len) (the last line and event even without
 * their line breaks) and say what the stream was. */
sx_sse_verdict sx_sse_finish(sx_sse *r, const char *raw, size_t len);

/* After SX_SSE_COMPLETE: the answer as one malloc'd buffer (content, then finish_reason)
 * and *chat's spans into it (parsed = 1), *len its size. Ownership passes to the caller; the
 * reader keeps nothing of it. NULL if out of memory. */
char *sx_sse_take_answer(sx_sse *r, sx_chat *chat, size_t *len);

/* After SX_SSE_ERROR: the error event's data (malloc'd, ownership passes) and its length. */
char *sx_sse_take_error(sx_sse *r, size_t *len);

/* The HTTP status an error inside the stream stands for: its error.code when that is a
 * status (400..599), else 500 (servers send mid-stream errors for server-side failures). */
int sx_sse_error_status(const sx_sse *r);

#endif
