/* limits.c - what makes the mock answer 429: the --rpm/--tpm/--embed-tpm token buckets (with
 * OpenAI's x-ratelimit-* headers and retry-after-ms), the bare-429 limiter (--bare-*: no headers at
 * all), and the per-100-ms counts of 200s and 429s behind GET /_timeline. */
#include "mock.h"

/* ------------------------------------------------------------ rate limits */

typedef struct {
    int on;
    double limit;       /* per minute */
    double per_ns;      /* refill rate */
    double cap;         /* one second's worth, at least 1 */
    double tokens;
    uint64_t last;
} bucket_t;

static bucket_t rl_req, rl_tok, rl_etok; /* rl_etok: --embed-tpm */
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

/* Anthropic's words: anthropic-ratelimit-<what>-{limit,remaining,reset}, the reset as an
 * RFC 3339 date-time (UTC, milliseconds) reset_ms from now. */
static void put_rl_headers_anthropic(buf_t *h, const char *what, const bucket_t *b,
                                     int exceeded, uint64_t reset_ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000 + reset_ms;
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char date[40];
    size_t n = strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(date + n, sizeof date - n, ".%03uZ", (unsigned)(ms % 1000));
    buf_puts(h, "anthropic-ratelimit-");
    buf_puts(h, what);
    buf_puts(h, "-limit: ");
    buf_putu(h, (uint64_t)b->limit);
    buf_puts(h, "\r\nanthropic-ratelimit-");
    buf_puts(h, what);
    buf_puts(h, "-remaining: ");
    buf_putu(h, exceeded || b->tokens < 0 ? 0 : (uint64_t)b->tokens);
    buf_puts(h, "\r\nanthropic-ratelimit-");
    buf_puts(h, what);
    buf_puts(h, "-reset: ");
    buf_puts(h, date);
    buf_puts(h, "\r\n");
}

static void put_rl_headers(buf_t *h, const char *what, const bucket_t *b, int exceeded,
                           uint64_t reset_ms, int dialect) {
    if (dialect == D_GEMINI)
        return;  /* Gemini's API sends no rate-limit headers */
    if (dialect == D_ANTHROPIC) {
        put_rl_headers_anthropic(h, what, b, exceeded, reset_ms);
        return;
    }
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
 * ms, with *which = 1 (requests), 2 (tokens) or 3 (both). With --tpm-usage the body's
 * tokens are the prompt's; the completion's follow (ratelimit_charge).
 */
uint64_t ratelimit_take(uint64_t now, size_t body_len, buf_t *hdrs, int *which, int dialect,
                        int embed) {
    *which = 0;
    bucket_t *tok = embed && rl_etok.on ? &rl_etok : &rl_tok;
    if (!rl_req.on && !tok->on) return 0;
    pthread_mutex_lock(&rl_mu);
    double tcost = (double)(body_len / 4);
    uint64_t wreq = 0, wtok = 0;
    if (rl_req.on) {
        bucket_refill(&rl_req, now);
        wreq = bucket_wait_ms(&rl_req, 1.0);
    }
    if (tok->on) {
        bucket_refill(tok, now);
        if (tcost > tok->cap) tcost = tok->cap; /* else it could never pass */
        wtok = bucket_wait_ms(tok, tcost);
    }
    uint64_t retry = wreq > wtok ? wreq : wtok;
    if (retry == 0) {
        if (rl_req.on) rl_req.tokens -= 1.0;
        if (tok->on) tok->tokens -= tcost;
    }
    /* headers: on success the reset is the time until the bucket is full again */
    if (rl_req.on) {
        uint64_t reset = wreq;
        if (!retry) reset = ceil_u64((rl_req.cap - rl_req.tokens) / rl_req.per_ns / 1e6);
        put_rl_headers(hdrs, "requests", &rl_req, wreq > 0, reset, dialect);
    }
    if (tok->on) {
        uint64_t reset = wtok;
        if (!retry) reset = ceil_u64((tok->cap - tok->tokens) / tok->per_ns / 1e6);
        put_rl_headers(hdrs, "tokens", tok, wtok > 0, reset, dialect);
    }
    pthread_mutex_unlock(&rl_mu);
    if (retry) {
        *which = (wreq ? 1 : 0) | (wtok ? 2 : 0);
        if (dialect == D_OPENAI) {
            buf_puts(hdrs, "retry-after-ms: ");
            buf_putu(hdrs, retry);
            buf_puts(hdrs, "\r\n");
        } else if (dialect == D_ANTHROPIC) {  /* whole seconds, as Anthropic sends it */
            buf_puts(hdrs, "retry-after: ");
            buf_putu(hdrs, (retry + 999) / 1000);
            buf_puts(hdrs, "\r\n");
        }
    }
    return retry;
}

void ratelimit_charge(uint64_t now, uint64_t tokens, int embed) {
    bucket_t *tok = embed && rl_etok.on ? &rl_etok : &rl_tok;
    if (!cfg.tpm_usage || !tok->on || !tokens) return;
    pthread_mutex_lock(&rl_mu);
    bucket_refill(tok, now);
    tok->tokens -= (double)tokens;
    pthread_mutex_unlock(&rl_mu);
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

void timeline_start(uint64_t now) {
    uint64_t zero = 0;
    atomic_compare_exchange_strong(&tl_first_ns, &zero, now);
}

void timeline_count(int status) {
    uint64_t first = atomic_load(&tl_first_ns);
    if (!first || (status != 200 && status != 429)) return;
    uint64_t now = now_ns();
    uint64_t slot = now > first ? (now - first) / TL_SLOT_NS : 0;
    if (slot >= TL_SLOTS) return;
    atomic_fetch_add(status == 200 ? &tl_200[slot] : &tl_429[slot], 1);
}

/* 1 if the request may pass the bare limiter (always, when it is off). */
int bare_take(uint64_t now) {
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

void build_timeline(buf_t *b) {
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

void limits_init(uint64_t now) {
    bucket_init(&rl_req, cfg.rpm, now);
    bucket_init(&rl_tok, cfg.tpm, now);
    bucket_init(&rl_etok, cfg.embed_tpm, now);
}
