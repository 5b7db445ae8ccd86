/* sched.h — admission control and retry timing.
 *
 * The scheduler owns every pending request that is not at a worker: a FIFO of first attempts
 * and a min-heap of retries ordered by due time. Workers ask it for work (sx_sched_take); it
 * hands out requests while the in-flight window, the requests/min and tokens/min buckets and
 * any cool-down allow, and says when to ask again otherwise. Workers report each attempt's
 * outcome (sx_sched_outcome) and the scheduler decides: finish the slot, or retry it later.
 *
 * A 429 that carries a usable hint (Retry-After, retry-after-ms, x-ratelimit-*) pauses
 * everyone for what the server asked. A bare 429 (no usable hint) is one event per episode
 * (sx_pace, ratelimit.h): the requests/min bucket is set to the rate and burst learned from
 * such 429s (created if the user gave no rpm, never above the user's rpm), and the
 * cool-down is short (one request's time at the learned rate, at most backoff_base) and
 * doubles only per episode in a row without a success in between.
 *
 * The requests/min bucket starts a tenth full (at least one request), not with its whole
 * second's burst: a gateway's burst is often far smaller than a second of its rate (nginx
 * burst=20 at 200 r/s), and a first clump it refuses is the one thing learning cannot
 * undo. The first response that says how much is left (x-ratelimit-remaining-requests)
 * raises the level to that, less what is in flight, so a provider that sends the headers
 * still gets its burst one round trip later.
 *
 * Several deployments (sx_deploy below): the same model behind several endpoints or keys,
 * each with its own limits. Every attempt is admitted to one of them, and each keeps its
 * own buckets, in-flight window, cool-down and learned pace, so everything above applies
 * per deployment; the scheduler's own buckets and cap then bound the sum.
 *
 * Tokens: each attempt takes its estimate (slot->tokens: the caller's characters/4 +
 * max_tokens) from the tokens/min bucket when it is admitted. With opts.settle_tokens, a
 * success whose answer says what it used (usage.total_tokens, read by the worker) settles
 * that reservation: the unused part goes back to the bucket (and to the lease), an overrun is
 * charged, so a max_tokens far above the typical answer no longer holds the engine at a
 * fraction of the limit. The first response with x-ratelimit-remaining-tokens sets the
 * bucket's level to that, less the tokens reserved by the requests still in flight (each is
 * settled when it returns, so the two views agree once they are back). With deployments, the
 * settlement goes to the scheduler's bucket and to the deployment's (both were charged), and
 * the header seeds the bucket of the deployment that sent it.
 *
 * It knows HTTP statuses, time and limits; nothing about prompts. It does no locking and no
 * I/O and takes `now` as an argument, so tests drive it with a fake clock. The engine calls it
 * with the engine lock held. */
#ifndef SEMEX_SCHED_H
#define SEMEX_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "hints.h"
#include "ratelimit.h"
#include "results.h"

/* One deployment's limits (an engine with several; see sx_deploy). */
typedef struct sx_deploy_opts {
    double rpm;              /* requests per minute; <= 0 unlimited */
    double tpm;              /* tokens per minute; <= 0 unlimited */
    double weight;           /* its share of the traffic while no limit binds; > 0 */
    int max_in_flight;       /* its own cap; 0: the engine's */
} sx_deploy_opts;

typedef struct sx_sched_opts {
    int max_in_flight;       /* the user's cap */
    double rpm;              /* requests per minute; <= 0 unlimited */
    double tpm;              /* tokens per minute; <= 0 unlimited */
    int adaptive;            /* 1: AIMD window below the cap */
    size_t queue_limit;      /* most requests waiting (queued + retrying) */
    int lease;               /* 1: also spend from a budget granted from outside (sx_lease) */
    int lease_tokens;        /* with lease: the budget counts tokens too, not only requests */
    const sx_deploy_opts *deploys;  /* 2 or more: several deployments (copied by init); */
    size_t ndeploys;                /* 0 or 1: one target, the limits above */
    int settle_tokens;       /* 1: settle each reservation against the answer's usage */
} sx_sched_opts;

