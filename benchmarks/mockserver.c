/*
 * mockserver.c - a fast OpenAI-compatible mock LLM provider for semex benchmarks.
 *
 * Single file, libc only:
 *   cc -O2 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -o mockserver mockserver.c -pthread -lm
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

static struct {
    char host[64];
    int port;
    int threads;
    double latency_ms, jitter_ms;
    double rpm, tpm;
    double fail_rate, drop_rate, truncate_rate, stall_rate;
    double stall_timeout_ms;
    uint64_t seed;
    int stdin_watch;
    int embed_dim;
    double bare_rate, bare_burst;            /* requests/s, bucket size; 0: off */
    double bare_halve_at, bare_restore_at;   /* seconds after the first request; 0: never */
} cfg = {
    .host = "127.0.0.1",
    .port = 0,
    .threads = 1,
    .stall_timeout_ms = 60000.0,
    .seed = 42,
    .embed_dim = EMBED_DIM,
    .bare_burst = 20,
};

static uint64_t g_created;          /* unix time at start: "created" of every completion */

/* ------------------------------------------------------------------- stats */

static _Atomic uint64_t st_requests, st_200, st_429, st_faults, st_fail, st_drop,
    st_truncate, st_stall, st_other;
static _Atomic int64_t st_open, st_max_open;

#define INC(x) atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)
#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

/* ------------------------------------------------------------------ buffers */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static void die_oom(void) {
    fputs("mockserver: out of memory\n", stderr);
    abort();
}

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t nc = b->cap ? b->cap : 512;
    while (nc < b->len + extra) nc *= 2;
    char *np = realloc(b->p, nc);
    if (!np) die_oom();
    b->p = np;
    b->cap = nc;
}

