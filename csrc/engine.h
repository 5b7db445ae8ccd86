/* engine.h — the concurrency engine: workers + scheduler + result buffers.
 *
 * Life of a request: Python builds a batch (results.h) and submits it; the scheduler
 * (sched.h) queues its slots; a worker (worker.h) takes the slots the scheduler admits, runs
 * them on its libcurl multi handle, and reports each attempt back; the scheduler retries or
 * the slot is finished; when a batch's last slot is finished its waiters are woken.
 *
 * Threads: the caller's thread (Python, holding the GIL but never while it waits) and N
 * worker threads that never touch Python. One mutex, `lock`, guards the scheduler, every
 * batch's [E] fields and the list of live batches; workers take it about twice per event-loop
 * round, in bulk, never per byte. Worker-private state (curl handles, epoll) needs no lock.
 *
 * Ownership: a batch is reference-counted under `lock`: one reference for the caller's handle,
 * one for the engine while any of its slots is pending. The caller drops its reference with
 * sx_engine_release_batch, which cancels the batch if it is still running.
 *
 * fork(): the engine remembers its creator's pid. A child must not use or free it (its
 * threads do not exist there); callers check sx_engine_owned() and build a new engine. */
#ifndef SEMEX_ENGINE_H
#define SEMEX_ENGINE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "results.h"
#include "sched.h"

typedef struct sx_worker sx_worker;

typedef struct sx_engine_opts {
    int workers;             /* I/O threads, >= 1 */
    sx_sched_opts sched;
    int http2;               /* 1: negotiate HTTP/2 over TLS and multiplex (PIPEWAIT) */
    long max_connections;    /* connection cache size per worker; 0: derived from the cap */
    int own_http1;           /* 1: plain http:// requests run on the workers' own HTTP/1.1
                              * (h1.h) where the batch's route allows; 0: always libcurl */
} sx_engine_opts;

typedef struct sx_engine {
    pthread_mutex_t lock;
    sx_engine_opts opts;
    sx_sched sched;              /* [lock] */
    sx_batch *batches;           /* [lock] live batches (not yet done or still referenced) */
    uint64_t cancel_gen;         /* [lock] bumped when a batch with transfers at workers stops */
    int stopping;                /* [lock] close() began: workers exit, no new submissions */
    sx_worker **workers;         /* fixed after creation */
    int nworkers;
    pid_t pid;                   /* creator; see fork() above */
    int closed;                  /* caller thread only */
} sx_engine;

/* Create an engine and start its workers. On failure returns NULL and writes a reason. */
sx_engine *sx_engine_new(const sx_engine_opts *opts, char *err, size_t errlen);

/* Stop accepting work, cancel everything pending, join the workers. Idempotent. */
void sx_engine_close(sx_engine *e);

/* Close (if needed) and free. */
void sx_engine_free(sx_engine *e);

/* 1 if the calling process created the engine (not a fork child). */
int sx_engine_owned(const sx_engine *e);

/* Hand a batch to the engine. Returns 0, -1 if the queue limit would be exceeded, -2 if the
 * engine is closed, -3 if the batch has not one target per deployment of the engine (none
 * for an engine of one target). An empty batch completes at once. */
int sx_engine_submit(sx_engine *e, sx_batch *b);

/* Cancel whatever of the batch is not finished: waiting slots end cancelled at once,
 * transfers at workers are removed promptly and end cancelled. */
void sx_engine_cancel(sx_engine *e, sx_batch *b);

/* Drop the caller's reference (cancelling the batch if it is still running). */
void sx_engine_release_batch(sx_engine *e, sx_batch *b);

/* Wait up to `timeout` seconds (< 0: forever) for the batch to finish. Returns 1 when done.
 * Call without any Python lock held. */
int sx_engine_wait(sx_engine *e, sx_batch *b, double timeout);

/* Grant budget to the engine's lease (sched.h, sx_lease) and wake the workers; snapshot it. */
void sx_engine_grant(sx_engine *e, double requests, double tokens);
/* sx_sched_settle_late for slots[index[k]] of a finished batch, used[k] tokens each;
 * returns how many settled. */
size_t sx_engine_settle(sx_engine *e, sx_batch *b, const size_t *index, const double *used,
                        size_t n);
sx_lease sx_engine_lease(sx_engine *e);

void sx_engine_lock(sx_engine *e);
void sx_engine_unlock(sx_engine *e);

/* ---- for workers (worker.c), all with `lock` held ---- */

/* Finish or reschedule a slot after an attempt; may stop its batch and free it. */
void sx_engine_attempt_done_locked(sx_engine *e, sx_slot *slot, sx_attempt *a, sx_rng *rng,
                                   char *response, size_t response_len, double now);

/* A worker removed the transfer of a slot whose batch was stopped: finish it as the batch's
 * stop state says. */
void sx_engine_slot_stopped_locked(sx_engine *e, sx_slot *slot, double now);

/* Stop a batch: every pending slot ends with (state, kind, reason). */
void sx_engine_stop_batch_locked(sx_engine *e, sx_batch *b, sx_state state,
                                 sx_error_kind kind, const char *reason);

#endif