/* A budget granted from outside the process: a cluster-wide rpm/tpm shared by several
 * engines (semex.dask leases it from the Dask scheduler in small chunks). With opts.lease,
 * every attempt, retries included, spends one request and its estimated tokens from it on
 * top of the local buckets, and nothing is admitted while it is spent: the owner refills it
 * (sx_engine_grant), so there is no timer to wait for. A request needs a whole request of
 * budget (fractions of grants add up; they never round up into an extra request); a token
 * balance that is still positive admits a request whole and may go below zero (a debt the
 * next grant pays first), so a request costlier than any one grant is never starved. */
typedef struct sx_lease {
    double requests, tokens;            /* left to spend (may be negative: a debt) */
    double used_requests, used_tokens;  /* spent since creation, for the owner's accounting */
} sx_lease;

typedef struct sx_sched_stats {
    uint64_t admitted;       /* attempts sent */
    uint64_t retries;        /* attempts that were retries */
    uint64_t http_429;       /* 429 responses */
    uint64_t timeouts;
    uint64_t cooldowns;      /* times a cool-down was started or extended */
    uint64_t window_cuts;
    uint64_t lease_waits;    /* times admission stopped because the granted budget was spent */
    uint64_t bare_episodes;  /* overload episodes told only by bare 429s (sx_pace) */
    uint64_t settled;        /* reservations settled against an answer's usage */
    double tokens_refunded;  /* unused reserved tokens given back by settlements */
    double tokens_overrun;   /* tokens charged beyond a reservation by settlements */
} sx_sched_stats;

/* A deployment of an engine with several (opts.ndeploys >= 2). A first attempt goes to the
 * deployment that may send now (not cooling down, not out of service, below its window,
 * its buckets allowing) with the fewest requests in flight for its weight, so that with
 * equal latencies the traffic splits by weight while nothing binds and by each one's limits
 * when they do; a slower deployment holds more in flight and gets less. A retry prefers a
 * deployment other than the one its last attempt failed on.
 *
 * A 429's hint, a bare 429's learned pace and the window's cuts are the deployment's own:
 * the others keep sending. Its failures (connection errors, timeouts, 5xx) count in a row;
 * after SX_DEPLOY_TRIP of them it is out of service for a while (1 s, doubling for every
 * trip in a row, at most 30 s), then takes one request at a time until one succeeds, so a
 * dead deployment drains to the others and comes back when it answers again. The refused
 * connection rule (three attempts at most) holds only while no other deployment is in
 * service. A 401/403 or an insufficient_quota there disables it for good (its key or its
 * plan is wrong) and the request goes to another; only when none is left does the batch
 * stop, as with one target. */
#define SX_DEPLOY_TRIP 3

typedef struct sx_deploy_stats {
    uint64_t admitted;       /* attempts sent to it */
    uint64_t ok;             /* attempts it answered with success */
    uint64_t failed;         /* attempts that failed there (any reason but a 429) */
    uint64_t http_429;
    uint64_t trips;          /* times it was put out of service */
    int disabled_kind;       /* sx_error_kind that disabled it (AUTH, QUOTA); 0: none */
} sx_deploy_stats;

typedef struct sx_deploy {
    sx_deploy_opts opts;
    sx_bucket rpm, tpm;
    sx_window window;
    sx_pace pace;
    double cooldown_until;
    int rpm_seeded;
    int tpm_seeded;          /* its tpm level was set from a remaining header */
    size_t in_flight;
    double tokens_in_flight; /* tokens reserved by its attempts at workers */
    int fails;               /* failed attempts in a row (no success in between) */
    int trips_in_row;        /* times out of service with no success in between */
    double down_until;       /* out of service until then; one request at a time after */
    uint64_t trip_seq;       /* admission count at the last trip: older failures are old news */
    int disabled;            /* refused its key or its quota: never chosen again */
    sx_deploy_stats stats;
} sx_deploy;

typedef struct sx_sched {
    sx_sched_opts opts;
    sx_batch *q_head, *q_tail;  /* batches with first attempts to send, oldest first */
    size_t queued;              /* first attempts not yet sent, over all batches */
    sx_slot **heap;             /* retries, min-heap on slot->due */
    size_t heap_len, heap_cap;
    size_t in_flight;
    sx_bucket rpm, tpm;
    sx_window window;
    double cooldown_until;
    sx_lease lease;
    sx_pace pace;               /* what a server that only says 429 will take */
    int rpm_seeded;             /* the rpm level was raised from a remaining header */
    int tpm_seeded;             /* the tpm level was set from a remaining header */
    double tokens_in_flight;    /* tokens reserved by the attempts at workers */
    sx_sched_stats stats;
    sx_deploy *deploy;          /* opts.ndeploys of them, or NULL: one target */
    size_t ndeploy;
    size_t deploy_next;         /* where the search for the least loaded starts (ties) */
} sx_sched;

