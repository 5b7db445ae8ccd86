/* sched.c — see sched.h. */
#include "sched.h"

#include <curl/curl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sx_sched_init(sx_sched *s, const sx_sched_opts *opts, double now)
{
    memset(s, 0, sizeof *s);
    s->opts = *opts;
    if (s->opts.max_in_flight < 1)
        s->opts.max_in_flight = 1;
    sx_bucket_init(&s->rpm, opts->rpm, now);
    sx_bucket_init(&s->tpm, opts->tpm, now);
    sx_pace_init(&s->pace, opts->rpm);
    if (s->rpm.rate > 0)
        s->rpm.tokens = s->rpm.capacity / 10 > 1 ? s->rpm.capacity / 10 : 1;
    sx_window_init(&s->window, (double)s->opts.max_in_flight);
    s->opts.deploys = NULL;  /* the caller's array: copied below, not kept */
    s->opts.ndeploys = 0;
    if (opts->ndeploys >= 2) {
        s->deploy = calloc(opts->ndeploys, sizeof *s->deploy);
        if (!s->deploy)
            return -1;
        s->ndeploy = s->opts.ndeploys = opts->ndeploys;
        for (size_t i = 0; i < s->ndeploy; i++) {
            sx_deploy *d = &s->deploy[i];
            d->opts = opts->deploys[i];
            if (!(d->opts.weight > 0))
                d->opts.weight = 1.0;
            int cap = d->opts.max_in_flight;
            if (cap < 1 || cap > s->opts.max_in_flight)
                cap = s->opts.max_in_flight;
            d->opts.max_in_flight = cap;
            sx_bucket_init(&d->rpm, d->opts.rpm, now);
            sx_bucket_init(&d->tpm, d->opts.tpm, now);
            sx_pace_init(&d->pace, d->opts.rpm);
            if (d->rpm.rate > 0)  /* a tenth full, as the one target's (sched.h) */
                d->rpm.tokens = d->rpm.capacity / 10 > 1 ? d->rpm.capacity / 10 : 1;
            sx_window_init(&d->window, (double)cap);
        }
    }
    return 0;
}

void sx_sched_destroy(sx_sched *s)
{
    free(s->deploy);
    s->deploy = NULL;
    s->ndeploy = 0;
    free(s->heap);
    s->heap = NULL;
    s->heap_len = s->heap_cap = 0;
}

/* ---- retry heap: a binary min-heap on slot->due, positions kept in slot->heap_pos ---- */

static void heap_set(sx_sched *s, size_t i, sx_slot *slot)
{
    s->heap[i] = slot;
    slot->heap_pos = i;
}

static void heap_up(sx_sched *s, size_t i)
{
    sx_slot *slot = s->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (s->heap[parent]->due <= slot->due)
            break;
        heap_set(s, i, s->heap[parent]);
        i = parent;
    }
    heap_set(s, i, slot);
}

static void heap_down(sx_sched *s, size_t i)
{
    sx_slot *slot = s->heap[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= s->heap_len)
            break;
        if (child + 1 < s->heap_len && s->heap[child + 1]->due < s->heap[child]->due)
            child++;
        if (s->heap[child]->due >= slot->due)
            break;
        heap_set(s, i, s->heap[child]);
        i = child;
    }
    heap_set(s, i, slot);
}

static int heap_push(sx_sched *s, sx_slot *slot)
{
    if (s->heap_len == s->heap_cap) {
        size_t cap = s->heap_cap ? s->heap_cap * 2 : 64;
        sx_slot **grown = realloc(s->heap, cap * sizeof *grown);
        if (!grown)
            return -1;
        s->heap = grown;
        s->heap_cap = cap;
    }
    s->heap[s->heap_len] = slot;
    slot->heap_pos = s->heap_len++;
    heap_up(s, slot->heap_pos);
    return 0;
}

static void heap_remove(sx_sched *s, size_t i)
{
    s->heap_len--;
    if (i == s->heap_len)
        return;
    heap_set(s, i, s->heap[s->heap_len]);
    heap_up(s, i);
    heap_down(s, s->heap[i]->heap_pos);
}

