/* results.h — the ordered result buffer.
 *
 * A batch is the unit Python submits: N requests that share a URL, headers and options, and
 * N slots that receive their outcomes. Slot i always belongs to request i, so results come
 * back in input order however the network reorders them. Each slot is filled exactly once:
 * ok, failed (with a reason), or cancelled. Nothing is dropped, nothing is filled twice.
 *
 * Completion is signalled two ways: a condition variable for synchronous waiters and, once
 * Python asked for it (sx_batch_fileno), an eventfd that an asyncio loop watches. Wake-ups
 * are coalesced: the eventfd is written at most once until the reader clears it.
 *
 * Locking: every field below marked [E] is guarded by the owning engine's lock (engine.h);
 * the engine is the only writer of slot outcomes. Request data ([R]) is immutable after
 * sx_batch_new and read by workers without the lock. */
#ifndef SEMEX_RESULTS_H
#define SEMEX_RESULTS_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <curl/curl.h>

#include "h1.h"

#include "chatjson.h"

typedef enum sx_state {
    SX_PENDING = 0,
    SX_OK = 1,
    SX_FAILED = 2,
    SX_CANCELLED = 3,
} sx_state;

/* Why a slot failed; Python maps these to exception types. */
typedef enum sx_error_kind {
    SX_ERR_NONE = 0,
    SX_ERR_HTTP = 1,        /* a status that is not retried (other 4xx), or retries ran out */
    SX_ERR_TIMEOUT = 2,     /* the last attempt timed out */
    SX_ERR_CONNECTION = 3,  /* connect/send/receive failure, dropped or truncated response */
    SX_ERR_AUTH = 4,        /* 401/403: the whole batch stops */
    SX_ERR_QUOTA = 5,       /* 429 insufficient_quota: the whole batch stops */
    SX_ERR_BODY_CAP = 6,    /* response larger than max_body */
    SX_ERR_ABORTED = 7,     /* not sent or stopped because another request hit AUTH/QUOTA */
    SX_ERR_TRANSPORT = 8,   /* a local error that retrying cannot fix (bad URL, TLS verify) */
    SX_ERR_CANCELLED = 9,   /* cancelled by the caller or by engine shutdown */
} sx_error_kind;

/* Where a pending slot is; exactly one place at a time. [E] */
typedef enum sx_where {
    SX_AT_QUEUE = 0,
    SX_AT_RETRY = 1,
    SX_AT_WORKER = 2,
    SX_AT_DONE = 3,
} sx_where;

typedef struct sx_request_opts {
    double timeout;          /* seconds per attempt (whole transfer) */
    double connect_timeout;  /* seconds */
    int max_retries;         /* retries after the first attempt */
    size_t max_body;         /* response body cap in bytes */
    int verify_tls;          /* 0 only when the user turned verification off */
    double backoff_base;     /* seconds; first retry waits up to this */
    double backoff_cap;      /* seconds; no single backoff waits longer */
    double max_hint_wait;    /* seconds; a server hint asking for longer is ignored (hints.h) */
    int notify_each;         /* 1: wake the eventfd on every completion (progress bars) */
    int max_in_flight;       /* this batch's own concurrency cap; 0: only the engine's */
    int parse_chat;          /* SX_DIALECT_* (nativejson.h): workers read successful answers
                              * in that provider's format; with SX_DIALECT_OPENAI they also
                              * read event-stream answers as they arrive (sse.h) */
    const char *ca_file;     /* CA bundle to verify the server with (CURLOPT_CAINFO); NULL:
                              * libcurl's default. sx_batch_new copies it; the batch owns it */
    const char *ca_path;     /* directory of hashed CA certificates (CURLOPT_CAPATH); same */
    double total_timeout;    /* seconds for all attempts of one request, backoffs included
                              * (waits ordered by a 429 excepted); 0: no such bound */
    int stream_deltas;       /* 1: workers queue each streamed answer's new text for Python
                              * as it arrives (sx_batch_push_delta) */
} sx_request_opts;

typedef struct sx_batch sx_batch;

/* Where the requests sent to one deployment go (an engine with several deployments,
 * sched.h): that deployment's URL and headers (its own API key). [R] */
typedef struct sx_target {
    char *url;
    int is_https;
    struct curl_slist *headers;  /* "Expect:" first, then the caller's */
    sx_h1_route *h1;             /* the engine's own HTTP/1.1 route (h1.h); NULL: libcurl */
} sx_target;

/* A concurrency cap, shared by every batch of one call: Python splits a long call into
 * windows (batches) and keeps two submitted, and max_concurrent must bound the call, not
 * each window. in_flight is [E]; refs is atomic because a batch takes its reference on the
 * Python thread without the engine lock and drops it wherever the batch is freed. */
typedef struct sx_cap {
    size_t in_flight;
    int max;
    atomic_int refs;
} sx_cap;