/* Returns 0, or -1 when out of memory. */
int sx_sched_init(sx_sched *s, const sx_sched_opts *opts, double now);
void sx_sched_destroy(sx_sched *s);

/* Queue all slots of a batch for their first attempt, after the batches already queued. Returns -1 (nothing queued) if the
 * queue limit would be exceeded. */
int sx_sched_push_batch(sx_sched *s, sx_batch *b);

/* Hand out up to `max` slots that may be sent now (retries that are due first, then first
 * attempts of the oldest batch below its own cap, in slot order). Marks them at a worker, counts the attempt. When it stops because a limit holds,
 * *wake_at is lowered to the time it is worth asking again (left alone otherwise).
 * Returns the number of slots written to out. */
size_t sx_sched_take(sx_sched *s, sx_slot **out, size_t max, double now, double *wake_at);

/* The verdict on one attempt, computed by a worker without the lock (sx_classify). */
typedef enum sx_verdict {
    SX_V_OK = 0,
    SX_V_RETRY = 1,         /* retryable failure */
    SX_V_FAIL = 2,          /* final failure of this slot */
    SX_V_ABORT_BATCH = 3,   /* final failure; stop the rest of the batch too (401/403, quota) */
} sx_verdict;

typedef struct sx_attempt {
    sx_verdict verdict;
    sx_error_kind kind;     /* for RETRY: what kind it becomes if retries run out */
    int http_status;
    int congestion;         /* 429 or timeout: cut the window */
    int rate_limited;       /* 429: global cool-down */
    sx_hints hints;
    sx_chat chat;           /* a success read as a chat completion (parsed = 0 if not) */
    int attempt_limit;      /* > 0: give up after this many attempts whatever max_retries
                             * says (refused connections, unknown hosts: fail fast) */
    char reason[256];       /* human-readable, never contains headers */
} sx_attempt;

/* Classify a finished transfer. `curl_code` is a CURLcode, `status` the HTTP status (0 if
 * none), `body` the response body so far (read only to spot insufficient_quota), `overflow`
 * set when the body cap was hit. `curl_error` is libcurl's error buffer (may be empty). */
void sx_classify(sx_attempt *a, int curl_code, const char *curl_error, int status,
                 const char *body, size_t body_len, int overflow);

/* Apply an attempt's outcome to a slot that was at a worker. Returns the verdict after
 * retries are accounted: SX_V_OK/SX_V_FAIL/SX_V_ABORT_BATCH mean the caller finishes the slot
 * (and for ABORT stops its batch); SX_V_RETRY means the slot is back in the retry heap. */
sx_verdict sx_sched_outcome(sx_sched *s, sx_slot *slot, sx_attempt *a, sx_rng *rng,
                            double now);

/* A slot left its worker without an outcome (cancelled): release its in-flight place. */
void sx_sched_release(sx_sched *s, sx_slot *slot);

/* Remove every waiting slot of batch b (queue and retry heap), calling fn on each. */
void sx_sched_remove_batch(sx_sched *s, sx_batch *b, void (*fn)(sx_slot *, void *), void *arg);

/* A success whose usage only the caller could read (an answer the worker left to Python, an
 * embeddings answer): settle its reservation now, as the outcome would have with
 * opts.settle_tokens. Once per slot; a failed slot or one already settled is left alone.
 * Returns 1 if it settled. */
int sx_sched_settle_late(sx_sched *s, sx_slot *slot, double used, double now);

/* The tokens an answer's usage says it used: total, else prompt + completion; -1 when it
 * gives neither (nothing to settle). */
double sx_usage_tokens(double prompt, double completion, double total);

/* Add a grant to the lease (opts.lease), paying any debt first. */
void sx_sched_grant(sx_sched *s, double requests, double tokens);

/* Current window limit (for stats; with several deployments, the sum of theirs, within
 * the engine's cap). */
int sx_sched_window(const sx_sched *s);

/* Deployment d's window limit, and whether it is in service now (not tripped). */
int sx_deploy_window(const sx_sched *s, const sx_deploy *d);
int sx_deploy_in_service(const sx_deploy *d, double now);

#endif