/* ---- queue ---- */

int sx_sched_push_batch(sx_sched *s, sx_batch *b)
{
    if (s->queued + s->heap_len + b->n > s->opts.queue_limit)
        return -1;
    for (size_t i = 0; i < b->n; i++)
        b->slots[i].where = SX_AT_QUEUE;
    b->next_unsent = 0;
    b->q_next = NULL;
    b->in_queue = 1;
    if (s->q_tail)
        s->q_tail->q_next = b;
    else
        s->q_head = b;
    s->q_tail = b;
    s->queued += b->n;
    return 0;
}

static void queue_unlink(sx_sched *s, sx_batch *b)
{
    sx_batch *prev = NULL;
    for (sx_batch *cur = s->q_head; cur; prev = cur, cur = cur->q_next) {
        if (cur != b)
            continue;
        if (prev)
            prev->q_next = b->q_next;
        else
            s->q_head = b->q_next;
        if (s->q_tail == b)
            s->q_tail = prev;
        break;
    }
    b->q_next = NULL;
    b->in_queue = 0;
}

static int below_batch_cap(const sx_batch *b);

/* The earliest-due retry that is due now and whose batch is below its own cap. The heap is
 * searched depth-first, pruning subtrees not yet due, so the cost is the number of due
 * retries, not the heap size; a capped batch at the top does not block the others. */
static int heap_pick_due(const sx_sched *s, double now, size_t *index)
{
    size_t stack[64];
    size_t depth = 0;
    int found = 0;
    double best = 0;
    if (s->heap_len && s->heap[0]->due <= now)
        stack[depth++] = 0;
    while (depth) {
        size_t i = stack[--depth];
        sx_slot *slot = s->heap[i];
        if (found && slot->due >= best)
            continue;  /* children are due no sooner */
        if (below_batch_cap(slot->batch)) {
            found = 1;
            best = slot->due;
            *index = i;
            continue;  /* its children are due later than it */
        }
        for (size_t c = 2 * i + 1; c <= 2 * i + 2 && c < s->heap_len; c++)
            if (s->heap[c]->due <= now && depth < sizeof stack / sizeof stack[0])
                stack[depth++] = c;
    }
    return found;
}

static int below_batch_cap(const sx_batch *b)
{
    return !b->cap || b->cap->in_flight < (size_t)b->cap->max;
}

/* The oldest queued batch that may send now, or NULL. */
static sx_batch *queue_pick(sx_sched *s)
{
    for (sx_batch *b = s->q_head; b; b = b->q_next)
        if (below_batch_cap(b))
            return b;
    return NULL;
}

int sx_deploy_window(const sx_sched *s, const sx_deploy *d)
{
    return s->opts.adaptive ? sx_window_limit(&d->window) : d->opts.max_in_flight;
}

int sx_deploy_in_service(const sx_deploy *d, double now)
{
    (void)now;
    return !d->disabled && d->fails < SX_DEPLOY_TRIP;
}

int sx_sched_window(const sx_sched *s)
{
    if (s->ndeploy) {
        long sum = 0;
        for (size_t i = 0; i < s->ndeploy; i++)
            sum += sx_deploy_window(s, &s->deploy[i]);
        return sum < s->opts.max_in_flight ? (int)sum : s->opts.max_in_flight;
    }
    return s->opts.adaptive ? sx_window_limit(&s->window) : s->opts.max_in_flight;
}

static void lower(double *wake_at, double t)
{
    if (*wake_at < 0 || t < *wake_at)
        *wake_at = t;
}

/* Seconds until bucket b allows `cost` (0: now), taking nothing. */
static double bucket_wait(sx_bucket *b, double cost, double now)
{
    double wait = sx_bucket_take(b, cost, now);
    if (wait == 0)
        sx_bucket_refund(b, cost);
    return wait;
}

