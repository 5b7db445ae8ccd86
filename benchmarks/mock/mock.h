/*
 * mock.h - the shared types and helpers of benchmarks/build/mockserver, a fast
 * OpenAI-compatible mock LLM provider for semex benchmarks.
 *
 * libc only; built by `make -C benchmarks` from these files (no other dependency):
 *   mock.h     config, stats counters, buf_t and other small inline helpers, conn_t,
 *              worker_t, req_t, scan_t, and every function shared between the files
 *   main.c     options (--help text), listeners, worker threads, shutdown
 *   http.c     connections, the deadline heap, HTTP/1.1 request heads, the response
 *              queue (put_response, enqueue, respond_now), the epoll worker loop, accept
 *   routes.c   the route table and handle_request (limits, faults, latency), and the
 *              chat / stream / embeddings / _stats builders
 *   limits.c   --rpm/--tpm token buckets and their x-ratelimit-* headers, the bare-429
 *              limiter, the /_timeline counts
 *   json.c     JSON scanning on offsets into a body (scan_body, obj_get, json_unescape...)
 *   fill.c     response_format answers: a JSON object shaped by the request's schema
 *   batches.c  the Batch API: /v1/files and /v1/batches on a fast-forward clock
 * A new route: a handler in routes.c (or a new file declared here) and a line in `routes[]`.
 *
 * Design
 *   - N worker threads (default 1), each with its own epoll instance and its own
 *     SO_REUSEPORT listening socket on 127.0.0.1 (the kernel spreads connections).
 *   - Edge-triggered, non-blocking sockets, HTTP/1.1 keep-alive. Requests are parsed
 *     from whatever bytes have arrived: several requests in one read are handled in
 *     order, a partial request waits for more bytes. Bodies use Content-Length;
 *     chunked request bodies are answered with 411 and the connection is closed.
 *   - Artificial latency: a response is built when its request is parsed, parked in
 *     the connection's output buffer and released when its deadline passes. Deadlines
 *     live in a per-thread binary min-heap; epoll_wait's timeout is the earliest one.
 *     While a response is pending, later pipelined requests on that connection wait
 *     (HTTP/1.1 answers must come back in order). A disconnect while pending removes
 *     the connection from the heap and frees it.
 *   - Token buckets for --rpm/--tpm, seeded fault injection, GET /_stats.
 *   - A "bare 429" limiter (--bare-rate/--bare-burst): a token bucket that answers 429 with
 *     no Retry-After and no x-ratelimit-* headers, as an nginx limit_req or an API gateway
 *     does; --bare-halve-at/--bare-restore-at halve its rate mid-run and restore it.
 *     GET /_timeline gives the 200s and 429s per 100 ms since the first request.
 *   - Chat answers echo the last "content" string ("echo: <it>"), except for requests with
 *     response_format json_schema or json_object: those get a deterministic JSON object
 *     shaped by the schema, so extraction clients can check every value (rules in
 *     usage() / --help). It works on offsets into the request body, with the worker's
 *     reused scratch buffers (no allocation per request once they have grown); depth,
 *     $ref hops and answer size are bounded, and anything unsupported gets the echo.
 *   - "stream": true in a chat request: the same answer as server-sent events
 *     (text/event-stream), its content in chat.completion.chunk deltas of about 4 bytes
 *     (never inside an escape or a UTF-8 sequence), a finish_reason chunk, a usage chunk when
 *     "include_usage": true, then data: [DONE]. The whole stream is sent at the deadline
 *     with a Content-Length (it measures the client's reading, not the network's pacing).
 *
 * Output: "PORT <n>" on stdout once listening. Exit: SIGTERM/SIGINT, or EOF on stdin
 * with --stdin-watch.
 */
#ifndef SEMEX_MOCK_H
#define SEMEX_MOCK_H

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADER_BYTES (64u * 1024u)
#define MAX_BODY_BYTES (64u * 1024u * 1024u)
#define MAX_INBUF ((size_t)MAX_HEADER_BYTES + MAX_BODY_BYTES + 65536u)
#define SCRATCH_SIZE (256u * 1024u)
#define MAX_EVENTS 1024
#define EMBED_DIM 8        /* default; --embed-dim and a request's "dimensions" change it */
#define MAX_EMBED_DIM 65536
#define MAX_EMBED_INPUTS 2048
#define HEAP_NONE SIZE_MAX
#define NOFILE_WANT 65536