typedef struct sx_slot {
    /* [R] the request */
    const char *body;        /* points into the batch arena; NULL means GET */
    size_t body_len;
    double tokens;           /* estimated token cost for the tokens/min bucket */
    sx_batch *batch;
    uint32_t index;

    /* [E] scheduling */
    double due;              /* when a retry may go out */
    size_t heap_pos;         /* position in the retry heap */
    uint64_t admit_seq;      /* engine admission number of the current attempt */
    uint8_t where;           /* sx_where */
    uint8_t settled;         /* its token reservation was settled against its usage */
    uint16_t deploy;         /* deployment of the current (or last) attempt (sched.h) */

    /* [E] outcome */
    uint8_t state;           /* sx_state */
    uint8_t error_kind;      /* sx_error_kind */
    int http_status;         /* last HTTP status seen, 0 if none */
    int attempts;
    double first_sent;       /* when the first attempt was admitted */
    double deadline;         /* first_sent + total_timeout, moved later by 429 waits; no
                              * attempt runs or is scheduled past it. 0: none */
    double latency;          /* first admission to final outcome, seconds */
    char *response;          /* final response body (ok, or the failing response) */
    size_t response_len;
    char *error;             /* failure reason, NUL-terminated; never contains headers */
    sx_chat chat;            /* with opts.parse_chat and state OK: the answer's fields, read
                              * by a worker (chatjson.h); spans point into `response` */
} sx_slot;

struct sx_batch {
    /* [R] shared request data */
    char *url;
    int is_https;
    struct curl_slist *headers;
    sx_h1_route *h1;          /* the engine's own HTTP/1.1 route (h1.h); NULL: libcurl */
    sx_request_opts opts;
    sx_cap *cap;              /* NULL: only the engine's cap; set before submission */
    sx_target *targets;       /* one per deployment of the engine (sx_batch_add_target);
                               * none: every request goes to url with headers */
    size_t ntargets;
    char *arena;              /* all request bodies, back to back */
    sx_slot *slots;
    size_t n;

    /* [E] bookkeeping */
    int refs;                 /* Python's handle + the engine while not done */
    size_t done, ok, failed, cancelled;
    size_t in_flight;         /* slots at a worker right now */
    size_t next_unsent;       /* first slot never admitted; slots before it have left the queue */
    struct sx_batch *q_next;  /* the scheduler's queue of batches with unsent slots */
    int in_queue;
    uint64_t retries, http_429;
    int stopped;              /* cancelled or aborted: pending slots end as stop_state */
    uint8_t stop_state, stop_kind;
    char *stop_reason;
    pthread_cond_t cond;      /* signalled when done == n */
    /* Streamed text not yet taken by Python (opts.stream_deltas): records of a
     * sx_delta_head and then `len` bytes of UTF-8, in the order workers pushed them. */
    char *deltas;
    size_t deltas_len, deltas_cap;
    int efd;                  /* eventfd, -1 until Python asks for it */
    int notify_pending;       /* eventfd written and not yet cleared */
    struct sx_batch *prev, *next;  /* the engine's list of live batches */
};

/* Build a batch from request specs. The bodies are copied into one arena. Returns NULL on
 * allocation failure. `tokens` may be NULL (cost 1 each). The batch starts with refs == 1. */
sx_batch *sx_batch_new(const char *url, const char *const *headers, size_t nheaders,
                       const char *const *bodies, const size_t *lens, const double *tokens,
                       size_t n, const sx_request_opts *opts);

/* Before submission: count b's requests against `with`'s cap instead of its own (no-op if
 * `with` has none). */
void sx_batch_share_cap(sx_batch *b, sx_batch *with);

/* Before submission: where requests sent to the next deployment go (call once per
 * deployment of the engine, in its order). Returns 0, or -1 when out of memory. */
int sx_batch_add_target(sx_batch *b, const char *url, const char *const *headers,
                        size_t nheaders);

/* Free everything; only when refs reached 0. */
void sx_batch_free(sx_batch *b);

/* Record slot's final outcome. [E held] `response` ownership passes to the slot; `error` is
 * copied. Returns 1 if this completed the batch. Must be called exactly once per slot. */
int sx_batch_finish_slot(sx_slot *s, sx_state state, sx_error_kind kind, int http_status,
                         char *response, size_t response_len, const char *error, double now);

/* Wake the batch's waiters: the condition variable when done, the eventfd (coalesced) when
 * done or when notify_each is set. [E held] */
void sx_batch_notify(sx_batch *b);

/* One record of a batch's delta queue. len < 0 marks a restart: the slot's attempt that
 * streamed the earlier text failed, and what was queued for it before no longer counts. */
typedef struct sx_delta_head {
    uint32_t index;
    int32_t len;
} sx_delta_head;

/* Queue `len` bytes of text streamed for slot `index`, or (text NULL) a restart marker, and
 * wake the eventfd (coalesced). [E held] Returns 0, or -1 when out of memory (the text is
 * lost to the callback; the slot's final answer is not affected). */
int sx_batch_push_delta(sx_batch *b, uint32_t index, const char *text, size_t len);

/* Hand the queued records to the caller (a malloc'd buffer, *len bytes; NULL when empty) and
 * empty the queue. [E held] */
char *sx_batch_take_deltas(sx_batch *b, size_t *len);

/* Create the eventfd on first use. If the batch already has news, the fd starts readable.
 * [E held] Returns the fd or -1 with errno set. */
int sx_batch_fileno(sx_batch *b);

/* Read and reset the eventfd. [E held] */
void sx_batch_clear_notify(sx_batch *b);

#endif
