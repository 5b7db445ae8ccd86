/* ratelimit.h — the arithmetic of admission control, free of threads and I/O.
 *
 *   sx_bucket   a token bucket: requests/min or tokens/min, refilled continuously.
 *   sx_window   the adaptive in-flight window (AIMD): halve on congestion (429, timeout),
 *               grow back on success, never above the user's cap.
 *   sx_backoff  exponential backoff with full jitter, never sooner than the server's hint.
 *   sx_rng      a tiny xorshift generator for the jitter (one per worker, no locking).
 *   sx_pace     learns a server's request rate and burst from bare 429s (no hints at all)
 *               and sets a bucket to them: AIMD on the rate, halving the burst.
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

/* Raise the level to `level` (refilled to `now` first; never above the capacity, never
 * lowered): a server that says how much of its budget is left. */
void sx_bucket_raise(sx_bucket *b, double level, double now);

/* Give back tokens that were taken for a request that was never sent. */
void sx_bucket_refund(sx_bucket *b, double cost);

/* A request took `reserved` tokens and turned out to use `used`: give back the unused part,
 * or take the overrun (the level may go below zero: a debt that later admissions wait out).
 * Refilled to `now` first; never above the capacity. */
void sx_bucket_settle(sx_bucket *b, double reserved, double used, double now);

/* Set the level to `level` (refilled to `now` first; at most the capacity; may lower it, and
 * may go below zero): a server that says how much of its budget is left. */
void sx_bucket_set(sx_bucket *b, double level, double now);

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

/* What a server that answers 429 without Retry-After or x-ratelimit-* headers (an nginx
 * limit_req, an API gateway) will take, learned from its 429s alone.
 *
 * An *episode* is one overload event: the first bare 429 for a request admitted after the
 * previous episode began. Requests already in flight then carry no new information (as for
 * the window's cuts), so one burst of 180 rejections is one episode, not 180. On each
 * episode the rate is cut multiplicatively: to 95% of the success rate measured over the
 * last second if that is clearly below the rate we were pacing at (the server takes less
 * than we sent), else to 97% of the pacing rate (we sent about what it takes: the clump,
 * not the rate, was too much), never by more than half at once; and the burst (the bucket's
 * size) is halved, down to one request. While no 429 comes the rate grows additively, by
 * a fraction of itself per second that starts at 1% and doubles every two calm seconds
 * (up to 100%), so a limit that was lowered and then raised again is found in seconds,
 * while near a steady limit the probing is gentle; the burst grows by one request per
 * calm second, up to one second's worth. A ceiling (the user's rpm) is never exceeded.
 * An episode before the meter has a second's worth of successes to go on (429s can come
 * back before the first answer does) trusts the ceiling if there is one (97% of it), else
 * starts at 10 requests/s and doubles every quarter second (TCP's slow start) until the
 * next episode measures the limit.
 *
 * Until the first bare 429 it is inactive and changes nothing: a server that sends hints
 * (or never refuses) sees exactly the engine it saw before. `level` counts episodes in a
 * row with no success from a request admitted after the last one began: the scheduler
 * doubles its cool-down with it (once per episode) and resets it on the first such success
 * (the probe got through; the rate ramps from there). */
typedef struct sx_pace {
    double ceiling;        /* the user's requests/s; 0: none */
    int active;            /* a bare 429 has been seen: rate/burst are in force */
    double rate;           /* learned requests/s */
    double burst;          /* learned bucket size, requests */
    double growth;         /* current additive growth, fraction of rate per second */
    double ssthresh;       /* the limit as last estimated; 0: unknown (slow start) */
    double calm_since;     /* time of the last episode */
    double last_step;      /* time growth was last applied */
    uint64_t episode_seq;  /* admission count when the last episode began */
    int level;             /* episodes in a row without a success from after one began */
    uint64_t episodes;     /* all episodes (stats) */
    /* successes per 1/8 s over the last second, to measure what the server takes */
    double meter_start;    /* first success of the current busy period; < 0 none */
    uint64_t slot_id[8];
    uint32_t slot_count[8];
} sx_pace;

void sx_pace_init(sx_pace *p, double ceiling_per_minute);

/* Successes per second over the last second (or since the busy period began). */
double sx_pace_measured(const sx_pace *p, double now);

/* A success of a request admitted as number `admit_seq`; grows the rate and burst if
 * active. Returns 1 if bucket `b` must be updated (sx_pace_apply). */
int sx_pace_success(sx_pace *p, uint64_t admit_seq, double now);

/* A bare 429 for request number `admit_seq`; `admitted` is the running admission count.
 * Returns 1 if this starts a new episode (rate and burst were cut; apply them), else 0. */
int sx_pace_bare_429(sx_pace *p, uint64_t admit_seq, uint64_t admitted, double now);

/* Set bucket b to the learned rate and burst (refilled to `now` at its old rate first). On
 * a new episode (`episode`), also drop what the bucket had saved beyond one request, so
 * that what follows is a probe, paced, rather than another clump. */
void sx_pace_apply(const sx_pace *p, sx_bucket *b, double now, int episode);

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
