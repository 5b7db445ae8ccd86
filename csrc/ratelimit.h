/* ratelimit.h — the arithmetic of admission control, free of threads and I/O.
 *
 *   sx_bucket   a token bucket: requests/min or tokens/min, refilled continuously.
 *   sx_window   the adaptive in-flight window (AIMD): halve on congestion (429, timeout),
 *               grow back on success, never above the user's cap.
 *   sx_backoff  exponential backoff with full jitter, never sooner than the server's hint.
 *   sx_rng      a tiny xorshift generator for the jitter (one per worker, no locking).
 *
 * None of these lock: the engine calls them with its own lock held (see engine.h). */
#ifndef SEMEX_RATELIMIT_H
#define SEMEX_RATELIMIT_H

#include <stdint.h>

typedef struct sx_bucket {
    double rate;      /* tokens added per second; <= 0 means unlimited */
    double capacity;  /* most tokens the bucket holds (the burst) */
    double tokens;    /* current level; may go negative after an oversized request */
    double last;      /* time of the last refill */
} sx_bucket;

/* per_minute <= 0 makes an unlimited bucket. The burst is one second's worth of tokens
 * (at least 1): providers enforce per-minute limits over shorter intervals, so sending a
 * whole minute's budget at once invites 429s. The bucket starts full. */
void sx_bucket_init(sx_bucket *b, double per_minute, double now);

/* Take `cost` tokens if the bucket allows it now. Returns 0.0 when taken; otherwise the
 * seconds to wait before it will allow it (nothing is taken). A cost larger than the whole
 * capacity is allowed once the bucket is full, leaving it negative, so an oversized request
 * is delayed rather than blocked forever. */
double sx_bucket_take(sx_bucket *b, double cost, double now);

/* Give back tokens that were taken for a request that was never sent. */
void sx_bucket_refund(sx_bucket *b, double cost);

typedef struct sx_window {
    double size;        /* current window (in-flight requests allowed) */
    double cap;         /* the user's cap: never exceeded */
    double floor;       /* never cut below this */
    double ssthresh;    /* below it grow fast (+1 per success), above it +1/size per success */
    uint64_t cut_seq;   /* admissions counted when the window was last cut */
} sx_window;

void sx_window_init(sx_window *w, double cap);

/* A request admitted as number `admit_seq` met congestion. Cut the window at most once per
 * round: responses to requests admitted before the last cut carry no new information.
 * `admitted` is the engine's running admission count. Returns 1 if the window was cut. */
int sx_window_congestion(sx_window *w, uint64_t admit_seq, uint64_t admitted);

void sx_window_success(sx_window *w);

/* The window as a whole number of requests, at least 1. */
int sx_window_limit(const sx_window *w);

typedef struct sx_rng {
    uint64_t state;
} sx_rng;

void sx_rng_seed(sx_rng *r, uint64_t seed);
double sx_rng_uniform(sx_rng *r); /* in [0, 1) */

/* Delay before retry number `retry` (1 = first retry): uniform in [0, min(cap, base*2^(retry-1))]
 * (full jitter), and never less than `hint` (the server's Retry-After etc.; < 0 if none) when
 * the hint is usable: 0 <= hint <= max_hint (sx_hint_usable, hints.h). A hint above max_hint
 * is ignored, so the delay is never above max(cap, max_hint). */
double sx_backoff(sx_rng *r, int retry, double base, double cap, double hint, double max_hint);

#endif
