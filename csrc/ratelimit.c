/* ratelimit.c — see ratelimit.h. */
#include "ratelimit.h"

#include <math.h>

#include "hints.h"

void sx_bucket_init(sx_bucket *b, double per_minute, double now)
{
    b->rate = per_minute > 0 ? per_minute / 60.0 : 0.0;
    b->capacity = b->rate > 1.0 ? b->rate : 1.0;
    b->tokens = b->capacity;
    b->last = now;
}

static void bucket_refill(sx_bucket *b, double now)
{
    if (now > b->last) {
        b->tokens += (now - b->last) * b->rate;
        if (b->tokens > b->capacity)
            b->tokens = b->capacity;
        b->last = now;
    }
}

double sx_bucket_take(sx_bucket *b, double cost, double now)
{
    if (b->rate <= 0)
        return 0.0;
    bucket_refill(b, now);
    /* An oversized request needs a full bucket, not an impossible level. */
    double need = cost < b->capacity ? cost : b->capacity;
    if (b->tokens >= need) {
        b->tokens -= cost;
        return 0.0;
    }
    double wait = (need - b->tokens) / b->rate;
    return wait > 1e-6 ? wait : 1e-6;
}

void sx_bucket_refund(sx_bucket *b, double cost)
{
    if (b->rate <= 0)
        return;
    b->tokens += cost;
    if (b->tokens > b->capacity)
        b->tokens = b->capacity;
}

void sx_window_init(sx_window *w, double cap)
{
    w->cap = cap >= 1 ? cap : 1;
    w->size = w->cap;    /* the user asked for this much concurrency: start there */
    w->floor = 1;
    w->ssthresh = w->cap;
    w->cut_seq = 0;
}

int sx_window_congestion(sx_window *w, uint64_t admit_seq, uint64_t admitted)
{
    if (admit_seq <= w->cut_seq)
        return 0;
    w->size = w->size / 2 > w->floor ? w->size / 2 : w->floor;
    w->ssthresh = w->size;
    w->cut_seq = admitted;
    return 1;
}

void sx_window_success(sx_window *w)
{
    if (w->size >= w->cap)
        return;
    /* Below ssthresh the window doubles per round trip; above it, grows by one per round. */
    w->size += w->size < w->ssthresh ? 1.0 : 1.0 / w->size;
    if (w->size > w->cap)
        w->size = w->cap;
}

int sx_window_limit(const sx_window *w)
{
    int n = (int)w->size;
    return n >= 1 ? n : 1;
}

void sx_rng_seed(sx_rng *r, uint64_t seed)
{
    r->state = seed ? seed : 0x9E3779B97F4A7C15ull;
}

double sx_rng_uniform(sx_rng *r)
{
    /* xorshift64*: plenty for jitter, and each worker owns its generator. */
    uint64_t x = r->state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->state = x;
    return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}

double sx_backoff(sx_rng *r, int retry, double base, double cap, double hint, double max_hint)
{
    if (retry < 1)
        retry = 1;
    double ceiling = base * ldexp(1.0, retry > 60 ? 60 : retry - 1);
    if (ceiling > cap)
        ceiling = cap;
    double delay = sx_rng_uniform(r) * ceiling;
    hint = sx_hint_usable(hint, max_hint);
    return delay > hint ? delay : hint;
}
