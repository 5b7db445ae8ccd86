/* engine.c — see engine.h. */
#include "engine.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sx_clock.h"
#include "worker.h"

static void wake_all(sx_engine *e)
{
    for (int i = 0; i < e->nworkers; i++)
        sx_worker_wake(e->workers[i]);
}

sx_engine *sx_engine_new(const sx_engine_opts *opts, char *err, size_t errlen)
{
    sx_engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->opts = *opts;
    if (e->opts.workers < 1)
        e->opts.workers = 1;
    e->pid = getpid();
    if (pthread_mutex_init(&e->lock, NULL) != 0) {
        snprintf(err, errlen, "pthread_mutex_init failed");
        free(e);
        return NULL;
    }
    if (sx_sched_init(&e->sched, &e->opts.sched, sx_now()) != 0) {
        snprintf(err, errlen, "out of memory");
        sx_sched_destroy(&e->sched);
        pthread_mutex_destroy(&e->lock);
        free(e);
        return NULL;
    }
    e->opts.sched.deploys = NULL;  /* the caller's: the scheduler keeps its own copy */
    e->workers = calloc((size_t)e->opts.workers, sizeof *e->workers);
    if (!e->workers) {
        snprintf(err, errlen, "out of memory");
        goto err;
    }
    for (int i = 0; i < e->opts.workers; i++) {
        e->workers[i] = sx_worker_new(e, i, err, errlen);
        if (!e->workers[i])
            goto err;
        e->nworkers++;
    }
    /* Threads start only now: a running worker reads e->workers and e->nworkers. */
    for (int i = 0; i < e->nworkers; i++)
        if (sx_worker_start(e->workers[i], err, errlen) != 0)
            goto err;
    return e;

err:
    sx_engine_free(e);  /* stops and joins whatever started */
    return NULL;
}

void sx_engine_grant(sx_engine *e, double requests, double tokens)
{
    pthread_mutex_lock(&e->lock);
    sx_sched_grant(&e->sched, requests, tokens);
    pthread_mutex_unlock(&e->lock);
    wake_all(e);
}

size_t sx_engine_settle(sx_engine *e, sx_batch *b, const size_t *index, const double *used,
                        size_t n)
{
    size_t settled = 0;
    pthread_mutex_lock(&e->lock);
    double now = sx_now();
    for (size_t k = 0; k < n; k++)
        if (index[k] < b->n)
            settled += (size_t)sx_sched_settle_late(&e->sched, &b->slots[index[k]], used[k], now);
    pthread_mutex_unlock(&e->lock);
    if (settled)
        wake_all(e);  /* tokens came back: admission may go on */
    return settled;
}

sx_lease sx_engine_lease(sx_engine *e)
{
    pthread_mutex_lock(&e->lock);
    sx_lease lease = e->sched.lease;
    pthread_mutex_unlock(&e->lock);
    return lease;
}

int sx_engine_owned(const sx_engine *e)
{
    return e->pid == getpid();
}

void sx_engine_lock(sx_engine *e)
{
    pthread_mutex_lock(&e->lock);
}

void sx_engine_unlock(sx_engine *e)
{
    pthread_mutex_unlock(&e->lock);
}

static void unlink_batch(sx_engine *e, sx_batch *b)
{
    if (b->prev)
        b->prev->next = b->next;
    else if (e->batches == b)
        e->batches = b->next;
    if (b->next)
        b->next->prev = b->prev;
    b->prev = b->next = NULL;
}

static void batch_unref_locked(sx_engine *e, sx_batch *b)
{
    if (--b->refs == 0) {
        unlink_batch(e, b);
        sx_batch_free(b);
    }
}

/* The last slot of a batch finished: wake its waiters and drop the engine's reference. */
static void finish_slot_locked(sx_engine *e, sx_slot *s, sx_state state, sx_error_kind kind,
                               int status, char *response, size_t len, const char *error,
                               double now)
{
    sx_batch *b = s->batch;
    int completed = sx_batch_finish_slot(s, state, kind, status, response, len, error, now);
    sx_batch_notify(b);
    if (completed)
        batch_unref_locked(e, b);
}

int sx_engine_submit(sx_engine *e, sx_batch *b)
{
    pthread_mutex_lock(&e->lock);
    if (e->stopping) {
        pthread_mutex_unlock(&e->lock);
        return -2;
    }
    if (b->ntargets != e->sched.ndeploy) {
        pthread_mutex_unlock(&e->lock);
        return -3;
    }
    if (b->n == 0) {
        sx_batch_notify(b);
        pthread_mutex_unlock(&e->lock);
        return 0;
    }
    if (sx_sched_push_batch(&e->sched, b) != 0) {
        pthread_mutex_unlock(&e->lock);
        return -1;
    }
    b->refs++;  /* the engine's, until the last slot finishes */
    b->next = e->batches;
    if (e->batches)
        e->batches->prev = b;
    e->batches = b;
    pthread_mutex_unlock(&e->lock);
    wake_all(e);
    return 0;
}

struct stop_ctx {
    sx_engine *e;
    double now;
};

static void stop_waiting_slot(sx_slot *s, void *arg)
{
    struct stop_ctx *ctx = arg;
    sx_batch *b = s->batch;
    finish_slot_locked(ctx->e, s, (sx_state)b->stop_state, (sx_error_kind)b->stop_kind, 0,
                       NULL, 0, b->stop_reason, ctx->now);
}