static void buf_put(buf_t *b, const void *s, size_t n) {
    if (!n) return;
    buf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void buf_puts(buf_t *b, const char *s) { buf_put(b, s, strlen(s)); }

/* v in decimal, written at the end of tmp; returns where it starts. */
static const char *u64_text(char tmp[24], uint64_t v, size_t *len) {
    int i = 24;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    *len = (size_t)(24 - i);
    return tmp + i;
}

static void buf_putu(buf_t *b, uint64_t v) {
    char tmp[24];
    size_t n;
    const char *text = u64_text(tmp, v, &n);
    buf_put(b, text, n);
}

static void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* -------------------------------------------------------------- time, prng */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

typedef struct {
    uint64_t s[4];
} rng_t;

static void rng_seed(rng_t *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rng_next(rng_t *r) { /* xoshiro256** */
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

static double rng_unit(rng_t *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

/* ceil for non-negative values, without libm */
static uint64_t ceil_u64(double x) {
    if (!(x > 0)) return 0;
    uint64_t t = (uint64_t)x;
    return (double)t < x ? t + 1 : t;
}

static uint64_t fnv1a(const char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ------------------------------------------------------------ rate limits */

typedef struct {
    int on;
    double limit;       /* per minute */
    double per_ns;      /* refill rate */
    double cap;         /* one second's worth, at least 1 */
    double tokens;
    uint64_t last;
} bucket_t;

static bucket_t rl_req, rl_tok;
static pthread_mutex_t rl_mu = PTHREAD_MUTEX_INITIALIZER;

static void bucket_init(bucket_t *b, double per_minute, uint64_t now) {
    b->on = per_minute > 0;
    b->limit = per_minute;
    b->per_ns = per_minute / 60.0 / 1e9;
    b->cap = per_minute / 60.0;
    if (b->cap < 1.0) b->cap = 1.0;
    b->tokens = b->cap;
    b->last = now;
}

static void bucket_refill(bucket_t *b, uint64_t now) {
    if (now > b->last) {
        b->tokens += (double)(now - b->last) * b->per_ns;
        if (b->tokens > b->cap) b->tokens = b->cap;
        b->last = now;
    }
}

/* ms until `cost` tokens are available (0 if they are now) */
static uint64_t bucket_wait_ms(const bucket_t *b, double cost) {
    double need = cost - b->tokens;
    if (need <= 0) return 0;
    uint64_t ms = ceil_u64(need / b->per_ns / 1e6);
    return ms ? ms : 1;
}

static void put_rl_headers(buf_t *h, const char *what, const bucket_t *b, int exceeded,
                           uint64_t reset_ms) {
    buf_puts(h, "x-ratelimit-limit-");
    buf_puts(h, what);
    buf_puts(h, ": ");
    buf_putu(h, (uint64_t)b->limit);
    buf_puts(h, "\r\nx-ratelimit-remaining-");
    buf_puts(h, what);
    buf_puts(h, ": ");
    buf_putu(h, exceeded || b->tokens < 0 ? 0 : (uint64_t)b->tokens);
    buf_puts(h, "\r\nx-ratelimit-reset-");
    buf_puts(h, what);
    buf_puts(h, ": ");
    buf_putu(h, reset_ms);
    buf_puts(h, "ms\r\n");
}

/*
 * Takes one request (and body_len/4 tokens) if both buckets allow it. Appends the
 * x-ratelimit-* headers to `hdrs`. Returns 0 when admitted, else the retry-after in
 * ms, with *which = 1 (requests), 2 (tokens) or 3 (both).
 */
static uint64_t ratelimit_take(uint64_t now, size_t body_len, buf_t *hdrs, int *which) {
    *which = 0;
    if (!rl_req.on && !rl_tok.on) return 0;
    pthread_mutex_lock(&rl_mu);
    double tcost = (double)(body_len / 4);
    uint64_t wreq = 0, wtok = 0;
    if (rl_req.on) {
        bucket_refill(&rl_req, now);
        wreq = bucket_wait_ms(&rl_req, 1.0);
    }
    if (rl_tok.on) {
        bucket_refill(&rl_tok, now);
        if (tcost > rl_tok.cap) tcost = rl_tok.cap; /* else it could never pass */
        wtok = bucket_wait_ms(&rl_tok, tcost);
    }
    uint64_t retry = wreq > wtok ? wreq : wtok;
    if (retry == 0) {
        if (rl_req.on) rl_req.tokens -= 1.0;
        if (rl_tok.on) rl_tok.tokens -= tcost;
    }
    /* headers: on success the reset is the time until the bucket is full again */
    if (rl_req.on) {
        uint64_t reset = wreq;
        if (!retry) reset = ceil_u64((rl_req.cap - rl_req.tokens) / rl_req.per_ns / 1e6);
        put_rl_headers(hdrs, "requests", &rl_req, wreq > 0, reset);
    }
    if (rl_tok.on) {
        uint64_t reset = wtok;
        if (!retry) reset = ceil_u64((rl_tok.cap - rl_tok.tokens) / rl_tok.per_ns / 1e6);
        put_rl_headers(hdrs, "tokens", &rl_tok, wtok > 0, reset);
    }
    pthread_mutex_unlock(&rl_mu);
    if (retry) {
        *which = (wreq ? 1 : 0) | (wtok ? 2 : 0);
        buf_puts(hdrs, "retry-after-ms: ");
        buf_putu(hdrs, retry);
        buf_puts(hdrs, "\r\n");
    }
    return retry;
}

/* ------------------------------------------------ bare 429s and the timeline */

/* nginx limit_req (burst=B nodelay) and most gateways: a bucket of B requests refilled at R
 * per second; a request that finds it empty gets 429 and nothing else to go on. */
static struct {
    double tokens;
    uint64_t last;
    int started;
} bare;

static _Atomic uint64_t tl_first_ns;   /* first request, 0 until then */
#define TL_SLOT_NS 100000000ull          /* 100 ms */
#define TL_SLOTS 36000                   /* an hour */
static _Atomic uint32_t tl_200[TL_SLOTS], tl_429[TL_SLOTS];

static void timeline_start(uint64_t now) {
    uint64_t zero = 0;
    atomic_compare_exchange_strong(&tl_first_ns, &zero, now);
}

static void timeline_count(int status) {
    uint64_t first = atomic_load(&tl_first_ns);
    if (!first || (status != 200 && status != 429)) return;
    uint64_t now = now_ns();
    uint64_t slot = now > first ? (now - first) / TL_SLOT_NS : 0;
    if (slot >= TL_SLOTS) return;
    atomic_fetch_add(status == 200 ? &tl_200[slot] : &tl_429[slot], 1);
}

/* 1 if the request may pass the bare limiter (always, when it is off). */
static int bare_take(uint64_t now) {
    if (cfg.bare_rate <= 0) return 1;
    pthread_mutex_lock(&rl_mu);
    if (!bare.started) {
        bare.started = 1;
        bare.tokens = cfg.bare_burst;
        bare.last = now;
    }
    double since = (double)(now - atomic_load(&tl_first_ns)) / 1e9;
    double rate = cfg.bare_rate;
    if (cfg.bare_halve_at > 0 && since >= cfg.bare_halve_at &&
        !(cfg.bare_restore_at > 0 && since >= cfg.bare_restore_at))
        rate /= 2;
    if (now > bare.last) {
        bare.tokens += (double)(now - bare.last) / 1e9 * rate;
        if (bare.tokens > cfg.bare_burst) bare.tokens = cfg.bare_burst;
        bare.last = now;
    }
    int ok = bare.tokens >= 1.0;
    if (ok) bare.tokens -= 1.0;
    pthread_mutex_unlock(&rl_mu);
    return ok;
}

static void build_timeline(buf_t *b) {
    b->len = 0;
    size_t last = 0;
    for (size_t i = 0; i < TL_SLOTS; i++)
        if (atomic_load(&tl_200[i]) || atomic_load(&tl_429[i])) last = i + 1;
    buf_puts(b, "{\"slot_ms\":100,\"ok\":[");
    for (size_t i = 0; i < last; i++) {
        if (i) buf_puts(b, ",");
        buf_putu(b, atomic_load(&tl_200[i]));
    }
    buf_puts(b, "],\"r429\":[");
    for (size_t i = 0; i < last; i++) {
        if (i) buf_puts(b, ",");
        buf_putu(b, atomic_load(&tl_429[i]));
    }
    buf_puts(b, "]}");
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
    uint64_t now;
    unsigned fail_toggle;
} worker_t;

static char TAG_LISTEN, TAG_STOP;

static void heap_swap(worker_t *w, size_t a, size_t b) {
    conn_t *t = w->heap[a];
    w->heap[a] = w->heap[b];
    w->heap[b] = t;
    w->heap[a]->heap_idx = a;
    w->heap[b]->heap_idx = b;
}

static void heap_up(worker_t *w, size_t i) {
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (w->heap[p]->deadline <= w->heap[i]->deadline) break;
        heap_swap(w, p, i);
        i = p;
    }
}

static void heap_down(worker_t *w, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < w->heap_len && w->heap[l]->deadline < w->heap[m]->deadline) m = l;
        if (r < w->heap_len && w->heap[r]->deadline < w->heap[m]->deadline) m = r;
        if (m == i) return;
        heap_swap(w, i, m);
        i = m;
    }
}

static void heap_push(worker_t *w, conn_t *c) {
    if (w->heap_len == w->heap_cap) {
        size_t nc = w->heap_cap ? w->heap_cap * 2 : 1024;
        conn_t **nh = realloc(w->heap, nc * sizeof *nh);
        if (!nh) die_oom();
        w->heap = nh;
        w->heap_cap = nc;
    }
    c->heap_idx = w->heap_len;
    w->heap[w->heap_len++] = c;
    heap_up(w, c->heap_idx);
}

static void heap_remove(worker_t *w, conn_t *c) {
    size_t i = c->heap_idx;
    if (i == HEAP_NONE) return;
    c->heap_idx = HEAP_NONE;
    size_t last = --w->heap_len;
    if (i != last) {
        conn_t *moved = w->heap[last];
        w->heap[i] = moved;
        moved->heap_idx = i;
        heap_down(w, i);
        heap_up(w, moved->heap_idx);
    }
}

static void conn_close(worker_t *w, conn_t *c) {
    heap_remove(w, c);
    if (c->prev) c->prev->next = c->next;
    else w->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    if (c->want_close == CLOSE_GRACEFUL) shutdown(c->fd, SHUT_WR);
    close(c->fd); /* also removes it from the epoll set */
    buf_free(&c->in);
    buf_free(&c->out);
    free(c->q);
    free(c);
    atomic_fetch_sub_explicit(&st_open, 1, memory_order_relaxed);
}

/* ------------------------------------------------------------- JSON scans */

/* i: index just after an opening quote. Returns the index of the closing quote. */
static size_t scan_string(const char *p, size_t len, size_t i) {
    size_t j = i;
    while (j < len) {
        const char *q = memchr(p + j, '"', len - j);
        if (!q) return SIZE_MAX;
        size_t k = (size_t)(q - p), bs = 0;
        while (k - bs > i && p[k - bs - 1] == '\\') bs++;
        if ((bs & 1) == 0) return k;
        j = k + 1;
    }
    return SIZE_MAX;
}

static size_t skip_ws(const char *p, size_t len, size_t i) {
    while (i < len && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r')) i++;
    return i;
}

/* end index of the JSON value starting at i (string, array, object or scalar) */
static size_t skip_value(const char *p, size_t len, size_t i) {
    if (i >= len) return len;
    if (p[i] == '"') {
        size_t e = scan_string(p, len, i + 1);
        return e == SIZE_MAX ? len : e + 1;
    }
    if (p[i] == '[' || p[i] == '{') {
        int depth = 0;
        while (i < len) {
            char ch = p[i];
            if (ch == '"') {
                size_t e = scan_string(p, len, i + 1);
                if (e == SIZE_MAX) return len;
                i = e + 1;
                continue;
            }
            if (ch == '[' || ch == '{') depth++;
            else if (ch == ']' || ch == '}') {
                if (--depth == 0) return i + 1;
            }
            i++;
        }
        return len;
    }
    while (i < len && p[i] != ',' && p[i] != ']' && p[i] != '}' && p[i] != ' ' &&
           p[i] != '\n' && p[i] != '\r' && p[i] != '\t')
        i++;
    return i;
}

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
static void scan_body(const char *p, size_t len, scan_t *out) {
    memset(out, 0, sizeof *out);
    out->input_off = out->rf_off = out->msgs_off = SIZE_MAX;
    size_t i = 0;
    while (i < len) {
        const char *q = memchr(p + i, '"', len - i);
        if (!q) break;
        size_t s = (size_t)(q - p) + 1;
        size_t e = scan_string(p, len, s);
        if (e == SIZE_MAX) break;
        size_t k = skip_ws(p, len, e + 1);
        if (k >= len || p[k] != ':') {
            i = e + 1;
            continue;
        }
        k = skip_ws(p, len, k + 1);
        size_t klen = e - s;
        const char *key = p + s;
        if (k < len && p[k] == '"' &&
            ((klen == 7 && memcmp(key, "content", 7) == 0) ||
             (klen == 5 && memcmp(key, "model", 5) == 0 && !out->model))) {
            size_t ve = scan_string(p, len, k + 1);
            if (ve == SIZE_MAX) break;
            if (klen == 7) {
                out->content = p + k + 1;
                out->content_len = ve - k - 1;
                out->has_content = 1;
            } else {
                out->model = p + k + 1;
                out->model_len = ve - k - 1;
            }
            i = ve + 1;
            continue;
        }
        if (klen == 5 && memcmp(key, "input", 5) == 0 && out->input_off == SIZE_MAX)
            out->input_off = k;
        if (klen == 15 && memcmp(key, "encoding_format", 15) == 0 && k + 8 <= len &&
            memcmp(p + k, "\"base64\"", 8) == 0)
            out->base64 = 1;
        if (klen == 10 && memcmp(key, "dimensions", 10) == 0) {
            long v = 0;
            size_t d = k;
            while (d < len && p[d] >= '0' && p[d] <= '9' && v <= MAX_EMBED_DIM)
                v = v * 10 + (p[d++] - '0');
            if (d > k && v >= 1 && v <= MAX_EMBED_DIM) out->dimensions = (int)v;
        }
        if (k < len && p[k] == '{' && klen == 15 && out->rf_off == SIZE_MAX &&
            memcmp(key, "response_format", 15) == 0) {
            /* a schema may hold "content"/"model" keys of its own: step over it */
            out->rf_off = k;
            i = skip_value(p, len, k);
            continue;
        }
        if (k + 4 <= len && memcmp(p + k, "true", 4) == 0) {
            if (klen == 6 && memcmp(key, "stream", 6) == 0) out->stream = 1;
            if (klen == 13 && memcmp(key, "include_usage", 13) == 0) out->include_usage = 1;
        }
        if (k < len && p[k] == '[' && klen == 8 && out->msgs_off == SIZE_MAX &&
            memcmp(key, "messages", 8) == 0)
            out->msgs_off = k;
        i = k;
    }
}

/* --------------------------------------------------------------- responses */

static const char *reason(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
    }
}

/* Appends a full response to c->out; returns the header length. */
static size_t put_response_typed(conn_t *c, int status, const buf_t *extra, const char *body,
                                 size_t body_len, int keep_alive, const char *ctype) {
    buf_t *o = &c->out;
    size_t start = o->len;
    buf_reserve(o, 160 + (extra ? extra->len : 0) + body_len);
    buf_puts(o, "HTTP/1.1 ");
    buf_putu(o, (uint64_t)status);
    buf_puts(o, " ");
    buf_puts(o, reason(status));
    buf_puts(o, "\r\nContent-Type: ");
    buf_puts(o, ctype);
    buf_puts(o, "\r\nContent-Length: ");
    buf_putu(o, body_len);
    buf_puts(o, keep_alive ? "\r\nConnection: keep-alive\r\n" : "\r\nConnection: close\r\n");
    if (extra) buf_put(o, extra->p, extra->len);
    buf_puts(o, "\r\n");
    size_t hlen = o->len - start;
    buf_put(o, body, body_len);
    return hlen;
}

static size_t put_response(conn_t *c, int status, const buf_t *extra, const char *body,
                           size_t body_len, int keep_alive) {
    return put_response_typed(c, status, extra, body, body_len, keep_alive,
                              "application/json");
}

static void put_error_body(buf_t *b, const char *msg, const char *type, const char *code) {
    b->len = 0;
    buf_puts(b, "{\"error\":{\"message\":\"");
    buf_puts(b, msg);
    buf_puts(b, "\",\"type\":\"");
    buf_puts(b, type);
    buf_puts(b, "\",\"param\":null,\"code\":");
    if (code) {
        buf_puts(b, "\"");
        buf_puts(b, code);
        buf_puts(b, "\"");
    } else {
        buf_puts(b, "null");
    }
    buf_puts(b, "}}");
}

static void count_status(int status) {
    timeline_count(status);
    if (status == 200) INC(st_200);
    else if (status == 429) INC(st_429);
    else if (status > 100) INC(st_other);
}

/*
 * The last `len` bytes of c->out are a response due at `deadline`. With nothing
 * queued before it and the deadline passed it is released at once; otherwise it
 * waits its turn (answers leave in request order) and the connection goes into the
 * deadline heap when it becomes the head.
 */
static void enqueue(worker_t *w, conn_t *c, size_t len, uint64_t deadline, int status, int kind) {
    if (kind != P_SEND) c->stop_parse = 1;
    if (c->qhead == c->qlen && deadline <= w->now && kind != P_STALL) {
        c->out_ready += len;
        count_status(status);
        if (kind == P_SEND_CLOSE) c->closing = 1;
        return;
    }
    if (c->qlen == c->qcap) {
        if (c->qhead > 0) {
            memmove(c->q, c->q + c->qhead, (c->qlen - c->qhead) * sizeof *c->q);
            c->qlen -= c->qhead;
            c->qhead = 0;
        } else {
            unsigned nc = c->qcap ? c->qcap * 2 : 4;
            pend_t *nq = realloc(c->q, nc * sizeof *nq);
            if (!nq) die_oom();
            c->q = nq;
            c->qcap = nc;
        }
    }
    c->q[c->qlen++] = (pend_t){.len = len, .deadline = deadline, .status = status, .kind = kind};
    if (c->qlen - c->qhead == 1) {
        c->deadline = deadline;
        heap_push(w, c);
    }
}

/* Releases the due responses at the head of the queue. */
static void release_due(worker_t *w, conn_t *c) {
    heap_remove(w, c);
    while (c->qhead < c->qlen && c->q[c->qhead].deadline <= w->now) {
        pend_t *it = &c->q[c->qhead++];
        if (it->kind == P_STALL) {
            c->closing = 1; /* never answered; close once earlier answers are out */
            continue;
        }
        c->out_ready += it->len;
        count_status(it->status);
        if (it->kind == P_SEND_CLOSE) c->closing = 1;
    }
    if (c->qhead == c->qlen) {
        c->qhead = c->qlen = 0;
    } else {
        c->deadline = c->q[c->qhead].deadline;
        heap_push(w, c);
    }
}

static int can_parse(const conn_t *c) {
    return !c->want_close && !c->closing && !c->stop_parse && c->qlen - c->qhead < MAX_QUEUED;
}

/* A response that is not delayed (but still queued behind earlier ones). */
static void respond_now(worker_t *w, conn_t *c, int status, const buf_t *extra, int keep_alive) {
    size_t start = c->out.len;
    put_response(c, status, extra, w->body.p, w->body.len, keep_alive);
    enqueue(w, c, c->out.len - start, 0, status, keep_alive ? P_SEND : P_SEND_CLOSE);
}

static void respond_error_now(worker_t *w, conn_t *c, int status, const char *msg,
                              int keep_alive) {
    put_error_body(&w->body, msg, "invalid_request_error", NULL);
    respond_now(w, c, status, NULL, keep_alive);
}

static void put_model(buf_t *b, const scan_t *sc) {
    if (sc->model) buf_put(b, sc->model, sc->model_len);
    else buf_puts(b, "mock");
}

/* ------------------------------------------------------ structured answers */
/*
 * A chat request with response_format json_schema / json_object(+schema) is answered with
 * a JSON object shaped by the schema (see usage() for the rules). Everything works on
 * offsets into the request body: no schema tree is built and nothing is allocated per
 * request (the worker's doc/ans scratch buffers are reused). Depth, $ref hops and the
 * answer's size are bounded; anything unsupported or malformed gives back the echo.
 */

#define SCHEMA_MAX_DEPTH 32           /* nesting of filled values */
#define SCHEMA_MAX_HOPS 16            /* $ref / anyOf steps to resolve one schema */
#define ANSWER_MAX_BYTES (1u << 20)   /* the answer's JSON text, before escaping */
#define NO_NAME SIZE_MAX
#define MAX_ITEM_PROPS 64            /* batch item properties looked up once per request */

enum { K_ERR, K_OBJECT, K_ARRAY, K_STRING, K_INTEGER, K_NUMBER, K_BOOLEAN, K_NULL, K_LITERAL,
       K_ID /* a batch item's integer "id" */ };

static int raw_is(const char *p, size_t s, size_t e, const char *lit) {
    size_t n = strlen(lit);
    return e >= s && e - s == n && memcmp(p + s, lit, n) == 0;
}

/* index of the closing quote of the string value at v, or SIZE_MAX if v is not a string */
static size_t str_end(const char *p, size_t len, size_t v) {
    if (v >= len || p[v] != '"') return SIZE_MAX;
    return scan_string(p, len, v + 1);
}

/* The next member of an object; *i is just after '{' or after the previous value.
 * 1: key p[*ks, *ke) (raw, no quotes), value at *v; 0: end of the object; -1: malformed. */
static int obj_next(const char *p, size_t len, size_t *i, size_t *ks, size_t *ke, size_t *v) {
    size_t j = skip_ws(p, len, *i);
    if (j < len && p[j] == ',') j = skip_ws(p, len, j + 1);
    if (j >= len) return -1;
    if (p[j] == '}') return 0;
    size_t e = str_end(p, len, j);
    if (e == SIZE_MAX) return -1;
    *ks = j + 1;
    *ke = e;
    j = skip_ws(p, len, e + 1);
    if (j >= len || p[j] != ':') return -1;
    j = skip_ws(p, len, j + 1);
    if (j >= len) return -1;
    size_t ve = skip_value(p, len, j);
    if (ve <= j) return -1;
    *v = j;
    *i = ve;
    return 1;
}

/* The next element of an array; *i is just after '[' or after the previous element. */
static int arr_next(const char *p, size_t len, size_t *i, size_t *v) {
    size_t j = skip_ws(p, len, *i);
    if (j < len && p[j] == ',') j = skip_ws(p, len, j + 1);
    if (j >= len) return -1;
    if (p[j] == ']') return 0;
    size_t ve = skip_value(p, len, j);
    if (ve <= j) return -1;
    *v = j;
    *i = ve;
    return 1;
}

/* offset of the value of key p[ks, ke) in the object at obj, or SIZE_MAX */
static size_t obj_get_n(const char *p, size_t len, size_t obj, const char *key, size_t klen) {
    if (obj >= len || p[obj] != '{') return SIZE_MAX;
    size_t i = obj + 1, ks, ke, v;
    while (obj_next(p, len, &i, &ks, &ke, &v) == 1)
        if (ke - ks == klen && memcmp(p + ks, key, klen) == 0) return v;
    return SIZE_MAX;
}

static size_t obj_get(const char *p, size_t len, size_t obj, const char *key) {
    return obj_get_n(p, len, obj, key, strlen(key));
}

static int hex4(const char *p, size_t i, size_t e, uint32_t *out) {
    if (i + 4 > e) return -1;
    uint32_t v = 0;
    for (size_t k = i; k < i + 4; k++) {
        char ch = p[k];
        v <<= 4;
        if (ch >= '0' && ch <= '9') v |= (uint32_t)(ch - '0');
        else if (ch >= 'a' && ch <= 'f') v |= (uint32_t)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F') v |= (uint32_t)(ch - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

typedef struct {
    const char *p;        /* the request body */
    size_t len;
    size_t root;          /* the schema as given (its $defs serve every $ref) */
    buf_t *out;
    size_t out_start;
    size_t doc_len;       /* the document being answered: its byte length and hash */
    char hex[8];
    int bad;
} fill_t;

static void fput(fill_t *f, const char *s, size_t n) {
    if (f->bad) return;
    if (f->out->len - f->out_start + n > ANSWER_MAX_BYTES) {
        f->bad = 1;
        return;
    }
    buf_put(f->out, s, n);
}

static void fputs_(fill_t *f, const char *s) { fput(f, s, strlen(s)); }

static void fputu(fill_t *f, uint64_t v) {
    char tmp[24];
    size_t n;
    const char *text = u64_text(tmp, v, &n);
    fput(f, text, n);
}

static void set_doc(fill_t *f, const char *d, size_t n) {
    uint32_t h = 0x811c9dc5u; /* FNV-1a, 32 bits */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)d[i];
        h *= 0x01000193u;
    }
    for (int i = 7; i >= 0; i--) {
        f->hex[i] = "0123456789abcdef"[h & 15];
        h >>= 4;
    }
    f->doc_len = n;
}

/* "#", "#/$defs/Name" or "#/definitions/Name" (raw p[s, e)) -> the schema it names */
static size_t ref_target(const fill_t *f, size_t s, size_t e) {
    static const char *const prefixes[] = {"#/$defs/", "#/definitions/"};
    if (raw_is(f->p, s, e, "#")) return f->root;
    for (int i = 0; i < 2; i++) {
        size_t n = strlen(prefixes[i]);
        if (e - s > n && memcmp(f->p + s, prefixes[i], n) == 0) {
            size_t defs = obj_get_n(f->p, f->len, f->root, prefixes[i] + 2, n - 3);
            return obj_get_n(f->p, f->len, defs, f->p + s + n, e - s - n);
        }
    }
    return SIZE_MAX;
}

static int is_null_schema(const fill_t *f, size_t s) {
    size_t t = obj_get(f->p, f->len, s, "type");
    return t != SIZE_MAX && raw_is(f->p, t + 1, str_end(f->p, f->len, t), "null");
}

static int type_kind(const char *p, size_t s, size_t e) {
    if (raw_is(p, s, e, "object")) return K_OBJECT;
    if (raw_is(p, s, e, "array")) return K_ARRAY;
    if (raw_is(p, s, e, "string")) return K_STRING;
    if (raw_is(p, s, e, "integer")) return K_INTEGER;
    if (raw_is(p, s, e, "number")) return K_NUMBER;
    if (raw_is(p, s, e, "boolean")) return K_BOOLEAN;
    if (raw_is(p, s, e, "null")) return K_NULL;
    return K_ERR;
}

/* The keywords of one schema object that matter here (value offsets, SIZE_MAX if absent). */
typedef struct {
    size_t ref, type, enm, cnst, any, one, all, props, items;
} sinfo_t;

/* A property of a batch item's schema, resolved once per request. */
typedef struct {
    size_t ks, ke; /* its name */
    int kind;
    sinfo_t si;
    size_t lit;
} prop_t;

/* One pass over the members of the schema object at s. 0, or -1 if malformed. */
static int schema_info(const fill_t *f, size_t s, sinfo_t *si) {
    const char *p = f->p;
    si->ref = si->type = si->enm = si->cnst = si->any = si->one = si->all = si->props =
        si->items = SIZE_MAX;
    if (s >= f->len || p[s] != '{') return -1;
    size_t i = s + 1, ks, ke, v;
    int rc;
    while ((rc = obj_next(p, f->len, &i, &ks, &ke, &v)) == 1) {
        size_t *slot = NULL;
        if (raw_is(p, ks, ke, "type")) slot = &si->type;
        else if (raw_is(p, ks, ke, "properties")) slot = &si->props;
        else if (raw_is(p, ks, ke, "items")) slot = &si->items;
        else if (raw_is(p, ks, ke, "$ref")) slot = &si->ref;
        else if (raw_is(p, ks, ke, "anyOf")) slot = &si->any;
        else if (raw_is(p, ks, ke, "enum")) slot = &si->enm;
        else if (raw_is(p, ks, ke, "const")) slot = &si->cnst;
        else if (raw_is(p, ks, ke, "oneOf")) slot = &si->one;
        else if (raw_is(p, ks, ke, "allOf")) slot = &si->all;
        if (slot && *slot == SIZE_MAX) *slot = v;
    }
    return rc == 0 ? 0 : -1;
}

/*
 * What the schema at s asks for, after following $ref and anyOf/oneOf/allOf (their first
 * alternative that is not {"type":"null"}); *si then describes the schema reached. For
 * K_LITERAL *lit is the value to copy (const, or enum's first value). K_ERR: unsupported.
 */
static int schema_kind(const fill_t *f, size_t s, sinfo_t *si, size_t *lit) {
    *lit = 0;
    const char *p = f->p;
    size_t len = f->len;
    for (int hop = 0;; hop++) {
        if (hop > SCHEMA_MAX_HOPS || schema_info(f, s, si) != 0) return K_ERR;
        if (si->ref != SIZE_MAX) {
            size_t re = str_end(p, len, si->ref);
            if (re == SIZE_MAX) return K_ERR;
            s = ref_target(f, si->ref + 1, re);
            continue;
        }
        if (si->type != SIZE_MAX || si->enm != SIZE_MAX || si->cnst != SIZE_MAX) break;
        size_t alts = si->any != SIZE_MAX ? si->any : si->one != SIZE_MAX ? si->one : si->all;
        if (alts == SIZE_MAX) break;
        if (p[alts] != '[') return K_ERR;
        size_t i = alts + 1, v, first = SIZE_MAX, pick = SIZE_MAX;
        int rc;
        while ((rc = arr_next(p, len, &i, &v)) == 1) {
            if (first == SIZE_MAX) first = v;
            if (p[v] == '{' && !is_null_schema(f, v)) {
                pick = v;
                break;
            }
        }
        if (rc < 0 || first == SIZE_MAX) return K_ERR;
        s = pick != SIZE_MAX ? pick : first;
    }
    if (si->cnst != SIZE_MAX) {
        *lit = si->cnst;
        return K_LITERAL;
    }
    if (si->enm != SIZE_MAX) {
        size_t i = si->enm + 1;
        if (p[si->enm] != '[' || arr_next(p, len, &i, lit) != 1) return K_ERR;
        return K_LITERAL;
    }
    size_t v = si->type;
    if (v == SIZE_MAX) {
        if (si->props != SIZE_MAX) return K_OBJECT;
        if (si->items != SIZE_MAX) return K_ARRAY;
        return K_STRING; /* no type information: any value will do */
    }
    if (p[v] == '"') return type_kind(p, v + 1, str_end(p, len, v));
    if (p[v] != '[') return K_ERR;
    size_t i = v + 1, t;
    int saw_null = 0, rc;
    while ((rc = arr_next(p, len, &i, &t)) == 1) {
        int k = type_kind(p, t + 1, str_end(p, len, t));
        if (k == K_ERR) return K_ERR;
        if (k != K_NULL) return k;
        saw_null = 1;
    }
    return rc == 0 && saw_null ? K_NULL : K_ERR;
}

static void fill_value(fill_t *f, size_t s, size_t ks, size_t ke, int depth);
static void fill_kind(fill_t *f, int kind, const sinfo_t *si, size_t lit, size_t ks, size_t ke,
                      int depth);
static void fput_str(fill_t *f, size_t s, size_t e);

/* A JSON value of the request (enum/const), copied member by member so that only
 * well-formed JSON comes out. */
static void fill_literal(fill_t *f, size_t v, int depth) {
    const char *p = f->p;
    size_t e = skip_value(p, f->len, v), i = v + 1, ks, ke, x;
    int rc = 0, n = 0;
    if (depth > SCHEMA_MAX_DEPTH || e <= v) {
        f->bad = 1;
        return;
    }
    switch (p[v]) {
    case '"':
        if (e - v < 2 || p[e - 1] != '"') f->bad = 1;
        fput(f, "\"", 1);
        fput_str(f, v + 1, e - 1);
        fput(f, "\"", 1);
        return;
    case '{':
        fput(f, "{", 1);
        while (!f->bad && (rc = obj_next(p, f->len, &i, &ks, &ke, &x)) == 1) {
            if (n++) fput(f, ",", 1);
            fput(f, "\"", 1);
            fput_str(f, ks, ke);
            fput(f, "\":", 2);
            fill_literal(f, x, depth + 1);
        }
        if (rc < 0) f->bad = 1;
        fput(f, "}", 1);
        return;
    case '[':
        fput(f, "[", 1);
        while (!f->bad && (rc = arr_next(p, f->len, &i, &x)) == 1) {
            if (n++) fput(f, ",", 1);
            fill_literal(f, x, depth + 1);
        }
        if (rc < 0) f->bad = 1;
        fput(f, "]", 1);
        return;
    }
    if (!raw_is(p, v, e, "true") && !raw_is(p, v, e, "false") && !raw_is(p, v, e, "null")) {
        /* a number: [-]digits[.digits][(e|E)[+-]digits] */
        size_t j = v + (p[v] == '-'), d0 = j;
        while (j < e && p[j] >= '0' && p[j] <= '9') j++;
        if (j == d0) f->bad = 1;
        if (j < e && p[j] == '.') {
            size_t d1 = ++j;
            while (j < e && p[j] >= '0' && p[j] <= '9') j++;
            if (j == d1) f->bad = 1;
        }
        if (j < e && (p[j] == 'e' || p[j] == 'E')) {
            j++;
            if (j < e && (p[j] == '+' || p[j] == '-')) j++;
            size_t d2 = j;
            while (j < e && p[j] >= '0' && p[j] <= '9') j++;
            if (j == d2) f->bad = 1;
        }
        if (j != e) f->bad = 1;
    }
    fput(f, p + v, e - v);
}

/* Copies the raw string body p[s, e) (a key or a string literal) if its escapes are valid
 * JSON, so that a garbled request still gets a well-formed answer. */
static void fput_str(fill_t *f, size_t s, size_t e) {
    for (size_t i = s; i < e; i++) {
        unsigned char ch = (unsigned char)f->p[i];
        if (ch < 0x20) f->bad = 1;
        if (ch != '\\') continue;
        ch = (unsigned char)f->p[++i]; /* the closing quote follows a lone backslash: i < e */
        uint32_t u;
        if (ch == 'u' ? hex4(f->p, i + 1, e, &u) != 0 : !memchr("\"\\/bfnrt", ch, 8)) f->bad = 1;
    }
    fput(f, f->p + s, e - s);
}

/* "NAME:HHHHHHHH", NAME = the property p[ks, ke) ("answer" without one) */
static void fill_string(fill_t *f, size_t ks, size_t ke) {
    fput(f, "\"", 1);
    if (ks == NO_NAME) fput(f, "answer", 6);
    else fput_str(f, ks, ke);
    fput(f, ":", 1);
    fput(f, f->hex, 8);
    fput(f, "\"", 1);
}

/* An object with every property of `props` (SIZE_MAX: none), in order; with id >= 0 an
 * integer property "id" gets id. */
static void fill_object(fill_t *f, size_t props, int64_t id, int depth) {
    const char *p = f->p;
    fput(f, "{", 1);
    if (props != SIZE_MAX) {
        if (p[props] != '{') {
            f->bad = 1;
            return;
        }
        size_t i = props + 1, ks, ke, v;
        int rc = 0, n = 0;
        while (!f->bad && (rc = obj_next(p, f->len, &i, &ks, &ke, &v)) == 1) {
            if (n++) fput(f, ",", 1);
            fput(f, "\"", 1);
            fput_str(f, ks, ke);
            fput(f, "\":", 2);
            if (id >= 0 && raw_is(p, ks, ke, "id")) {
                sinfo_t si;
                size_t lit;
                if (schema_kind(f, v, &si, &lit) == K_INTEGER) {
                    fputu(f, (uint64_t)id);
                    continue;
                }
            }
            fill_value(f, v, ks, ke, depth + 1);
        }
        if (rc < 0) f->bad = 1;
    }
    fput(f, "}", 1);
}

/* The value of a schema whose kind is known; p[ks, ke) is the name of its property. */
static void fill_kind(fill_t *f, int kind, const sinfo_t *si, size_t lit, size_t ks, size_t ke,
                      int depth) {
    switch (kind) {
    case K_OBJECT: fill_object(f, si->props, -1, depth); break;
    case K_ARRAY:
        fput(f, "[", 1);
        if (si->items == SIZE_MAX) fill_string(f, ks, ke); /* items of any type */
        else fill_value(f, si->items, ks, ke, depth + 1);
        fput(f, "]", 1);
        break;
    case K_STRING: fill_string(f, ks, ke); break;
    case K_INTEGER: fputu(f, f->doc_len); break;
    case K_NUMBER:
        fputu(f, f->doc_len);
        fput(f, ".0", 2);
        break;
    case K_BOOLEAN: fput(f, "true", 4); break;
    case K_NULL: fput(f, "null", 4); break;
    case K_LITERAL: fill_literal(f, lit, depth); break;
    default: f->bad = 1;
    }
}

/* The value for schema s; p[ks, ke) is the name of the property it belongs to. */
static void fill_value(fill_t *f, size_t s, size_t ks, size_t ke, int depth) {
    if (f->bad) return;
    if (depth > SCHEMA_MAX_DEPTH) {
        f->bad = 1;
        return;
    }
    sinfo_t si;
    size_t lit = 0;
    int kind = schema_kind(f, s, &si, &lit);
    fill_kind(f, kind, &si, lit, ks, ke, depth);
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) { /* a lone surrogate too (as Python's "surrogatepass") */
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* The JSON string body p[s, e) unescaped into b (UTF-8). 0, or -1 on a bad escape. The
 * result is never longer than the escaped text. */
static int json_unescape(buf_t *b, const char *p, size_t s, size_t e) {
    b->len = 0;
    buf_reserve(b, e - s + 1);
    char *o = b->p;
    size_t n = 0;
    while (s < e) {
        const char *bs = memchr(p + s, '\\', e - s);
        size_t run = bs ? (size_t)(bs - (p + s)) : e - s;
        memcpy(o + n, p + s, run);
        n += run;
        s += run;
        if (s >= e) break;
        if (s + 1 >= e) return -1;
        char ch = p[s + 1];
        s += 2;
        switch (ch) {
        case '"': case '\\': case '/': o[n++] = ch; break;
        case 'b': o[n++] = '\b'; break;
        case 'f': o[n++] = '\f'; break;
        case 'n': o[n++] = '\n'; break;
        case 'r': o[n++] = '\r'; break;
        case 't': o[n++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (hex4(p, s, e, &cp)) return -1;
            s += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && s + 6 <= e && p[s] == '\\' && p[s + 1] == 'u' &&
                hex4(p, s + 2, e, &lo) == 0 && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                s += 6;
            }
            n += put_utf8(o + n, cp);
            break;
        }
        default: return -1;
        }
    }
    b->len = n;
    return 0;
}

/* Text p[s, e) of the last user message: a string content, or the first "text" part of an
 * array content. 1 if found (and the messages array is well-formed). */
static int last_user_text(const char *p, size_t len, size_t msgs, size_t *ts, size_t *te) {
    if (msgs >= len || p[msgs] != '[') return 0;
    size_t i = msgs + 1, m;
    int found = 0, rc;
    while ((rc = arr_next(p, len, &i, &m)) == 1) {
        size_t role = obj_get(p, len, m, "role");
        if (role == SIZE_MAX || !raw_is(p, role + 1, str_end(p, len, role), "user")) continue;
        size_t c = obj_get(p, len, m, "content");
        if (c != SIZE_MAX && p[c] == '[') {
            size_t j = c + 1, part, t = SIZE_MAX;
            while (arr_next(p, len, &j, &part) == 1) {
                size_t ty = obj_get(p, len, part, "type");
                if (ty != SIZE_MAX && raw_is(p, ty + 1, str_end(p, len, ty), "text")) {
                    t = obj_get(p, len, part, "text");
                    break;
                }
            }
            c = t;
        }
        size_t ce = c == SIZE_MAX ? SIZE_MAX : str_end(p, len, c);
        if (ce != SIZE_MAX) {
            *ts = c + 1;
            *te = ce;
            found = 1;
        }
    }
    return found && rc == 0;
}

static size_t trim_end(const char *d, size_t s, size_t e) {
    while (e > s && (d[e - 1] == ' ' || d[e - 1] == '\t' || d[e - 1] == '\n' || d[e - 1] == '\r'))
        e--;
    return e;
}

/* The first line at or after line start `from` that is "Document <k>:" (numbered, k of 1-9
 * digits) or, with k == NULL, "Document:"; trailing blanks allowed. Returns 1 with the
 * line's start *hs and the start of the next line *he. */
static int find_doc_line(const char *d, size_t n, size_t from, size_t *hs, size_t *he,
                         uint32_t *k) {
    size_t ls = from;
    while (ls < n) {
        const char *nl = memchr(d + ls, '\n', n - ls);
        size_t le = nl ? (size_t)(nl - d) : n;
        if (d[ls] == 'D') {
            size_t e = trim_end(d, ls, le);
            if (k == NULL) {
                if (e - ls == 9 && memcmp(d + ls, "Document:", 9) == 0) {
                    *hs = ls;
                    *he = nl ? le + 1 : n;
                    return 1;
                }
            } else if (e - ls >= 11 && e - ls <= 19 && memcmp(d + ls, "Document ", 9) == 0 &&
                       d[e - 1] == ':') {
                uint32_t v = 0;
                size_t q = ls + 9;
                while (q < e - 1 && d[q] >= '0' && d[q] <= '9') v = v * 10 + (uint32_t)(d[q++] - '0');
                if (q == e - 1) {
                    *hs = ls;
                    *he = nl ? le + 1 : n;
                    *k = v;
                    return 1;
                }
            }
        }
        ls = le + 1;
    }
    return 0;
}

/*
 * The structured answer for the request's response_format into w->ans (JSON text, not
 * yet escaped). 0 if the request does not qualify (the caller echoes instead).
 */
static int build_structured(worker_t *w, const char *p, size_t len, const scan_t *sc) {
    size_t rf = sc->rf_off, ts = 0, te = 0;
    size_t t = obj_get(p, len, rf, "type"), schema = SIZE_MAX;
    if (t == SIZE_MAX) return 0;
    size_t tend = str_end(p, len, t);
    if (raw_is(p, t + 1, tend, "json_schema")) {
        schema = obj_get(p, len, obj_get(p, len, rf, "json_schema"), "schema");
        if (schema == SIZE_MAX) return 0;
    } else if (raw_is(p, t + 1, tend, "json_object")) {
        schema = obj_get(p, len, rf, "schema");
    } else {
        return 0;
    }
    if (schema != SIZE_MAX && p[schema] != '{') return 0;
    if (!last_user_text(p, len, sc->msgs_off, &ts, &te)) return 0;
    if (json_unescape(&w->doc, p, ts, te)) return 0;

    const char *d = w->doc.p;
    size_t n = w->doc.len, hs, he, hs2, he2, ds = 0, de = n;
    uint32_t k = 0, k2 = 0;
    int sections = find_doc_line(d, n, 0, &hs, &he, &k);
    if (sections) { /* the single document is the first section */
        ds = he;
        de = find_doc_line(d, n, he, &hs2, &he2, &k2) ? hs2 : n;
        de = trim_end(d, ds, de);
    } else if (find_doc_line(d, n, 0, &hs, &ds, NULL)) {
        de = trim_end(d, ds, n);
    }
    fill_t f = {.p = p, .len = len, .root = schema, .out = &w->ans};
    w->ans.len = 0;
    set_doc(&f, d + ds, de - ds);
    if (schema == SIZE_MAX) {
        fputs_(&f, "{\"answer\":\"answer:");
        fput(&f, f.hex, 8);
        fputs_(&f, "\"}");
        return !f.bad;
    }

    /* the batch shape: an object with an array property whose items are objects */
    sinfo_t si;
    size_t lit, props = SIZE_MAX, bks = SIZE_MAX, items = SIZE_MAX;
    if (sections && schema_kind(&f, schema, &si, &lit) == K_OBJECT &&
        (props = si.props) != SIZE_MAX && p[props] == '{') {
        size_t i = props + 1, ks, ke, v;
        while (bks == SIZE_MAX && obj_next(p, len, &i, &ks, &ke, &v) == 1) {
            if (schema_kind(&f, v, &si, &lit) != K_ARRAY || si.items == SIZE_MAX) continue;
            if (schema_kind(&f, si.items, &si, &lit) == K_OBJECT) {
                bks = ks;
                items = si.props;
            }
        }
    }
    if (bks == SIZE_MAX) {
        fill_value(&f, schema, NO_NAME, NO_NAME, 0);
        return !f.bad;
    }
    fput(&f, "{", 1);
    size_t i = props + 1, ks, ke, v;
    int rc = 0, np = 0;
    while (!f.bad && (rc = obj_next(p, len, &i, &ks, &ke, &v)) == 1) {
        if (np++) fput(&f, ",", 1);
        fput(&f, "\"", 1);
        fput_str(&f, ks, ke);
        fput(&f, "\":", 2);
        if (ks != bks) {
            fill_value(&f, v, ks, ke, 1);
            continue;
        }
        fput(&f, "[", 1);
        /* the item's properties, looked up once for all sections */
        prop_t ip[MAX_ITEM_PROPS];
        size_t nip = 0, j = items == SIZE_MAX ? SIZE_MAX : items + 1, iks, ike, iv;
        int irc = 0;
        if (items != SIZE_MAX && p[items] != '{') irc = -1;
        while (j != SIZE_MAX && irc == 0 && (irc = obj_next(p, len, &j, &iks, &ike, &iv)) == 1) {
            irc = 0;
            if (nip == MAX_ITEM_PROPS) {
                irc = 1; /* too many: the general path, per section */
                break;
            }
            prop_t *q = &ip[nip++];
            q->ks = iks;
            q->ke = ike;
            q->kind = schema_kind(&f, iv, &q->si, &q->lit);
            if (q->kind == K_INTEGER && raw_is(p, iks, ike, "id")) q->kind = K_ID;
        }
        if (irc < 0) f.bad = 1;
        size_t sec = he; /* the current section's text starts here; k is its number */
        for (int m = 0;; m++) {
            size_t nx_hs = n, nx_he = n;
            uint32_t nx_k = 0;
            int more = find_doc_line(d, n, sec, &nx_hs, &nx_he, &nx_k);
            if (m) fput(&f, ",", 1);
            set_doc(&f, d + sec, trim_end(d, sec, more ? nx_hs : n) - sec);
            if (irc) {
                fill_object(&f, items, k, 2);
            } else {
                fput(&f, "{", 1);
                for (size_t q = 0; q < nip && !f.bad; q++) {
                    if (q) fput(&f, ",", 1);
                    fput(&f, "\"", 1);
                    fput_str(&f, ip[q].ks, ip[q].ke);
                    fput(&f, "\":", 2);
                    if (ip[q].kind == K_ID) fputu(&f, k);
                    else fill_kind(&f, ip[q].kind, &ip[q].si, ip[q].lit, ip[q].ks, ip[q].ke, 3);
                }
                fput(&f, "}", 1);
            }
            if (!more || f.bad) break;
            sec = nx_he;
            k = nx_k;
        }
        fput(&f, "]", 1);
        set_doc(&f, d + ds, de - ds);
    }
    if (rc < 0) f.bad = 1;
    fput(&f, "}", 1);
    return !f.bad;
}

/* JSON text -> the body of a JSON string */
static void put_escaped(buf_t *b, const char *s, size_t n) {
    size_t extra = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') extra += 1;
        else if (ch < 0x20) extra += 5;
    }
    buf_reserve(b, n + extra + 1);
    char *o = b->p + b->len;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *o++ = (char)ch;
        } else if (ch >= 0x20) {
            *o++ = '\\';
            *o++ = (char)ch;
        } else {
            memcpy(o, "\\u00", 4);
            o[4] = "0123456789abcdef"[ch >> 4];
            o[5] = "0123456789abcdef"[ch & 15];
            o += 6;
        }
    }
    b->len = (size_t)(o - b->p);
}