/* ------------------------------------------------------------------ config */

typedef struct {
    char host[64];
    int port;
    int threads;
    double latency_ms, jitter_ms;
    double rpm, tpm;
    int tpm_usage;                           /* --tpm counts answers' usage, not body/4 */
    double embed_tpm;                        /* embeddings' own tokens/min; 0: share --tpm */
    double fail_rate, drop_rate, truncate_rate, stall_rate;
    double stall_timeout_ms;
    uint64_t seed;
    int stdin_watch;
    int embed_dim;
    double bare_rate, bare_burst;            /* requests/s, bucket size; 0: off */
    double bare_halve_at, bare_restore_at;   /* seconds after the first request; 0: never */
    double batch_seconds;                    /* a batch's life, created to completed */
    int batch_error_every, batch_transient_every, batch_fail, batch_max_requests;
    double batch_expire_at;                  /* fraction of lines done when it expires */
} cfg_t;

extern cfg_t cfg;

extern uint64_t g_created;          /* unix time at start: "created" of every completion */

/* ------------------------------------------------------------------- stats */

extern _Atomic uint64_t st_requests, st_200, st_429, st_faults, st_fail, st_drop,
    st_truncate, st_stall, st_other;
extern _Atomic int64_t st_open, st_max_open;
/* usage tokens (prompt + completion) of the 200 answers: chat routes, embeddings routes */
extern _Atomic uint64_t st_usage_tokens, st_embed_usage_tokens;

#define INC(x) atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)
#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

/* ------------------------------------------------------------------ buffers */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

_Noreturn void die_oom(void);

static inline void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t nc = b->cap ? b->cap : 512;
    while (nc < b->len + extra) nc *= 2;
    char *np = realloc(b->p, nc);
    if (!np) die_oom();
    b->p = np;
    b->cap = nc;
}