/* May deployment d send `slot` now? If not because of a time, *wake_at is lowered to it; a
 * full window or a probe in flight is released by a completion instead. */
static int deploy_may_send(const sx_sched *s, sx_deploy *d, const sx_slot *slot, double now,
                           double *wake_at)
{
    if (d->disabled)
        return 0;
    if (d->fails >= SX_DEPLOY_TRIP) {
        if (now < d->down_until) {
            lower(wake_at, d->down_until);
            return 0;
        }
        if (d->in_flight > 0)
            return 0;  /* out of service: one probe at a time */
    }
    if (now < d->cooldown_until) {
        lower(wake_at, d->cooldown_until);
        return 0;
    }
    if (d->in_flight >= (size_t)sx_deploy_window(s, d))
        return 0;
    double wait = bucket_wait(&d->rpm, 1.0, now);
    if (wait == 0)
        wait = bucket_wait(&d->tpm, slot->tokens, now);
    if (wait > 0) {
        lower(wake_at, now + wait);
        return 0;
    }
    return 1;
}

/* The deployment for slot's next attempt (see sx_deploy in sched.h), or NULL if none may
 * send now. */
static sx_deploy *deploy_pick(sx_sched *s, const sx_slot *slot, double now, double *wake_at)
{
    sx_deploy *best = NULL;
    sx_deploy *failed_on = slot->attempts > 0 ? &s->deploy[slot->deploy] : NULL;
    int failed_on_may = 0;
    double best_load = 0;
    for (size_t k = 0; k < s->ndeploy; k++) {
        sx_deploy *d = &s->deploy[(s->deploy_next + k) % s->ndeploy];
        if (!deploy_may_send(s, d, slot, now, wake_at))
            continue;
        if (d == failed_on) {
            failed_on_may = 1;
            continue;
        }
        double load = (double)(d->in_flight + 1) / d->opts.weight;
        if (!best || load < best_load) {
            best = d;
            best_load = load;
        }
    }
    if (!best && failed_on_may)
        best = failed_on;
    if (best)  /* ties go round: the next search starts after this one */
        s->deploy_next = (size_t)(best - s->deploy) + 1;
    return best;
}

size_t sx_sched_take(sx_sched *s, sx_slot **out, size_t max, double now, double *wake_at)
{
    size_t taken = 0;
    size_t limit = (size_t)sx_sched_window(s);
    while (taken < max && s->in_flight < limit) {
        sx_slot *slot;
        sx_batch *from_queue = NULL;
        size_t heap_index = 0;
        if (heap_pick_due(s, now, &heap_index)) {
            slot = s->heap[heap_index];
        } else if ((from_queue = queue_pick(s)) != NULL) {
            slot = &from_queue->slots[from_queue->next_unsent];
        } else {
            /* Only a retry that is not yet due is worth a timer; one that is due but held
             * by its batch's cap is released by that batch's next completion. */
            if (s->heap_len && s->heap[0]->due > now)
                lower(wake_at, s->heap[0]->due);
            break;
        }
        if (now < s->cooldown_until) {
            lower(wake_at, s->cooldown_until);
            break;
        }
        sx_deploy *d = NULL;
        if (s->ndeploy && !(d = deploy_pick(s, slot, now, wake_at)))
            break;
        double wait = sx_bucket_take(&s->rpm, 1.0, now);
        if (wait > 0) {
            lower(wake_at, now + wait);
            break;
        }
        wait = sx_bucket_take(&s->tpm, slot->tokens, now);
        if (wait > 0) {
            sx_bucket_refund(&s->rpm, 1.0);
            lower(wake_at, now + wait);
            break;
        }
        if (s->opts.lease) {
            if (s->lease.requests < 1.0 || (s->opts.lease_tokens && s->lease.tokens <= 0)) {
                sx_bucket_refund(&s->rpm, 1.0);
                sx_bucket_refund(&s->tpm, slot->tokens);
                s->stats.lease_waits++;
                break;  /* no timer: the owner's next grant wakes the workers */
            }
            s->lease.requests -= 1.0;
            s->lease.used_requests += 1.0;
            if (s->opts.lease_tokens) {
                s->lease.tokens -= slot->tokens;
                s->lease.used_tokens += slot->tokens;
            }
        }
        if (d) {  /* deploy_pick saw both allow it at this `now` */
            sx_bucket_take(&d->rpm, 1.0, now);
            sx_bucket_take(&d->tpm, slot->tokens, now);
            d->in_flight++;
            d->tokens_in_flight += slot->tokens;
            d->stats.admitted++;
            slot->deploy = (uint16_t)(d - s->deploy);
        }
        if (from_queue) {
            from_queue->next_unsent++;
            s->queued--;
            if (from_queue->next_unsent == from_queue->n)
                queue_unlink(s, from_queue);
        } else {
            heap_remove(s, heap_index);
        }
        slot->where = SX_AT_WORKER;
        if (slot->attempts == 0) {
            slot->first_sent = now;
            double budget = slot->batch->opts.total_timeout;
            slot->deadline = budget > 0 ? now + budget : 0.0;
        }
        slot->attempts++;
        slot->admit_seq = ++s->stats.admitted;
        s->in_flight++;
        s->tokens_in_flight += slot->tokens;
        slot->batch->in_flight++;
        if (slot->batch->cap)
            slot->batch->cap->in_flight++;
        out[taken++] = slot;
    }
    return taken;
}

