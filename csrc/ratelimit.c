/* ratelimit.c — see ratelimit.h. */
#include "ratelimit.h"

#include <math.h>
#include <string.h>

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

void sx_bucket_raise(sx_bucket *b, double level, double now)
{
    if (b->rate <= 0)
        return;
    bucket_refill(b, now);
    if (level > b->capacity)
        level = b->capacity;
    if (level > b->tokens)
        b->tokens = level;
}

void sx_bucket_refund(sx_bucket *b, double cost)
{
    if (b->rate <= 0)
        return;
    b->tokens += cost;
    if (b->tokens > b->capacity)
        b->tokens = b->capacity;
}

void sx_bucket_settle(sx_bucket *b, double reserved, double used, double now)
{
    if (b->rate <= 0)
        return;
    bucket_refill(b, now);
    b->tokens += reserved - used;
    if (b->tokens > b->capacity)
        b->tokens = b->capacity;
}

void sx_bucket_set(sx_bucket *b, double level, double now)
{
    if (b->rate <= 0)
        return;
    bucket_refill(b, now);
    b->tokens = level < b->capacity ? level : b->capacity;
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

/* ---- sx_pace ---- */

#define PACE_SLOT 0.125           /* seconds per meter slot; 8 slots = the last second */
#define PACE_GROWTH0 0.01         /* calm growth, fraction of the rate per second */
#define PACE_GROWTH_MAX 1.0
#define PACE_DOUBLING 1.0         /* seconds of calm per doubling of the growth */
#define PACE_SLOW_START 0.25      /* seconds per doubling of the rate while no limit is known */
#define PACE_FIRST_RATE 10.0      /* requests/s to start from when nothing is known */
#define PACE_RELIABLE 0.5         /* seconds of successes before the meter is believed */
#define PACE_MIN_RATE 0.1         /* requests/s: a floor, so the ramp can start again */

void sx_pace_init(sx_pace *p, double ceiling_per_minute)
{
    memset(p, 0, sizeof *p);
    p->ceiling = ceiling_per_minute > 0 ? ceiling_per_minute / 60.0 : 0.0;
    p->meter_start = -1;
}

double sx_pace_measured(const sx_pace *p, double now)
{
    if (p->meter_start < 0)
        return 0.0;
    uint64_t cur = (uint64_t)(now / PACE_SLOT);
    uint64_t total = 0;
    for (int i = 0; i < 8; i++)
        if (p->slot_id[i] + 8 > cur && p->slot_id[i] <= cur)
            total += p->slot_count[i];
    /* The slots span 7 whole slots plus the current partial one. */
    double span = 7 * PACE_SLOT + (now - (double)cur * PACE_SLOT);
    double busy = now - p->meter_start;
    if (busy < span)
        span = busy;
    if (span < 0.01)
        span = 0.01;
    return (double)total / span;
}

static void pace_count(sx_pace *p, double now)
{
    uint64_t id = (uint64_t)(now / PACE_SLOT);
    if (p->meter_start < 0 || sx_pace_measured(p, now) == 0.0)
        p->meter_start = now;  /* a new busy period: measure from here */
    int k = (int)(id % 8);
    if (p->slot_id[k] != id) {
        p->slot_id[k] = id;
        p->slot_count[k] = 0;
    }
    p->slot_count[k]++;
}

static double pace_max_burst(const sx_pace *p)
{
    return p->rate > 1.0 ? p->rate : 1.0;
}

int sx_pace_success(sx_pace *p, uint64_t admit_seq, double now)
{
    pace_count(p, now);
    if (admit_seq > p->episode_seq)
        p->level = 0;
    if (!p->active || now - p->last_step < 0.05)
        return 0;
    double dt = now - p->last_step;
    p->last_step = now;
    if (p->ssthresh <= 0) {
        /* No limit known yet (the first episode came before any measurement): slow
         * start, doubling every PACE_SLOW_START, until the next episode tells. */
        p->rate *= exp2(dt / PACE_SLOW_START);
    } else {
        double calm = now - p->calm_since;
        p->growth = PACE_GROWTH0 * exp2(calm / PACE_DOUBLING);
        if (p->growth > PACE_GROWTH_MAX)
            p->growth = PACE_GROWTH_MAX;
        p->rate += p->rate * p->growth * dt;
    }
    if (p->ceiling > 0 && p->rate > p->ceiling)
        p->rate = p->ceiling;
    p->burst += dt;
    if (p->burst > pace_max_burst(p))
        p->burst = pace_max_burst(p);
    return 1;
}

int sx_pace_bare_429(sx_pace *p, uint64_t admit_seq, uint64_t admitted, double now)
{
    if (admit_seq <= p->episode_seq)
        return 0;
    p->episode_seq = admitted;
    p->level++;
    p->episodes++;
    double measured = sx_pace_measured(p, now);
    int reliable = p->meter_start >= 0 && now - p->meter_start >= PACE_RELIABLE;
    double base = p->active ? p->rate : p->ceiling;   /* 0: nothing known */
    double next;
    if (!reliable) {
        /* 429s can come back before any success does (a gateway refuses at once, the
         * upstream answers later): the meter says nothing yet. Trust the user's rate, or
         * start low and find the limit by slow start. */
        next = base > 0 ? 0.97 * base : PACE_FIRST_RATE;
        p->ssthresh = base > 0 ? next : 0;
    } else {
        if (base <= 0)
            next = 0.95 * measured;
        else if (measured < 0.9 * base)
            next = 0.95 * measured > 0.5 * base ? 0.95 * measured : 0.5 * base;
        else
            next = 0.97 * base;
        p->ssthresh = next;
    }
    if (p->ceiling > 0 && next > p->ceiling)
        next = p->ceiling;
    if (next < PACE_MIN_RATE)
        next = PACE_MIN_RATE;
    if (p->ssthresh > 0 && p->ssthresh < PACE_MIN_RATE)
        p->ssthresh = PACE_MIN_RATE;
    double burst = p->active ? p->burst : (next > 1.0 ? next : 1.0);
    p->rate = next;
    p->burst = burst / 2 > 1.0 ? burst / 2 : 1.0;
    p->active = 1;
    p->growth = PACE_GROWTH0;
    p->calm_since = now;
    p->last_step = now;
    return 1;
}

void sx_pace_apply(const sx_pace *p, sx_bucket *b, double now, int episode)
{
    if (!p->active)
        return;
    if (b->rate > 0)
        bucket_refill(b, now);
    else
        b->tokens = 1.0;   /* was unlimited: start paced */
    b->last = now;
    b->rate = p->rate;
    b->capacity = p->burst;
    if (episode && b->tokens > 1.0)
        b->tokens = 1.0;
    if (b->tokens > b->capacity)
        b->tokens = b->capacity;
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