static inline void buf_put(buf_t *b, const void *s, size_t n) {
    if (!n) return;
    buf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static inline void buf_puts(buf_t *b, const char *s) { buf_put(b, s, strlen(s)); }

/* v in decimal, written at the end of tmp; returns where it starts. */
static inline const char *u64_text(char tmp[24], uint64_t v, size_t *len) {
    int i = 24;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    *len = (size_t)(24 - i);
    return tmp + i;
}

static inline void buf_putu(buf_t *b, uint64_t v) {
    char tmp[24];
    size_t n;
    const char *text = u64_text(tmp, v, &n);
    buf_put(b, text, n);
}

static inline void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* -------------------------------------------------------------- time, prng */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

typedef struct {
    uint64_t s[4];
} rng_t;

static inline void rng_seed(rng_t *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static inline uint64_t rng_next(rng_t *r) { /* xoshiro256** */
    uint64_t *s = r->s;
    uint64_t out = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return out;
}

static inline double rng_unit(rng_t *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

/* ceil for non-negative values, without libm */
static inline uint64_t ceil_u64(double x) {
    if (!(x > 0)) return 0;
    uint64_t t = (uint64_t)x;
    return (double)t < x ? t + 1 : t;
}

static inline uint64_t fnv1a(const char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ------------------------------------------------------- connections, heap */

enum { P_SEND, P_SEND_CLOSE, P_STALL };      /* what a queued response does when due */
enum { CLOSE_NO, CLOSE_ABORT, CLOSE_GRACEFUL };
#define MAX_QUEUED 64                             /* pipelined responses waiting per conn */

/* A response parked in conn->out (after out_ready), released when its deadline passes. */
typedef struct {
    size_t len;
    uint64_t deadline;
    int status; /* for stats; 0 = not counted */
    int kind;   /* P_* */
} pend_t;

typedef struct conn {
    int fd;
    int want_close;       /* CLOSE_*: close at the end of the current event */
    int closing;          /* a closing response was released: close once flushed */
    int stop_parse;       /* a closing/stalling response is queued: parse no more */
    int continue_sent;    /* "100 Continue" sent for the request being received */
    buf_t in;             /* unparsed bytes */
    buf_t out;            /* [out_off, out_ready) may be written; the rest is queued */
    size_t out_off, out_ready;
    pend_t *q;            /* queued responses, in order: q[qhead..qlen) */
    unsigned qhead, qlen, qcap;
    uint64_t deadline;    /* of q[qhead], the heap key */
    size_t heap_idx;
    struct conn *prev, *next;
} conn_t;

typedef struct worker {
    int idx;
    int epfd, lfd, evfd, reserve_fd;
    pthread_t th;
    conn_t **heap;
    size_t heap_len, heap_cap;
    conn_t *conns;        /* all open connections (for shutdown) */
    char *scratch;
    buf_t body;           /* scratch for building response bodies */
    buf_t hdrs;           /* scratch for extra headers */
    buf_t doc;            /* scratch: the unescaped user message (structured answers) */
    buf_t ans;            /* scratch: a structured answer's JSON text */
    buf_t text;           /* scratch: a streamed answer's escaped content */
    rng_t rng_fault, rng_jitter;
    uint64_t usage_prompt;     /* the usage the answer being built reports (its builder sets */
    uint64_t usage_completion; /* them; 0 before each handler) */
    uint64_t now;
    unsigned fail_toggle;
} worker_t;

extern char TAG_LISTEN, TAG_STOP; /* epoll tags of a worker's listener and stop eventfd */

/* -------------------------------------------------------------- requests */

/* One parsed request head (http.c's parse_head). */
typedef struct {
    const char *method;
    size_t method_len;
    const char *path; /* without query */
    size_t path_len;
    size_t content_length;
    int keep_alive;
    int chunked;
    int expect_continue;
    int bad_length;
    /* the native APIs' headers (native.c checks them) */
    int has_authorization;     /* Authorization: present */
    int has_x_api_key;         /* x-api-key: present (Anthropic) */
    int anthropic_version_ok;  /* anthropic-version: 2023-06-01 */
    int has_goog_api_key;      /* x-goog-api-key: present (Gemini) */
} req_t;

/* the request's path (without its query) ends with `suffix` */
int path_ends(const req_t *r, const char *suffix);

/* a worker thread's epoll loop (http.c); arg: its worker_t */
void *worker_main(void *arg);

/* ----------------------------------------------------------- routes (routes.c) */

/* What a route's handler gets, and may change: it builds the body in w->body (empty when it
 * is called); status and ctype are what the response says. A handler whose answer reports
 * usage sets w->usage_prompt / w->usage_completion (build_chat does): handle_request counts
 * them in /_stats and, with --tpm-usage, charges them to the tokens bucket. */
typedef struct {
    const req_t *r;
    const char *body;     /* the request body, body[0, blen) (not NUL-terminated) */
    size_t blen;
    int status;           /* 200 unless the handler sets another */
    const char *ctype;    /* NULL: application/json */
} route_ctx_t;

typedef void (*route_fn)(worker_t *w, route_ctx_t *rc);

enum { MATCH_EXACT, MATCH_SUFFIX, MATCH_PREFIX }; /* how a route's path is compared */

/* which of handle_request's steps apply to a route */
enum {
    RT_COUNT = 1, /* counted in /_stats (requests, responses) and /_timeline */
    RT_LIMIT = 2, /* the bare-429 limiter and the --rpm/--tpm buckets */
    RT_FAULT = 4, /* --fail/--drop/--truncate/--stall-rate */
    RT_DELAY = 8, /* --latency-ms, --jitter-ms */
    RT_API = RT_COUNT | RT_LIMIT | RT_FAULT | RT_DELAY,
    RT_EMBED = 16, /* its tokens go to the --embed-tpm bucket (when given) and count as
                    * embeddings' in /_stats */
};

/* the wire format of a route's answers, errors and rate-limit headers */
enum { D_OPENAI = 0, D_ANTHROPIC, D_GEMINI };

typedef struct {
    const char *method;   /* "POST", "GET"...; NULL: any */
    int match;            /* MATCH_* */
    const char *path;     /* compared with the request's path, without its query */
    unsigned flags;       /* RT_* */
    route_fn handler;
    int dialect;          /* D_*: how limits and faults answer on this route */
} route_t;

/* The parsed complete request: routes.c answers it (http.c calls this once per request). */
void handle_request(worker_t *w, conn_t *c, const req_t *r, const char *body, size_t blen);

/* ------------------------------------------- responses and their queue (http.c) */

/* Appends a full response (head + body) to c->out; returns the head's length. */
size_t put_response_typed(conn_t *c, int status, const buf_t *extra, const char *body,
                          size_t body_len, int keep_alive, const char *ctype);
/* the same, Content-Type: application/json */
size_t put_response(conn_t *c, int status, const buf_t *extra, const char *body,
                    size_t body_len, int keep_alive);
/* b = an OpenAI-style error body {"error":{"message":msg,"type":type,"code":code|null}} */
void put_error_body(buf_t *b, const char *msg, const char *type, const char *code);
/* The last `len` bytes of c->out are a response due at `deadline` (0: now): queue it, in
 * request order. `status` is counted in the stats when it is sent (0: not counted). */
void enqueue(worker_t *w, conn_t *c, size_t len, uint64_t deadline, int status, int kind);
/* w->body as a response that is not delayed (still queued behind earlier ones). */
void respond_now(worker_t *w, conn_t *c, int status, const buf_t *extra, int keep_alive);
/* an invalid_request_error body with `msg`, sent now */
void respond_error_now(worker_t *w, conn_t *c, int status, const char *msg, int keep_alive);

/* ---------------------------------------------------- limits (limits.c) */

void limits_init(uint64_t now);
/* Takes one request (and body_len/4 tokens) if the --rpm/--tpm buckets allow it and appends
 * the rate-limit headers of `dialect` (D_*) to `hdrs`: OpenAI's x-ratelimit-* and
 * retry-after-ms; Anthropic's anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}
 * (RFC 3339 resets) and retry-after in whole seconds; none for Gemini (its API sends none).
 * 0 when admitted, else the retry-after in ms, with *which = 1 (requests), 2 (tokens) or 3
 * (both). `embed`: the request's tokens go to the --embed-tpm bucket when there is one. */
uint64_t ratelimit_take(uint64_t now, size_t body_len, buf_t *hdrs, int *which, int dialect,
                        int embed);
/* With --tpm-usage: an admitted request's answer used `tokens` more than it was charged at
 * admission (its completion): take them (the level may go below zero). */
void ratelimit_charge(uint64_t now, uint64_t tokens, int embed);
/* 1 if the request may pass the bare-429 limiter (always, when it is off) */
int bare_take(uint64_t now);
/* the timeline starts at the first request; responses 200 and 429 are counted per slot */
void timeline_start(uint64_t now);
void timeline_count(int status);
/* b = the /_timeline JSON */
void build_timeline(buf_t *b);

/* ---------------------------------------------------- JSON scans (json.c) */
/* All on offsets into a body p[0, len): nothing is allocated, nothing is built. */

typedef struct {
    const char *content; /* last "content":"..." value, raw (still escaped) */
    size_t content_len;
    int has_content;
    const char *model;   /* first "model":"..." value, raw */
    size_t model_len;
    size_t input_off;    /* offset of the first "input" value, or SIZE_MAX */
    size_t rf_off;       /* offset of the first "response_format" object, or SIZE_MAX */
    size_t msgs_off;     /* offset of the first "messages" array, or SIZE_MAX */
    int stream;          /* "stream": true */
    int include_usage;   /* "include_usage": true (in stream_options) */
    int dimensions;      /* a positive integer "dimensions", else 0 */
    int base64;          /* "encoding_format":"base64" */
} scan_t;

/* Walks string tokens only, so quotes inside string values never confuse it. */
void scan_body(const char *p, size_t len, scan_t *out);

/* i: index just after an opening quote. Returns the index of the closing quote (SIZE_MAX). */
size_t scan_string(const char *p, size_t len, size_t i);
static inline size_t skip_ws(const char *p, size_t len, size_t i) {
    while (i < len && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r')) i++;
    return i;
}

/* end index of the JSON value starting at i (string, array, object or scalar) */
size_t skip_value(const char *p, size_t len, size_t i);
/* p[s, e) is exactly `lit` */
static inline int raw_is(const char *p, size_t s, size_t e, const char *lit) {
    size_t n = strlen(lit);
    return e >= s && e - s == n && memcmp(p + s, lit, n) == 0;
}

/* index of the closing quote of the string value at v, or SIZE_MAX if v is not a string */
size_t str_end(const char *p, size_t len, size_t v);
/* The next member of an object; *i is just after '{' or after the previous value.
 * 1: key p[*ks, *ke) (raw, no quotes), value at *v; 0: end of the object; -1: malformed. */
int obj_next(const char *p, size_t len, size_t *i, size_t *ks, size_t *ke, size_t *v);
/* The next element of an array; *i is just after '[' or after the previous element. */
int arr_next(const char *p, size_t len, size_t *i, size_t *v);
/* offset of the value of `key` in the object at obj, or SIZE_MAX */
size_t obj_get_n(const char *p, size_t len, size_t obj, const char *key, size_t klen);
size_t obj_get(const char *p, size_t len, size_t obj, const char *key);
/* four hex digits p[i, i+4) (i + 4 <= e) into *out: 0, or -1 */
int hex4(const char *p, size_t i, size_t e, uint32_t *out);
/* The JSON string body p[s, e) unescaped into b (UTF-8). 0, or -1 on a bad escape. The
 * result is never longer than the escaped text. */
int json_unescape(buf_t *b, const char *p, size_t s, size_t e);
/* appends s[0, n) escaped as the body of a JSON string */
void put_escaped(buf_t *b, const char *s, size_t n);

/* ------------------------------------------------- answers (routes.c, fill.c) */

/* the request's "model" (raw), or "mock" */
void put_model(buf_t *b, const scan_t *sc);
/* w->body = a chat.completion (or its event stream, with sc->stream) for the request */
void build_chat(worker_t *w, const char *body, size_t blen, const scan_t *sc);
/* w->body = the embeddings answer of a request body (routes.c) */
void build_embeddings(worker_t *w, const char *body, size_t blen, const scan_t *sc);

/* ------------------------------------------------------- the Batch API (batches.c) */

/* /v1/files... and /v1/batches...: uploads, batches on a fast-forward clock, results */
void route_files(worker_t *w, route_ctx_t *rc);
void route_batches(worker_t *w, route_ctx_t *rc);
/* appends ,"batch_files":N,"batches_created":N,"batch_lines":N to a /_stats body */
void batches_stats(buf_t *b);
/* The structured answer for the request's response_format into w->ans (JSON text, not yet
 * escaped). 0 if the request does not qualify (the caller echoes instead). fill.c. */
int build_structured(worker_t *w, const char *p, size_t len, const scan_t *sc);
/* The same from a schema at p[schema] (SIZE_MAX: any object) and the document in the
 * user text p[ts, te) (still escaped). Types may be written in upper case (Gemini). */
int build_structured_schema(worker_t *w, const char *p, size_t len, size_t schema, size_t ts,
                            size_t te);
/* Text p[*ts, *te) of the last user message of the messages array at p[msgs] (string content
 * or its first text part). 1 if found. fill.c. */
int last_user_text(const char *p, size_t len, size_t msgs, size_t *ts, size_t *te);

/* ------------------------------------------------ native dialects (native.c) */

/* route handlers: POST .../v1/messages (Anthropic), POST .../models/M:generateContent */
void route_messages(worker_t *w, route_ctx_t *rc);
void route_generate(worker_t *w, route_ctx_t *rc);
/* b = an error body in `dialect`'s shape for `status` with `msg`; for Gemini with retry_ms > 0
 * a google.rpc.RetryInfo detail says when to retry (its API sends no Retry-After header) */
void put_dialect_error(buf_t *b, int dialect, int status, const char *msg, const char *type,
                       uint64_t retry_ms);

#endif