/* One streamed chunk's head, up to where its delta or usage begins. */
static void put_chunk_head(buf_t *b, const char *id, const scan_t *sc) {
    buf_puts(b, "data: {\"id\":\"chatcmpl-mock-");
    buf_put(b, id, 16);
    buf_puts(b, "\",\"object\":\"chat.completion.chunk\",\"created\":");
    buf_putu(b, g_created);
    buf_puts(b, ",\"model\":\"");
    put_model(b, sc);
    buf_puts(b, "\",");
}

/* Length of the piece of escaped JSON text t[i..n) that starts at i: about 4 bytes, ending
 * neither inside an escape (a surrogate pair's two escapes stay together) nor inside a UTF-8
 * sequence. */
static size_t piece_len(const char *t, size_t n, size_t i) {
    size_t j = i;
    while (j < n && j - i < 4) {
        if (t[j] == '\\') {
            size_t e = j + 1 < n && t[j + 1] == 'u' ? 6 : 2;
            if (e == 6 && j + 12 <= n && (t[j + 2] == 'd' || t[j + 2] == 'D') &&
                t[j + 3] && strchr("89abAB", t[j + 3]) && t[j + 6] == '\\')
                e = 12;
            j = j + e < n ? j + e : n;
        } else {
            j++;
            while (j < n && ((unsigned char)t[j] & 0xC0) == 0x80) j++;
        }
    }
    return j - i;
}