void sx_engine_stop_batch_locked(sx_engine *e, sx_batch *b, sx_state state,
                                 sx_error_kind kind, const char *reason)
{
    if (b->stopped || b->done == b->n)
        return;
    b->stopped = 1;
    b->stop_state = (uint8_t)state;
    b->stop_kind = (uint8_t)kind;
    b->stop_reason = strdup(reason ? reason : "stopped");
    b->refs++;  /* finishing slots below may complete the batch; keep it alive until we return */
    struct stop_ctx ctx = {e, sx_now()};
    sx_sched_remove_batch(&e->sched, b, stop_waiting_slot, &ctx);
    if (b->in_flight > 0) {
        e->cancel_gen++;
        wake_all(e);
    }
    batch_unref_locked(e, b);
}

void sx_engine_cancel(sx_engine *e, sx_batch *b)
{
    pthread_mutex_lock(&e->lock);
    sx_engine_stop_batch_locked(e, b, SX_CANCELLED, SX_ERR_CANCELLED, "cancelled");
    pthread_mutex_unlock(&e->lock);
}

void sx_engine_release_batch(sx_engine *e, sx_batch *b)
{
    pthread_mutex_lock(&e->lock);
    sx_engine_stop_batch_locked(e, b, SX_CANCELLED, SX_ERR_CANCELLED,
                                "cancelled: the batch was discarded before it finished");
    batch_unref_locked(e, b);
    pthread_mutex_unlock(&e->lock);
}

int sx_engine_wait(sx_engine *e, sx_batch *b, double timeout)
{
    pthread_mutex_lock(&e->lock);
    if (timeout >= 0) {
        double until = sx_now() + timeout;
        struct timespec ts;
        ts.tv_sec = (time_t)until;
        ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        while (b->done < b->n) {
            if (pthread_cond_timedwait(&b->cond, &e->lock, &ts) == ETIMEDOUT)
                break;
        }
    } else {
        while (b->done < b->n)
            pthread_cond_wait(&b->cond, &e->lock);
    }
    int done = b->done == b->n;
    pthread_mutex_unlock(&e->lock);
    return done;
}

void sx_engine_attempt_done_locked(sx_engine *e, sx_slot *slot, sx_attempt *a, sx_rng *rng,
                                   char *response, size_t response_len, double now)
{
    sx_batch *b = slot->batch;
    if (b->stopped) {
        /* The batch stopped while this attempt ran; its verdict no longer matters. */
        sx_sched_release(&e->sched, slot);
        free(response);
        finish_slot_locked(e, slot, (sx_state)b->stop_state, (sx_error_kind)b->stop_kind, 0,
                           NULL, 0, b->stop_reason, now);
        return;
    }
    sx_verdict v = sx_sched_outcome(&e->sched, slot, a, rng, now);
    if (v == SX_V_RETRY) {
        free(response);
        return;
    }
    if (v == SX_V_OK) {
        slot->chat = a->chat;
        finish_slot_locked(e, slot, SX_OK, SX_ERR_NONE, a->http_status, response,
                           response_len, NULL, now);
        return;
    }
    if (v == SX_V_ABORT_BATCH) {
        char reason[400];
        snprintf(reason, sizeof reason, "not completed: request %u of this batch failed: %s",
                 slot->index, a->reason);
        b->refs++;
        finish_slot_locked(e, slot, SX_FAILED, a->kind, a->http_status, response,
                           response_len, a->reason, now);
        sx_engine_stop_batch_locked(e, b, SX_FAILED, SX_ERR_ABORTED, reason);
        batch_unref_locked(e, b);
        return;
    }
    finish_slot_locked(e, slot, SX_FAILED, a->kind, a->http_status, response, response_len,
                       a->reason, now);
}

void sx_engine_slot_stopped_locked(sx_engine *e, sx_slot *slot, double now)
{
    sx_batch *b = slot->batch;
    sx_sched_release(&e->sched, slot);
    finish_slot_locked(e, slot, (sx_state)b->stop_state, (sx_error_kind)b->stop_kind, 0, NULL,
                       0, b->stop_reason, now);
}

void sx_engine_close(sx_engine *e)
{
    if (!e || e->closed)
        return;
    e->closed = 1;
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    /* Stopping a batch may unlink it from the list; walk with care. */
    sx_batch *b = e->batches;
    while (b) {
        b->refs++;
        sx_engine_stop_batch_locked(e, b, SX_CANCELLED, SX_ERR_CANCELLED,
                                    "cancelled: the engine was closed");
        sx_batch *next = b->next;
        batch_unref_locked(e, b);
        b = next;
    }
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < e->nworkers; i++)
        sx_worker_wake(e->workers[i]);
    /* All joined before any is freed: a worker finishing its last round may still wake a
     * sibling (reap), which must not have been freed under it. */
    for (int i = 0; i < e->nworkers; i++)
        sx_worker_join(e->workers[i]);
    for (int i = 0; i < e->nworkers; i++)
        sx_worker_join_and_free(e->workers[i]);
    e->nworkers = 0;
}

void sx_engine_free(sx_engine *e)
{
    if (!e)
        return;
    sx_engine_close(e);
    /* Callers release their batches first: sx_engine_release_batch needs the lock. (The
     * Python Batch object keeps its Engine alive for exactly this reason.) */
    free(e->workers);
    e->workers = NULL;
    sx_sched_destroy(&e->sched);
    pthread_mutex_destroy(&e->lock);
    free(e);
}