/* ---- outcomes ---- */

/* Attempts for a request whose connection was refused or whose host did not resolve: a
 * server that is down or a mistyped host answers the same way on every retry, and seven
 * retries cost a user 16-25 silent seconds before the error. Three attempts still ride out
 * a server that is restarting. */
#define SX_CONNECT_ATTEMPTS 3

static int curl_code_retryable(int code)
{
    switch (code) {
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_PARTIAL_FILE:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_READ_ERROR:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_BAD_CONTENT_ENCODING:
        return 1;
    default:
        return 0;
    }
}

static int body_says(const char *body, size_t len, const char *needle)
{
    size_t n = strlen(needle);
    if (!body || len < n)
        return 0;
    for (size_t i = 0; i + n <= len; i++)
        if (body[i] == needle[0] && memcmp(body + i, needle, n) == 0)
            return 1;
    return 0;
}

static int body_says_quota(const char *body, size_t len)
{
    return body_says(body, len, "insufficient_quota");
}

/* Gemini answers a wrong key with 400 INVALID_ARGUMENT, "API key not valid" (reason
 * API_KEY_INVALID), not 401: it is a bad key all the same, and must stop the batch. */
static int body_says_bad_key(const char *body, size_t len)
{
    return body_says(body, len, "API_KEY_INVALID") || body_says(body, len, "API key not valid");
}