/* The answer `text` (escaped JSON string content) as an event stream into w->body. */
static void build_chat_stream(worker_t *w, const char *id, const scan_t *sc, const char *text,
                              size_t n, uint64_t prompt, uint64_t completion) {
    buf_t *b = &w->body;
    b->len = 0;
    buf_reserve(b, 200 + n * 40);
    put_chunk_head(b, id, sc);
    buf_puts(b, "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                "\"logprobs\":null,\"finish_reason\":null}]}\n\n");
    for (size_t i = 0; i < n;) {
        size_t k = piece_len(text, n, i);
        put_chunk_head(b, id, sc);
        buf_puts(b, "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"");
        buf_put(b, text + i, k);
        buf_puts(b, "\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        i += k;
    }
    put_chunk_head(b, id, sc);
    buf_puts(b, "\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,"
                "\"finish_reason\":\"stop\"}]}\n\n");
    if (sc->include_usage) {
        put_chunk_head(b, id, sc);
        buf_puts(b, "\"choices\":[],\"usage\":{\"prompt_tokens\":");
        buf_putu(b, prompt);
        buf_puts(b, ",\"completion_tokens\":");
        buf_putu(b, completion);
        buf_puts(b, ",\"total_tokens\":");
        buf_putu(b, prompt + completion);
        buf_puts(b, "}}\n\n");
    }
    buf_puts(b, "data: [DONE]\n\n");
}

static void build_chat(worker_t *w, const char *body, size_t blen, const scan_t *sc) {
    int structured = sc->rf_off != SIZE_MAX && build_structured(w, body, blen, sc);
    buf_t *b = &w->body;
    b->len = 0;
    uint64_t prompt = blen / 4 + 1, completion = sc->content_len / 4 + 1;
    char hex[17];
    uint64_t h = fnv1a(body, blen);
    for (int i = 15; i >= 0; i--) {
        hex[i] = "0123456789abcdef"[h & 15];
        h >>= 4;
    }
    if (sc->stream) {
        buf_t *t = &w->text;
        t->len = 0;
        if (structured) {
            put_escaped(t, w->ans.p, w->ans.len);
            completion = t->len / 4 + 1;
        } else {
            buf_puts(t, "echo: ");
            buf_put(t, sc->content, sc->content_len);
        }
        build_chat_stream(w, hex, sc, t->p, t->len, prompt, completion);
        if (t->cap > (4u << 20)) buf_free(t);
        return;
    }
    buf_reserve(b, 320 + sc->content_len + sc->model_len + (structured ? w->ans.len : 0));
    buf_puts(b, "{\"id\":\"chatcmpl-mock-");
    buf_put(b, hex, 16);
    buf_puts(b, "\",\"object\":\"chat.completion\",\"created\":");
    buf_putu(b, g_created);
    buf_puts(b, ",\"model\":\"");
    put_model(b, sc);
    buf_puts(b, "\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"");
    if (structured) {
        size_t at = b->len;
        put_escaped(b, w->ans.p, w->ans.len);
        completion = (b->len - at) / 4 + 1;
        if (w->doc.cap > (4u << 20)) buf_free(&w->doc); /* a huge message: give it back */
    } else {
        buf_puts(b, "echo: ");
        buf_put(b, sc->content, sc->content_len);
    }
    buf_puts(b, "\"},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":");
    buf_putu(b, prompt);
    buf_puts(b, ",\"completion_tokens\":");
    buf_putu(b, completion);
    buf_puts(b, ",\"total_tokens\":");
    buf_putu(b, prompt + completion);
    buf_puts(b, "}}");
}

/* One vector of `dim` values in [-1, 1) from the input's hash: as JSON numbers with six
 * decimals, or (base64) as little-endian float32 bytes, as OpenAI's encoding_format does. */
static void put_embedding(buf_t *b, size_t index, const char *p, size_t n, int dim, int b64) {
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    buf_puts(b, "{\"object\":\"embedding\",\"index\":");
    buf_putu(b, index);
    buf_puts(b, b64 ? ",\"embedding\":\"" : ",\"embedding\":[");
    uint64_t h = fnv1a(p, n);
    unsigned char pend[3];
    int npend = 0;
    for (int d = 0; d < dim; d++) {
        double v = (double)(splitmix64(&h) >> 11) * 0x1.0p-53 * 2.0 - 1.0; /* [-1, 1) */
        int64_t m = (int64_t)(v * 1e6 + (v < 0 ? -0.5 : 0.5));
        if (b64) {
            float f = (float)((double)m / 1e6);
            unsigned char bytes[4];
            memcpy(bytes, &f, 4); /* x86-64 and aarch64: little-endian already */
            for (int k = 0; k < 4; k++) {
                pend[npend++] = bytes[k];
                if (npend == 3) {
                    char q[4] = {alphabet[pend[0] >> 2],
                                 alphabet[((pend[0] & 3) << 4) | (pend[1] >> 4)],
                                 alphabet[((pend[1] & 15) << 2) | (pend[2] >> 6)],
                                 alphabet[pend[2] & 63]};
                    buf_put(b, q, 4);
                    npend = 0;
                }
            }
            continue;
        }
        if (d) buf_puts(b, ",");
        if (m < 0) {
            buf_puts(b, "-");
            m = -m;
        }
        buf_putu(b, (uint64_t)(m / 1000000));
        char frac[8] = {'.'};
        int64_t f = m % 1000000;
        for (int k = 6; k >= 1; k--) {
            frac[k] = (char)('0' + f % 10);
            f /= 10;
        }
        buf_put(b, frac, 7);
    }
    if (b64) {
        if (npend) {
            unsigned char b1 = npend > 1 ? pend[1] : 0;
            char q[4] = {alphabet[pend[0] >> 2], alphabet[((pend[0] & 3) << 4) | (b1 >> 4)],
                         npend > 1 ? alphabet[(b1 & 15) << 2] : '=', '='};
            buf_put(b, q, 4);
        }
        buf_puts(b, "\"}");
    } else {
        buf_puts(b, "]}");
    }
}

/* One embedding per input: a string gives one, an array gives one per element. */
static void build_embeddings(worker_t *w, const char *body, size_t blen, const scan_t *sc) {
    buf_t *b = &w->body;
    b->len = 0;
    int dim = sc->dimensions ? sc->dimensions : cfg.embed_dim, b64 = sc->base64;
    buf_puts(b, "{\"object\":\"list\",\"data\":[");
    size_t i = sc->input_off;
    if (i >= blen) {
        put_embedding(b, 0, body, blen, dim, b64);
    } else if (body[i] == '[') {
        size_t n = 0;
        i = skip_ws(body, blen, i + 1);
        while (i < blen && body[i] != ']' && n < MAX_EMBED_INPUTS) {
            size_t e = skip_value(body, blen, i);
            if (e <= i) break;
            if (n) buf_puts(b, ",");
            put_embedding(b, n++, body + i, e - i, dim, b64);
            i = skip_ws(body, blen, e);
            if (i < blen && body[i] == ',') i = skip_ws(body, blen, i + 1);
        }
        if (n == 0)
            put_embedding(b, 0, body + sc->input_off, blen - sc->input_off < 2 ? 1 : 2, dim, b64);
    } else {
        size_t e = skip_value(body, blen, i);
        put_embedding(b, 0, body + i, e - i, dim, b64);
    }
    uint64_t prompt = blen / 4 + 1;
    buf_puts(b, "],\"model\":\"");
    put_model(b, sc);
    buf_puts(b, "\",\"usage\":{\"prompt_tokens\":");
    buf_putu(b, prompt);
    buf_puts(b, ",\"total_tokens\":");
    buf_putu(b, prompt);
    buf_puts(b, "}}");
}

static void build_stats(worker_t *w) {
    buf_t *b = &w->body;
    b->len = 0;
#define FIELD(name, val) do { buf_puts(b, name); buf_putu(b, (uint64_t)(val)); } while (0)
    FIELD("{\"requests\":", LOAD(st_requests));
    FIELD(",\"responses_200\":", LOAD(st_200));
    FIELD(",\"responses_429\":", LOAD(st_429));
    FIELD(",\"faults\":", LOAD(st_faults));
    FIELD(",\"open_connections\":", LOAD(st_open));
    FIELD(",\"max_open_connections\":", LOAD(st_max_open));
    FIELD(",\"responses_other\":", LOAD(st_other));
    FIELD(",\"faults_fail\":", LOAD(st_fail));
    FIELD(",\"faults_drop\":", LOAD(st_drop));
    FIELD(",\"faults_truncate\":", LOAD(st_truncate));
    FIELD(",\"faults_stall\":", LOAD(st_stall));
    FIELD(",\"threads\":", cfg.threads);
    buf_puts(b, "}");
#undef FIELD
}

/* ---------------------------------------------------------- request parse */

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
} req_t;

static int ieq(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n != m) return 0;
    for (size_t i = 0; i < n; i++)
        if (tolower((unsigned char)a[i]) != lit[i]) return 0;
    return 1;
}

static int icontains(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    for (size_t i = 0; i + m <= n; i++)
        if (ieq(a + i, m, lit)) return 1;
    return 0;
}

/* p[0..hlen) is the head including the final CRLFCRLF. Returns 0 or -1 (malformed). */
static int parse_head(const char *p, size_t hlen, req_t *r) {
    memset(r, 0, sizeof *r);
    const char *end = p + hlen - 2; /* points at the final CRLF */
    const char *eol = memchr(p, '\r', (size_t)(end - p) + 1);
    if (!eol) return -1;
    const char *sp1 = memchr(p, ' ', (size_t)(eol - p));
    if (!sp1) return -1;
    const char *sp2 = memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1));
    if (!sp2) return -1;
    r->method = p;
    r->method_len = (size_t)(sp1 - p);
    r->path = sp1 + 1;
    r->path_len = (size_t)(sp2 - sp1 - 1);
    const char *qm = memchr(r->path, '?', r->path_len);
    if (qm) r->path_len = (size_t)(qm - r->path);
    const char *ver = sp2 + 1;
    size_t vlen = (size_t)(eol - ver);
    if (vlen != 8 || memcmp(ver, "HTTP/1.", 7) != 0) return -1;
    int http11 = ver[7] == '1';
    int conn_close = 0, conn_keep = 0;
    const char *line = eol + 2;
    while (line < end) {
        const char *le = memchr(line, '\r', (size_t)(end - line) + 1);
        if (!le) return -1;
        const char *colon = memchr(line, ':', (size_t)(le - line));
        if (colon) {
            size_t nlen = (size_t)(colon - line);
            const char *v = colon + 1;
            while (v < le && (*v == ' ' || *v == '\t')) v++;
            size_t vl = (size_t)(le - v);
            while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t')) vl--;
            if (ieq(line, nlen, "content-length")) {
                size_t cl = 0;
                if (!vl) r->bad_length = 1;
                for (size_t i = 0; i < vl; i++) {
                    if (v[i] < '0' || v[i] > '9' || cl > MAX_BODY_BYTES) {
                        r->bad_length = 1;
                        break;
                    }
                    cl = cl * 10 + (size_t)(v[i] - '0');
                }
                r->content_length = cl;
            } else if (ieq(line, nlen, "transfer-encoding")) {
                if (!ieq(v, vl, "identity")) r->chunked = 1;
            } else if (ieq(line, nlen, "connection")) {
                if (icontains(v, vl, "close")) conn_close = 1;
                if (icontains(v, vl, "keep-alive")) conn_keep = 1;
            } else if (ieq(line, nlen, "expect")) {
                if (ieq(v, vl, "100-continue")) r->expect_continue = 1;
            }
        }
        line = le + 2;
    }
    r->keep_alive = http11 ? !conn_close : (conn_keep && !conn_close);
    return 0;
}