void sx_classify(sx_attempt *a, int curl_code, const char *curl_error, int status,
                 const char *body, size_t body_len, int overflow)
{
    a->verdict = SX_V_OK;
    a->kind = SX_ERR_NONE;
    a->http_status = status;
    a->congestion = 0;
    a->rate_limited = 0;
    a->attempt_limit = 0;
    a->reason[0] = '\0';
    memset(&a->chat, 0, sizeof a->chat);

    if (overflow || curl_code == CURLE_FILESIZE_EXCEEDED) {
        a->verdict = SX_V_FAIL;
        a->kind = SX_ERR_BODY_CAP;
        snprintf(a->reason, sizeof a->reason, "response body exceeded the max_body cap");
        return;
    }
    if (curl_code != CURLE_OK) {
        const char *detail = curl_error && curl_error[0] ? curl_error
                                                         : curl_easy_strerror((CURLcode)curl_code);
        if (curl_code == CURLE_OPERATION_TIMEDOUT) {
            a->verdict = SX_V_RETRY;
            a->kind = SX_ERR_TIMEOUT;
            a->congestion = 1;
            snprintf(a->reason, sizeof a->reason, "timed out: %s", detail);
        } else if (curl_code_retryable(curl_code)) {
            a->verdict = SX_V_RETRY;
            a->kind = SX_ERR_CONNECTION;
            if (curl_code == CURLE_COULDNT_CONNECT || curl_code == CURLE_COULDNT_RESOLVE_HOST ||
                curl_code == CURLE_COULDNT_RESOLVE_PROXY)
                a->attempt_limit = SX_CONNECT_ATTEMPTS;
            snprintf(a->reason, sizeof a->reason, "connection error (%s): %s",
                     curl_easy_strerror((CURLcode)curl_code), detail);
        } else {
            a->verdict = SX_V_FAIL;
            a->kind = SX_ERR_TRANSPORT;
            snprintf(a->reason, sizeof a->reason, "request failed (%s): %s",
                     curl_easy_strerror((CURLcode)curl_code), detail);
        }
        return;
    }
    if (status >= 200 && status < 300)
        return;
    if (status == 401 || status == 403 || (status == 400 && body_says_bad_key(body, body_len))) {
        a->verdict = SX_V_ABORT_BATCH;
        a->kind = SX_ERR_AUTH;
        snprintf(a->reason, sizeof a->reason,
                 "authentication failed (HTTP %d): check the API key and its permissions",
                 status);
    } else if (status == 429 && body_says_quota(body, body_len)) {
        a->verdict = SX_V_ABORT_BATCH;
        a->kind = SX_ERR_QUOTA;
        snprintf(a->reason, sizeof a->reason,
                 "quota exhausted (HTTP 429 insufficient_quota): check the plan and billing");
    } else if (status == 429) {
        a->verdict = SX_V_RETRY;
        a->kind = SX_ERR_HTTP;
        a->rate_limited = 1;
        a->congestion = 1;
        snprintf(a->reason, sizeof a->reason, "rate limited (HTTP 429)");
    } else if (status == 408 || status == 409 || status >= 500) {
        a->verdict = SX_V_RETRY;
        a->kind = SX_ERR_HTTP;
        /* Anthropic's 529 overloaded_error: the service, not this request, is the problem */
        a->congestion = status == 529;
        snprintf(a->reason, sizeof a->reason, "HTTP %d from the server", status);
    } else {
        a->verdict = SX_V_FAIL;
        a->kind = SX_ERR_HTTP;
        snprintf(a->reason, sizeof a->reason, "HTTP %d from the server", status);
    }
}

double sx_usage_tokens(double prompt, double completion, double total)
{
    if (total > 0)
        return total;
    double sum = prompt + completion;
    return sum > 0 ? sum : -1;
}

/* What a success's answer says it used, or -1 when it says nothing (no usage, or an answer
 * the worker left to Python). */
static double used_tokens(const sx_attempt *a)
{
    if (!a->chat.parsed)
        return -1;
    return sx_usage_tokens((double)a->chat.prompt_tokens, (double)a->chat.completion_tokens,
                           (double)a->chat.total_tokens);
}

/* A success that used `used` of the `reserved` tokens it took at admission (from the
 * scheduler's bucket and, with deployments, from deployment d's). */
static void settle_tokens(sx_sched *s, sx_deploy *d, double reserved, double used, double now)
{
    double delta = reserved - used;
    sx_bucket_settle(&s->tpm, reserved, used, now);
    if (d)
        sx_bucket_settle(&d->tpm, reserved, used, now);
    if (s->opts.lease && s->opts.lease_tokens) {
        s->lease.tokens += delta;
        s->lease.used_tokens -= delta;
    }
    s->stats.settled++;
    if (delta > 0)
        s->stats.tokens_refunded += delta;
    else
        s->stats.tokens_overrun -= delta;
}


static void extend_cooldown(sx_sched *s, double *cooldown_until, double until)
{
    if (until > *cooldown_until) {
        *cooldown_until = until;
        s->stats.cooldowns++;
    }
}

/* What an attempt's outcome updates: the one target's limits (the scheduler's own), or
 * those of the deployment it went to. */