static int path_ends(const req_t *r, const char *suffix) {
    size_t n = strlen(suffix);
    return r->path_len >= n && memcmp(r->path + r->path_len - n, suffix, n) == 0;
}

/* --------------------------------------------------------- request handling */

static void handle_request(worker_t *w, conn_t *c, const req_t *r, const char *body,
                           size_t blen) {
    int is_post = r->method_len == 4 && memcmp(r->method, "POST", 4) == 0;
    if (r->path_len == 7 && memcmp(r->path, "/_stats", 7) == 0) {
        build_stats(w); /* not counted as a request or a response */
        size_t start = c->out.len;
        put_response(c, 200, NULL, w->body.p, w->body.len, r->keep_alive);
        enqueue(w, c, c->out.len - start, 0, 0, r->keep_alive ? P_SEND : P_SEND_CLOSE);
        return;
    }
    if (r->path_len == 10 && memcmp(r->path, "/_timeline", 10) == 0) {
        build_timeline(&w->body);
        size_t start = c->out.len;
        put_response(c, 200, NULL, w->body.p, w->body.len, r->keep_alive);
        enqueue(w, c, c->out.len - start, 0, 0, r->keep_alive ? P_SEND : P_SEND_CLOSE);
        return;
    }
    INC(st_requests);
    timeline_start(w->now);
    int chat = path_ends(r, "/chat/completions");
    int emb = !chat && path_ends(r, "/embeddings");
    if (!chat && !emb) {
        respond_error_now(w, c, 404, "Unknown path.", r->keep_alive);
        return;
    }
    if (!is_post) {
        respond_error_now(w, c, 405, "Method not allowed; use POST.", r->keep_alive);
        return;
    }

    /* the bare limiter: 429, no headers, a short body like nginx's */
    if (!bare_take(w->now)) {
        static const char page[] = "<html><head><title>429 Too Many Requests</title></head>"
                                   "<body><center><h1>429 Too Many Requests</h1></center>"
                                   "</body></html>\n";
        w->body.len = 0;
        buf_put(&w->body, page, sizeof page - 1);
        respond_now(w, c, 429, NULL, r->keep_alive);
        return;
    }

    /* rate limits */
    w->hdrs.len = 0;
    int which = 0;
    uint64_t retry = ratelimit_take(w->now, blen, &w->hdrs, &which);
    if (retry) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "Rate limit reached for %s (mock). Please try again in %llums.",
                 which & 1 ? "requests" : "tokens", (unsigned long long)retry);
        put_error_body(&w->body, msg, which & 1 ? "requests" : "tokens", "rate_limit_exceeded");
        respond_now(w, c, 429, &w->hdrs, r->keep_alive);
        return;
    }

    /* faults: one draw, disjoint intervals, so each rate is exact */
    enum { F_NONE, F_FAIL, F_DROP, F_TRUNC, F_STALL } fault = F_NONE;
    if (cfg.fail_rate + cfg.drop_rate + cfg.truncate_rate + cfg.stall_rate > 0) {
        double u = rng_unit(&w->rng_fault), acc = cfg.fail_rate;
        if (u < acc) fault = F_FAIL;
        else if (u < (acc += cfg.drop_rate)) fault = F_DROP;
        else if (u < (acc += cfg.truncate_rate)) fault = F_TRUNC;
        else if (u < (acc += cfg.stall_rate)) fault = F_STALL;
    }
    if (fault != F_NONE) INC(st_faults);
    if (fault == F_DROP) {
        INC(st_drop);
        c->want_close = CLOSE_ABORT;
        return;
    }
    if (fault == F_STALL) {
        INC(st_stall);
        enqueue(w, c, 0, w->now + (uint64_t)(cfg.stall_timeout_ms * 1e6), 0, P_STALL);
        return;
    }

    int status = 200;
    if (fault == F_FAIL) {
        INC(st_fail);
        status = (w->fail_toggle++ & 1) ? 503 : 500;
        put_error_body(&w->body,
                       status == 500 ? "The server had an error while processing your request."
                                     : "The engine is currently overloaded, please try again later.",
                       "server_error", NULL);
    }
    int streamed = 0;
    if (fault != F_FAIL) {
        scan_t sc;
        scan_body(body, blen, &sc);
        streamed = chat && sc.stream;
        if (chat) build_chat(w, body, blen, &sc);
        else build_embeddings(w, body, blen, &sc);
    }
    int keep = r->keep_alive && fault != F_TRUNC;
    size_t start = c->out.len;
    size_t hlen = put_response_typed(c, status, status == 200 ? &w->hdrs : NULL, w->body.p,
                                     w->body.len, keep,
                                     streamed ? "text/event-stream" : "application/json");
    if (fault == F_TRUNC) {
        INC(st_truncate);
        c->out.len = start + hlen + w->body.len / 2;
        status = 0; /* counted as a fault, not as a 200 */
    }
    double ms = cfg.latency_ms;
    if (cfg.jitter_ms > 0) ms += (2.0 * rng_unit(&w->rng_jitter) - 1.0) * cfg.jitter_ms;
    uint64_t delay = ms > 0 ? (uint64_t)(ms * 1e6) : 0;
    enqueue(w, c, c->out.len - start, w->now + delay, status, keep ? P_SEND : P_SEND_CLOSE);
}