typedef struct sx_limits {
    sx_deploy *deploy;          /* NULL: one target */
    sx_bucket *rpm;
    sx_window *window;
    sx_pace *pace;
    double *cooldown_until;
    int *rpm_seeded;
    size_t in_flight;           /* still in flight there, this attempt no longer counted */
    sx_bucket *tpm;
    int *tpm_seeded;
    double tokens_in_flight;    /* reserved there by the others still in flight */
} sx_limits;

static sx_limits limits_of(sx_sched *s, const sx_slot *slot)
{
    if (!s->ndeploy)
        return (sx_limits){NULL, &s->rpm, &s->window, &s->pace, &s->cooldown_until,
                           &s->rpm_seeded, s->in_flight, &s->tpm, &s->tpm_seeded,
                           s->tokens_in_flight};
    sx_deploy *d = &s->deploy[slot->deploy];
    return (sx_limits){d, &d->rpm, &d->window, &d->pace, &d->cooldown_until, &d->rpm_seeded,
                       d->in_flight, &d->tpm, &d->tpm_seeded, d->tokens_in_flight};
}

/* Settle a success's reservation against `used` (-1: unknown) once, where settlement is on
 * and a tokens/min limit applies (the scheduler's or the slot's deployment's). 1 if it did. */
static int settle_once(sx_sched *s, sx_limits lim, sx_slot *slot, double used, double now)
{
    if (!s->opts.settle_tokens || slot->settled || used < 0 ||
        !(s->tpm.rate > 0 || (lim.deploy && lim.tpm->rate > 0)))
        return 0;
    settle_tokens(s, lim.deploy, slot->tokens, used, now);
    slot->settled = 1;
    return 1;
}

/* A failure that says something about the deployment rather than the request. */
static int deploy_failure(const sx_attempt *a)
{
    return a->verdict == SX_V_RETRY && !a->rate_limited;
}

/* Deployment d's health after an attempt there (see sx_deploy in sched.h). */
static void deploy_health(sx_sched *s, sx_deploy *d, const sx_slot *slot,
                          const sx_attempt *a, double now)
{
    if (a->verdict == SX_V_OK) {
        d->stats.ok++;
        d->fails = 0;
        d->trips_in_row = 0;
        return;
    }
    if (a->rate_limited) {
        d->stats.http_429++;
        return;
    }
    d->stats.failed++;
    if (!deploy_failure(a))
        return;
    d->fails++;
    /* Trip once for a clump of failures: what was admitted before the last trip (the
     * transfers that were in flight when it died) carries no news; a probe's failure does. */
    if (d->fails >= SX_DEPLOY_TRIP && slot->admit_seq > d->trip_seq) {
        int k = d->trips_in_row > 5 ? 5 : d->trips_in_row;
        double pause = ldexp(1.0, k);
        d->down_until = now + (pause < 30.0 ? pause : 30.0);
        d->trips_in_row++;
        d->trip_seq = s->stats.admitted;
        d->stats.trips++;
    }
}

/* Is a deployment other than `d` not disabled (in service, or back after its pause)? */
static int other_enabled(const sx_sched *s, const sx_deploy *d)
{
    for (size_t i = 0; i < s->ndeploy; i++)
        if (&s->deploy[i] != d && !s->deploy[i].disabled)
            return 1;
    return 0;
}

/* Is a deployment other than `d` in service? */
static int other_in_service(const sx_sched *s, const sx_deploy *d, double now)
{
    for (size_t i = 0; i < s->ndeploy; i++)
        if (&s->deploy[i] != d && sx_deploy_in_service(&s->deploy[i], now))
            return 1;
    return 0;
}

sx_verdict sx_sched_outcome(sx_sched *s, sx_slot *slot, sx_attempt *a, sx_rng *rng,
                            double now)
{
    sx_batch *b = slot->batch;
    s->in_flight--;
    s->tokens_in_flight -= slot->tokens;
    b->in_flight--;
    if (b->cap)
        b->cap->in_flight--;
    sx_limits lim = limits_of(s, slot);
    if (lim.deploy) {
        lim.deploy->in_flight--;
        lim.deploy->tokens_in_flight -= slot->tokens;
        lim.in_flight--;
        lim.tokens_in_flight -= slot->tokens;
        deploy_health(s, lim.deploy, slot, a, now);
    }

    /* Tokens: settle this reservation, then believe the server's count (see sched.h). */
    if (a->verdict == SX_V_OK)
        settle_once(s, lim, slot, used_tokens(a), now);
    if (!*lim.tpm_seeded && s->opts.settle_tokens && a->hints.remaining_tokens >= 0 &&
        lim.tpm->rate > 0) {
        *lim.tpm_seeded = 1;
        sx_bucket_set(lim.tpm, (double)a->hints.remaining_tokens - lim.tokens_in_flight, now);
    }

    if (a->rate_limited) {
        s->stats.http_429++;
        b->http_429++;
    }
    if (a->kind == SX_ERR_TIMEOUT)
        s->stats.timeouts++;
    if (a->congestion && s->opts.adaptive &&
        sx_window_congestion(lim.window, slot->admit_seq, s->stats.admitted))
        s->stats.window_cuts++;

    /* The first word on how much of the budget is left sets the burst (see sched.h). */
    if (!*lim.rpm_seeded && a->hints.remaining_requests >= 0 && lim.rpm->rate > 0 &&
        !lim.pace->active) {
        *lim.rpm_seeded = 1;
        sx_bucket_raise(lim.rpm, (double)a->hints.remaining_requests - (double)lim.in_flight,
                        now);
    }

    /* A server that says a budget is used up is believed on any response, not only 429. */
    double max_hint = b->opts.max_hint_wait;
    double exhausted = sx_hints_exhausted_delay(&a->hints, slot->tokens, max_hint);
    if (exhausted > 0)
        extend_cooldown(s, lim.cooldown_until, now + exhausted);

    if (a->verdict == SX_V_OK) {
        if (sx_pace_success(lim.pace, slot->admit_seq, now))
            sx_pace_apply(lim.pace, lim.rpm, now, 0);
        if (s->opts.adaptive)
            sx_window_success(lim.window);
        return SX_V_OK;
    }
    if (a->verdict == SX_V_ABORT_BATCH && lim.deploy) {
        /* Its key is refused or its quota spent: that deployment is done for, not the
         * batch, while another can take the request. */
        if (!lim.deploy->disabled) {
            lim.deploy->disabled = 1;
            lim.deploy->stats.disabled_kind = a->kind;
        }
        if (other_enabled(s, lim.deploy) && slot->attempts <= b->opts.max_retries)
            a->verdict = SX_V_RETRY;
    }
    if (a->verdict != SX_V_RETRY)
        return a->verdict;

    double hint = sx_hints_retry_delay(&a->hints, max_hint);
    double asked = sx_hints_asked_delay(&a->hints);
    if (a->rate_limited && hint >= 0) {
        /* A 429 speaks for the whole account (the deployment's): everyone waits what the
         * server asked. */
        extend_cooldown(s, lim.cooldown_until, now + hint);
    } else if (a->rate_limited && exhausted < 0 &&
               sx_pace_bare_429(lim.pace, slot->admit_seq, s->stats.admitted, now)) {
        /* A new episode of bare 429s: pace at what the server was seen to take, and pause
         * briefly, longer only while episodes follow each other with nothing getting
         * through. The rest of this episode's 429s only retry. */
        s->stats.bare_episodes++;
        sx_pace_apply(lim.pace, lim.rpm, now, 1);
        double pause = 1.0 / lim.pace->rate;
        if (pause > b->opts.backoff_base)
            pause = b->opts.backoff_base;
        int k = lim.pace->level > 30 ? 30 : lim.pace->level;
        pause *= ldexp(1.0, k - 1);
        if (pause > b->opts.backoff_cap)
            pause = b->opts.backoff_cap;
        extend_cooldown(s, lim.cooldown_until, now + pause);
    }
    /* A refused connection fails fast only where no other deployment could take it. */
    int limited = a->attempt_limit > 0 && slot->attempts >= a->attempt_limit &&
                  !(lim.deploy && other_in_service(s, lim.deploy, now));
    if (slot->attempts > b->opts.max_retries || limited) {
        size_t len = strlen(a->reason);
        if (asked >= 0 && hint < 0)
            snprintf(a->reason + len, sizeof a->reason - len,
                     " (gave up after %d attempts; the server asked to wait %.0f s, more than"
                     " max_hint_wait=%g s, so that hint was ignored)",
                     slot->attempts, asked, max_hint);
        else
            snprintf(a->reason + len, sizeof a->reason - len, " (gave up after %d attempts)",
                     slot->attempts);
        return SX_V_FAIL;
    }
    double delay;
    if (lim.deploy) {
        /* The hint and the cool-down are that deployment's: the retry may go to another
         * one after the usual backoff (admission waits if every one is cooling down). */
        delay = sx_backoff(rng, slot->attempts, b->opts.backoff_base, b->opts.backoff_cap,
                           -1.0, max_hint);
    } else {
        delay = sx_backoff(rng, slot->attempts, b->opts.backoff_base, b->opts.backoff_cap,
                           hint, max_hint);
        if (now + delay < s->cooldown_until)
            delay = s->cooldown_until - now;
    }
    if (slot->deadline > 0) {
        if (a->rate_limited) {
            /* The provider is pacing us, not stalling: its wait is not the row's fault. */
            slot->deadline += delay;
        } else if (now + delay >= slot->deadline) {
            size_t len = strlen(a->reason);
            snprintf(a->reason + len, sizeof a->reason - len,
                     " (gave up after %d attempts: total_timeout of %g s spent)",
                     slot->attempts, b->opts.total_timeout);
            return SX_V_FAIL;
        }
    }
    slot->due = now + delay;
    if (heap_push(s, slot) != 0) {
        snprintf(a->reason, sizeof a->reason, "out of memory while scheduling a retry");
        return SX_V_FAIL;
    }
    slot->where = SX_AT_RETRY;
    s->stats.retries++;
    b->retries++;
    return SX_V_RETRY;
}