/* Parses and handles complete requests from buf; returns the bytes consumed. */
static size_t process(worker_t *w, conn_t *c, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len && can_parse(c)) {
        const char *p = buf + off;
        size_t avail = len - off;
        const char *eoh = memmem(p, avail, "\r\n\r\n", 4);
        if (!eoh) {
            if (avail > MAX_HEADER_BYTES)
                respond_error_now(w, c, 431, "Request head too large.", 0);
            break;
        }
        size_t hlen = (size_t)(eoh - p) + 4;
        req_t r;
        if (parse_head(p, hlen, &r) != 0 || r.bad_length) {
            respond_error_now(w, c, 400, "Malformed request.", 0);
            break;
        }
        if (r.chunked) {
            respond_error_now(w, c, 411, "Chunked request bodies are not supported; send Content-Length.", 0);
            break;
        }
        if (r.content_length > MAX_BODY_BYTES) {
            respond_error_now(w, c, 413, "Request body too large.", 0);
            break;
        }
        if (avail - hlen < r.content_length) {
            if (r.expect_continue && !c->continue_sent) {
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                buf_put(&c->out, cont, sizeof cont - 1);
                enqueue(w, c, sizeof cont - 1, 0, 0, P_SEND);
                c->continue_sent = 1;
            }
            break;
        }
        c->continue_sent = 0;
        handle_request(w, c, &r, p + hlen, r.content_length);
        off += hlen + r.content_length;
    }
    return off;
}

static void consume_in(worker_t *w, conn_t *c) {
    if (c->in.len == 0) return;
    size_t used = process(w, c, c->in.p, c->in.len);
    if (used == 0) return;
    memmove(c->in.p, c->in.p + used, c->in.len - used);
    c->in.len -= used;
    if (c->in.len == 0 && c->in.cap > 65536) buf_free(&c->in);
}

static void conn_flush(conn_t *c) {
    while (c->out_off < c->out_ready) {
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out_ready - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return; /* EPOLLOUT resumes */
        c->want_close = CLOSE_ABORT;
        return;
    }
    if (c->out_off == c->out.len) {
        c->out_off = c->out_ready = c->out.len = 0;
        if (c->out.cap > 65536) buf_free(&c->out);
        if (c->closing && !c->want_close) c->want_close = CLOSE_GRACEFUL;
    } else if (c->out_off > 0) {
        memmove(c->out.p, c->out.p + c->out_off, c->out.len - c->out_off);
        c->out.len -= c->out_off;
        c->out_ready -= c->out_off;
        c->out_off = 0;
    }
}

static void conn_read(worker_t *w, conn_t *c, uint32_t ev) {
    for (;;) {
        ssize_t n = recv(c->fd, w->scratch, SCRATCH_SIZE, 0);
        if (n > 0) {
            if (c->in.len == 0 && can_parse(c)) {
                size_t used = process(w, c, w->scratch, (size_t)n);
                if (used < (size_t)n && !c->want_close)
                    buf_put(&c->in, w->scratch + used, (size_t)n - used);
            } else {
                if (c->in.len + (size_t)n > MAX_INBUF) {
                    c->want_close = CLOSE_ABORT;
                    return;
                }
                buf_put(&c->in, w->scratch, (size_t)n);
                if (can_parse(c)) consume_in(w, c);
            }
            if (c->want_close == CLOSE_ABORT) return;
            /* a short read drained the socket; without RDHUP no EOF is waiting */
            if ((size_t)n < SCRATCH_SIZE && !(ev & EPOLLRDHUP)) break;
            continue;
        }
        if (n == 0) { /* peer closed: answer what is ready, then go */
            conn_flush(c);
            c->want_close = CLOSE_ABORT;
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        c->want_close = CLOSE_ABORT;
        return;
    }
    conn_flush(c);
}

/* The deadline at the head of a connection's queue passed. */
static void conn_fire(worker_t *w, conn_t *c) {
    release_due(w, c);
    conn_flush(c);
    if (can_parse(c) && c->in.len) {
        consume_in(w, c);
        conn_flush(c);
    }
}

static void on_accept(worker_t *w) {
    for (;;) {
        int fd = accept4(w->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if ((errno == EMFILE || errno == ENFILE) && w->reserve_fd >= 0) {
                /* out of descriptors: shed one connection so the backlog moves */
                close(w->reserve_fd);
                int s = accept(w->lfd, NULL, NULL);
                if (s >= 0) close(s);
                w->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                if (s >= 0) continue;
                return;
            }
            perror("mockserver: accept");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        if (!c) die_oom();
        c->fd = fd;
        c->heap_idx = HEAP_NONE;
        c->next = w->conns;
        if (w->conns) w->conns->prev = c;
        w->conns = c;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                 .data.ptr = c};
        int64_t open_now = atomic_fetch_add_explicit(&st_open, 1, memory_order_relaxed) + 1;
        int64_t mx = LOAD(st_max_open);
        while (open_now > mx &&
               !atomic_compare_exchange_weak_explicit(&st_max_open, &mx, open_now,
                                                      memory_order_relaxed, memory_order_relaxed)) {
        }
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
            perror("mockserver: epoll_ctl");
            c->want_close = CLOSE_ABORT;
            conn_close(w, c);
        }
    }
}

static int wait_events(worker_t *w, struct epoll_event *evs) {
    if (w->heap_len == 0) return epoll_wait(w->epfd, evs, MAX_EVENTS, -1);
    uint64_t now = now_ns(), d = w->heap[0]->deadline;
    uint64_t left = d > now ? d - now : 0;
#ifdef SYS_epoll_pwait2
    static _Atomic int no_pwait2;
    if (!LOAD(no_pwait2)) {
        struct timespec ts = {.tv_sec = (time_t)(left / 1000000000ull),
                              .tv_nsec = (long)(left % 1000000000ull)};
        long n = syscall(SYS_epoll_pwait2, w->epfd, evs, MAX_EVENTS, &ts, NULL, (size_t)0);
        if (n >= 0 || errno != ENOSYS) return (int)n;
        atomic_store(&no_pwait2, 1);
    }
#endif
    return epoll_wait(w->epfd, evs, MAX_EVENTS, (int)((left + 999999) / 1000000));
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    struct epoll_event *evs = calloc(MAX_EVENTS, sizeof *evs);
    if (!evs) die_oom();
    for (;;) {
        int n = wait_events(w, evs);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("mockserver: epoll_wait");
            break;
        }
        w->now = now_ns();
        int stop = 0;
        for (int i = 0; i < n; i++) {
            void *tag = evs[i].data.ptr;
            if (tag == &TAG_LISTEN) {
                on_accept(w);
            } else if (tag == &TAG_STOP) {
                stop = 1;
            } else {
                conn_t *c = tag;
                uint32_t ev = evs[i].events;
                if (ev & (EPOLLERR | EPOLLHUP)) {
                    c->want_close = CLOSE_ABORT;
                } else {
                    if (ev & (EPOLLIN | EPOLLRDHUP)) conn_read(w, c, ev);
                    if (!c->want_close && (ev & EPOLLOUT)) conn_flush(c);
                }
                if (c->want_close) conn_close(w, c);
            }
        }
        if (stop) break;
        w->now = now_ns();
        while (w->heap_len && w->heap[0]->deadline <= w->now) {
            conn_t *c = w->heap[0];
            conn_fire(w, c);
            if (c->want_close) conn_close(w, c);
        }
    }
    free(evs);
    while (w->conns) {
        w->conns->want_close = CLOSE_ABORT;
        conn_close(w, w->conns);
    }
    return NULL;
}

/* ------------------------------------------------------------------- setup */