int sx_sched_settle_late(sx_sched *s, sx_slot *slot, double used, double now)
{
    return slot->state == SX_OK && settle_once(s, limits_of(s, slot), slot, used, now);
}

void sx_sched_grant(sx_sched *s, double requests, double tokens)
{
    if (requests > 0)
        s->lease.requests += requests;
    if (tokens > 0)
        s->lease.tokens += tokens;
}

void sx_sched_release(sx_sched *s, sx_slot *slot)
{
    if (s->ndeploy) {
        s->deploy[slot->deploy].in_flight--;
        s->deploy[slot->deploy].tokens_in_flight -= slot->tokens;
    }
    s->in_flight--;
    s->tokens_in_flight -= slot->tokens;
    slot->batch->in_flight--;
    if (slot->batch->cap)
        slot->batch->cap->in_flight--;
}

void sx_sched_remove_batch(sx_sched *s, sx_batch *b, void (*fn)(sx_slot *, void *), void *arg)
{
    if (b->in_queue) {
        queue_unlink(s, b);
        s->queued -= b->n - b->next_unsent;
        size_t first = b->next_unsent;
        b->next_unsent = b->n;
        for (size_t i = first; i < b->n; i++)
            fn(&b->slots[i], arg);
    }
    /* Compact the heap without b's slots, then restore the heap order bottom-up: O(n). */
    size_t kept = 0;
    for (size_t i = 0; i < s->heap_len; i++) {
        sx_slot *slot = s->heap[i];
        if (slot->batch == b)
            fn(slot, arg);
        else
            heap_set(s, kept++, slot);
    }
    s->heap_len = kept;
    for (size_t i = kept / 2; i-- > 0;)
        heap_down(s, i);
}