static void usage(FILE *f) {
    fputs("usage: mockserver [options]\n"
          "  --host ADDR            127.x.x.x address to listen on (default 127.0.0.1)\n"
          "  --port N               port, 0 = ephemeral (default 0); prints 'PORT <n>'\n"
          "  --threads N            worker threads (default 1)\n"
          "  --latency-ms MS        mean response delay (default 0)\n"
          "  --jitter-ms MS         uniform jitter: delay in [MEAN-J, MEAN+J], clamped at 0\n"
          "  --rpm N / --tpm N      token-bucket rate limits (429 when exceeded)\n"
          "  --bare-rate R          a limiter answering bare 429s (no headers) above R req/s\n"
          "  --bare-burst B         its bucket size (default 20)\n"
          "  --bare-halve-at S      halve its rate S seconds after the first request...\n"
          "  --bare-restore-at S    ...and restore it at S seconds\n"
          "  --fail-rate P          reply 500/503 (alternating) with probability P\n"
          "  --drop-rate P          close the connection after reading the request\n"
          "  --truncate-rate P      send headers and half of the body, then close\n"
          "  --stall-rate P         never answer; close after --stall-timeout-ms\n"
          "  --stall-timeout-ms MS  (default 60000)\n"
          "  --seed N               PRNG seed for faults and jitter (default 42)\n"
          "  --stdin-watch          exit when stdin reaches EOF\n"
          "  --embed-dim N          embedding length when a request has no \"dimensions\" (default 8)\n"
          "\n"
          "POST .../embeddings answers one vector per input (a string, or each element of an\n"
          "array), hashed from the input's JSON bytes: values in [-1, 1) with six decimals;\n"
          "\"encoding_format\":\"base64\" gives them as base64 little-endian float32.\n"
          "POST .../chat/completions answers \"echo: <the last content string>\", unless the body has\n"
          "response_format {\"type\":\"json_schema\",\"json_schema\":{\"schema\":S,...}} or\n"
          "{\"type\":\"json_object\",\"schema\":S}: then the message content is a JSON object shaped\n"
          "by S (as a JSON string); {\"type\":\"json_object\"} alone gets {\"answer\":<string value>}.\n"
          "  document   the last user message's text (a string content, or its first text part),\n"
          "             JSON-unescaped to UTF-8 (\\uXXXX pairs joined, lone surrogates kept as\n"
          "             3 bytes). Lines 'Document <k>:' (k = 1-9 digits) open numbered sections,\n"
          "             each running to the next such line or the end; else the text after a\n"
          "             line 'Document:'; else the whole message. Section and 'Document:' texts\n"
          "             lose trailing spaces, tabs, CRs and LFs; the whole message is kept as is.\n"
          "  batch      with sections, an object S whose first array-of-objects property is answered\n"
          "             with one item per section, in order; an integer \"id\" of an item is the\n"
          "             section's k, its other values come from the section's text. Everything\n"
          "             else (other properties; any S when there are no sections) is filled once\n"
          "             from the first section / the document.\n"
          "  values     string: \"NAME:HHHHHHHH\", NAME the property's name (an array's items use the\n"
          "             array's name; \"answer\" at the top), H the 32-bit FNV-1a of the text's\n"
          "             UTF-8 bytes in lowercase hex; integer: the text's byte length; number:\n"
          "             that as N.0; boolean: true; null: null; enum: its first value; const: it;\n"
          "             object: every property in order (required or not); array: [one item].\n"
          "             A type list takes its first non-null type; $ref #, #/$defs/X and\n"
          "             #/definitions/X are followed, anyOf/oneOf/allOf take their first\n"
          "             non-null alternative; no type at all is a string.\n"
          "  otherwise  an unsupported or malformed schema, depth over 32, or an answer over 1 MiB\n"
          "             gets the echo. Usage: prompt_tokens = body bytes/4 + 1 as always;\n"
          "             completion_tokens = the escaped answer's bytes/4 + 1.\n",
          f);
}

static double parse_num(const char *opt, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "mockserver: bad value for --%s: %s (want %g..%g)\n", opt, s, lo, hi);
        exit(2);
    }
    return v;
}

static void parse_args(int argc, char **argv) {
    enum { OPT_HOST = 1, OPT_PORT, OPT_THREADS, OPT_LAT, OPT_JIT, OPT_RPM, OPT_TPM, OPT_FAIL, OPT_DROP,
           OPT_TRUNC, OPT_STALL, OPT_STALL_T, OPT_SEED, OPT_STDIN, OPT_EMBED_DIM, OPT_HELP,
           OPT_BARE_RATE, OPT_BARE_BURST, OPT_BARE_HALVE, OPT_BARE_RESTORE };
    static const struct option opts[] = {
        {"host", required_argument, 0, OPT_HOST},
        {"port", required_argument, 0, OPT_PORT},
        {"threads", required_argument, 0, OPT_THREADS},
        {"latency-ms", required_argument, 0, OPT_LAT},
        {"jitter-ms", required_argument, 0, OPT_JIT},
        {"rpm", required_argument, 0, OPT_RPM},
        {"tpm", required_argument, 0, OPT_TPM},
        {"fail-rate", required_argument, 0, OPT_FAIL},
        {"drop-rate", required_argument, 0, OPT_DROP},
        {"truncate-rate", required_argument, 0, OPT_TRUNC},
        {"stall-rate", required_argument, 0, OPT_STALL},
        {"stall-timeout-ms", required_argument, 0, OPT_STALL_T},
        {"seed", required_argument, 0, OPT_SEED},
        {"stdin-watch", no_argument, 0, OPT_STDIN},
        {"embed-dim", required_argument, 0, OPT_EMBED_DIM},
        {"help", no_argument, 0, OPT_HELP},
        {"bare-rate", required_argument, 0, OPT_BARE_RATE},
        {"bare-burst", required_argument, 0, OPT_BARE_BURST},
        {"bare-halve-at", required_argument, 0, OPT_BARE_HALVE},
        {"bare-restore-at", required_argument, 0, OPT_BARE_RESTORE},
        {0, 0, 0, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case OPT_HOST: {
            const char *h = strcmp(optarg, "localhost") == 0 ? "127.0.0.1" : optarg;
            struct in_addr a;
            if (strlen(h) >= sizeof cfg.host || inet_pton(AF_INET, h, &a) != 1 ||
                (ntohl(a.s_addr) >> 24) != 127) {
                fprintf(stderr, "mockserver: --host must be a 127.x.x.x address\n");
                exit(2);
            }
            snprintf(cfg.host, sizeof cfg.host, "%s", h);
            break;
        }
        case OPT_PORT: cfg.port = (int)parse_num("port", optarg, 0, 65535); break;
        case OPT_THREADS: cfg.threads = (int)parse_num("threads", optarg, 1, 256); break;
        case OPT_LAT: cfg.latency_ms = parse_num("latency-ms", optarg, 0, 3.6e6); break;
        case OPT_JIT: cfg.jitter_ms = parse_num("jitter-ms", optarg, 0, 3.6e6); break;
        case OPT_RPM: cfg.rpm = parse_num("rpm", optarg, 0, 1e12); break;
        case OPT_TPM: cfg.tpm = parse_num("tpm", optarg, 0, 1e15); break;
        case OPT_FAIL: cfg.fail_rate = parse_num("fail-rate", optarg, 0, 1); break;
        case OPT_DROP: cfg.drop_rate = parse_num("drop-rate", optarg, 0, 1); break;
        case OPT_TRUNC: cfg.truncate_rate = parse_num("truncate-rate", optarg, 0, 1); break;
        case OPT_STALL: cfg.stall_rate = parse_num("stall-rate", optarg, 0, 1); break;
        case OPT_STALL_T: cfg.stall_timeout_ms = parse_num("stall-timeout-ms", optarg, 0, 3.6e6); break;
        case OPT_SEED: cfg.seed = (uint64_t)strtoull(optarg, NULL, 0); break;
        case OPT_STDIN: cfg.stdin_watch = 1; break;
        case OPT_EMBED_DIM: cfg.embed_dim = (int)parse_num("embed-dim", optarg, 1, MAX_EMBED_DIM); break;
        case OPT_HELP: usage(stdout); exit(0);
        case OPT_BARE_RATE: cfg.bare_rate = parse_num("bare-rate", optarg, 0, 1e9); break;
        case OPT_BARE_BURST: cfg.bare_burst = parse_num("bare-burst", optarg, 1, 1e9); break;
        case OPT_BARE_HALVE: cfg.bare_halve_at = parse_num("bare-halve-at", optarg, 0, 1e6); break;
        case OPT_BARE_RESTORE:
            cfg.bare_restore_at = parse_num("bare-restore-at", optarg, 0, 1e6);
            break;
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc) {
        usage(stderr);
        exit(2);
    }
    if (cfg.fail_rate + cfg.drop_rate + cfg.truncate_rate + cfg.stall_rate > 1.0 + 1e-9) {
        fprintf(stderr, "mockserver: fault rates add up to more than 1\n");
        exit(2);
    }
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < NOFILE_WANT) {
        /* a privileged process may lift the hard limit a little; fine if not */
        struct rlimit more = {NOFILE_WANT, NOFILE_WANT};
        if (setrlimit(RLIMIT_NOFILE, &more) == 0) return;
    }
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

static int make_listener(const struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("mockserver: socket");
        exit(1);
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (cfg.threads > 1) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) != 0) {
        perror("mockserver: bind");
        exit(1);
    }
    if (listen(fd, 65535) != 0) {
        perror("mockserver: listen");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    /* keep 0/1/2 occupied so a socket never lands on them */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) < 0)
            return 1;
    parse_args(argc, argv);
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, SIG_DFL); /* a shell may start background jobs with SIGINT ignored */
    signal(SIGTERM, SIG_DFL);

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* inherited by the workers */
    int sfd = signalfd(-1, &sigs, SFD_CLOEXEC);
    if (sfd < 0) {
        perror("mockserver: signalfd");
        return 1;
    }

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cfg.port)};
    inet_pton(AF_INET, cfg.host, &addr.sin_addr);

    g_created = (uint64_t)time(NULL);
    uint64_t t0 = now_ns();
    bucket_init(&rl_req, cfg.rpm, t0);
    bucket_init(&rl_tok, cfg.tpm, t0);

    worker_t *ws = calloc((size_t)cfg.threads, sizeof *ws);
    if (!ws) die_oom();
    for (int i = 0; i < cfg.threads; i++) {
        worker_t *w = &ws[i];
        w->idx = i;
        w->lfd = make_listener(&addr);
        if (i == 0 && cfg.port == 0) { /* the others join the port the first one got */
            socklen_t al = sizeof addr;
            getsockname(w->lfd, (struct sockaddr *)&addr, &al);
        }
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        w->scratch = malloc(SCRATCH_SIZE);
        if (w->epfd < 0 || w->evfd < 0 || !w->scratch) {
            perror("mockserver: setup");
            return 1;
        }
        struct epoll_event le = {.events = EPOLLIN | EPOLLET, .data.ptr = &TAG_LISTEN};
        struct epoll_event se = {.events = EPOLLIN, .data.ptr = &TAG_STOP};
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->lfd, &le);
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->evfd, &se);
        rng_seed(&w->rng_fault, cfg.seed + 0x1000u * (uint64_t)i);
        rng_seed(&w->rng_jitter, ~cfg.seed + 0x1000u * (uint64_t)i);
    }
    printf("PORT %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (int i = 0; i < cfg.threads; i++) {
        if (pthread_create(&ws[i].th, NULL, worker_main, &ws[i]) != 0) {
            perror("mockserver: pthread_create");
            return 1;
        }
    }

    /* main thread: wait for a signal or stdin EOF */
    struct pollfd pf[2] = {{.fd = sfd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        int n = poll(pf, cfg.stdin_watch ? 2 : 1, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (pf[0].revents) break;
        if (cfg.stdin_watch && pf[1].revents) {
            char b[4096];
            ssize_t r = read(0, b, sizeof b);
            if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) break;
            if (pf[1].revents & (POLLNVAL | POLLERR)) break;
        }
    }

    uint64_t one = 1;
    for (int i = 0; i < cfg.threads; i++)
        if (write(ws[i].evfd, &one, sizeof one) < 0) perror("mockserver: eventfd");
    for (int i = 0; i < cfg.threads; i++) {
        worker_t *w = &ws[i];
        pthread_join(w->th, NULL);
        close(w->lfd);
        close(w->epfd);
        close(w->evfd);
        if (w->reserve_fd >= 0) close(w->reserve_fd);
        free(w->scratch);
        free(w->heap);
        buf_free(&w->body);
        buf_free(&w->hdrs);
        buf_free(&w->doc);
        buf_free(&w->ans);
        buf_free(&w->text);
    }
    free(ws);
    close(sfd);
    return 0;
}
