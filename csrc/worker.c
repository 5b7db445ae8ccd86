/* worker.c — see worker.h. */
#include "worker.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <curl/curl.h>

#include "hints.h"
#include "sx_clock.h"

/* Requests taken from the scheduler per locked pass, and events handled per epoll_wait. */
#define SX_TAKE_CHUNK 256
#define SX_MAX_EVENTS 512
/* First size of a transfer's response buffer; it doubles as needed and is reused. */
#define SX_BUF_INITIAL 4096

typedef struct sx_xfer {
    CURL *easy;
    sx_worker *worker;
    sx_slot *slot;              /* NULL while pooled */
    char *buf;                  /* response body so far; reused across transfers */
    size_t len, cap;
    size_t max_body;
    int overflow;
    int result;                 /* CURLcode of the finished transfer */
    sx_hints hints;
    char errbuf[CURL_ERROR_SIZE];
    struct sx_xfer *next, *prev;   /* active list, or free list (next only) */
} sx_xfer;

struct sx_worker {
    sx_engine *engine;
    int index;
    pthread_t thread;
    int started;
    CURLM *multi;
    int epfd;
    int wakefd;
    atomic_int wake_pending;     /* a wake-up was written and not yet consumed */
    double curl_deadline;        /* libcurl's next timeout, < 0 for none (worker only) */
    uint64_t cancel_seen;        /* engine cancel_gen already handled (worker only) */
    sx_xfer *active;             /* transfers on the multi handle (worker only) */
    size_t nactive;
    sx_xfer *pool;               /* idle transfers with their easy handles (worker only) */
    sx_rng rng;
    sx_slot *taken[SX_TAKE_CHUNK];
};

/* ---- libcurl callbacks (run on this worker's thread, inside socket_action) ---- */

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    sx_xfer *x = userdata;
    size_t n = size * nmemb;
    if (x->len + n > x->max_body) {
        x->overflow = 1;
        return 0;  /* any short count makes libcurl abort the transfer */
    }
    if (x->len + n > x->cap) {
        size_t cap = x->cap ? x->cap : SX_BUF_INITIAL;
        while (cap < x->len + n)
            cap *= 2;
        char *grown = realloc(x->buf, cap);
        if (!grown)
            return 0;
        x->buf = grown;
        x->cap = cap;
    }
    memcpy(x->buf + x->len, ptr, n);
    x->len += n;
    return n;
}

static size_t on_header(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    sx_xfer *x = userdata;
    size_t n = size * nmemb;
    sx_hints_feed(&x->hints, ptr, n, sx_wall_now());
    return n;
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)easy;
    sx_worker *w = userp;
    if (what == CURL_POLL_REMOVE) {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, fd, NULL);
        return 0;
    }
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.data.fd = fd;
    ev.events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) | ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
    int op = socketp ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(w->epfd, op, fd, &ev) != 0) {
        /* The fd may have been closed and reused behind libcurl's bookkeeping: retry the
         * other way round. */
        op = op == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
        if (epoll_ctl(w->epfd, op, fd, &ev) != 0)
            return -1;
    }
    if (!socketp)
        curl_multi_assign(w->multi, fd, (void *)1);
    return 0;
}

static int on_timer(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    sx_worker *w = userp;
    /* No syscall here: the deadline is folded into the next epoll_wait's timeout. */
    w->curl_deadline = timeout_ms < 0 ? -1.0 : sx_now() + (double)timeout_ms / 1000.0;
    return 0;
}

/* ---- transfers ---- */

static sx_xfer *xfer_get(sx_worker *w)
{
    sx_xfer *x = w->pool;
    if (x) {
        w->pool = x->next;
        x->next = NULL;
        return x;
    }
    x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->worker = w;
    x->easy = curl_easy_init();
    if (!x->easy) {
        free(x);
        return NULL;
    }
    CURL *h = x->easy;
    curl_easy_setopt(h, CURLOPT_PRIVATE, x);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, x->errbuf);
    /* Signals would interrupt the Python thread's waits; threads resolve DNS instead. */
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "");
    curl_easy_setopt(h, CURLOPT_USERAGENT, "semex/0.1");
    if (w->engine->opts.http2) {
        curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    } else {
        curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    }
    return x;
}

static void xfer_destroy(sx_xfer *x)
{
    curl_easy_cleanup(x->easy);
    free(x->buf);
    free(x);
}

static void xfer_put(sx_worker *w, sx_xfer *x)
{
    x->slot = NULL;
    /* Do not let one huge response pin memory for the life of the pool. */
    if (x->cap > (1u << 20)) {
        free(x->buf);
        x->buf = NULL;
        x->cap = 0;
    }
    x->next = w->pool;
    w->pool = x;
}

static void active_add(sx_worker *w, sx_xfer *x)
{
    x->prev = NULL;
    x->next = w->active;
    if (w->active)
        w->active->prev = x;
    w->active = x;
    w->nactive++;
}

static void active_remove(sx_worker *w, sx_xfer *x)
{
    if (x->prev)
        x->prev->next = x->next;
    else
        w->active = x->next;
    if (x->next)
        x->next->prev = x->prev;
    x->next = x->prev = NULL;
    w->nactive--;
}

/* Start one admitted slot. On failure the attempt is reported at once as a local error. */
static void xfer_start(sx_worker *w, sx_slot *slot)
{
    sx_batch *b = slot->batch;
    const sx_request_opts *o = &b->opts;
    sx_xfer *x = xfer_get(w);
    if (!x)
        goto fail;
    x->slot = slot;
    x->len = 0;
    x->overflow = 0;
    x->max_body = o->max_body;
    x->errbuf[0] = '\0';
    sx_hints_reset(&x->hints);
    CURL *h = x->easy;
    curl_easy_setopt(h, CURLOPT_URL, b->url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, b->headers);
    /* Over TLS, wait for a connection that may turn out to multiplex (HTTP/2 via ALPN)
     * rather than opening one per request. Never for plain http://: there HTTP/1.1 is
     * certain, and PIPEWAIT would queue requests behind a slow one on the same host. */
    curl_easy_setopt(h, CURLOPT_PIPEWAIT, (w->engine->opts.http2 && b->is_https) ? 1L : 0L);
    if (slot->body) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)slot->body_len);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, slot->body);
    } else {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    }
    /* libcurl reads 0 as "no timeout": never let a sub-millisecond timeout round to it. */
    long timeout_ms = (long)ceil(o->timeout * 1000.0);
    long connect_ms = (long)ceil(o->connect_timeout * 1000.0);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms > 0 ? timeout_ms : 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, connect_ms > 0 ? connect_ms : 1L);
    curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)o->max_body);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, o->verify_tls ? 1L : 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, o->verify_tls ? 2L : 0L);
    if (curl_multi_add_handle(w->multi, h) != CURLM_OK) {
        xfer_put(w, x);
        goto fail;
    }
    active_add(w, x);
    return;

fail:;
    sx_attempt a;
    sx_classify(&a, CURLE_OUT_OF_MEMORY, "could not start the transfer", 0, NULL, 0, 0);
    sx_hints_reset(&a.hints);
    sx_engine *e = w->engine;
    double now = sx_now();
    sx_engine_lock(e);
    sx_engine_attempt_done_locked(e, slot, &a, &w->rng, NULL, 0, now);
    sx_engine_unlock(e);
}

/* Take what the scheduler admits, in chunks, up to this worker's share of the window. */
static void admit(sx_worker *w, double now, double *wake_at)
{
    sx_engine *e = w->engine;
    sx_xfer *stopped = NULL;

    sx_engine_lock(e);
    if (w->cancel_seen != e->cancel_gen) {
        w->cancel_seen = e->cancel_gen;
        sx_xfer *x = w->active;
        while (x) {
            sx_xfer *next = x->next;
            if (x->slot->batch->stopped) {
                active_remove(w, x);
                x->next = stopped;
                stopped = x;
            }
            x = next;
        }
    }
    sx_engine_unlock(e);

    if (stopped) {
        for (sx_xfer *x = stopped; x; x = x->next)
            curl_multi_remove_handle(w->multi, x->easy);
        sx_engine_lock(e);
        for (sx_xfer *x = stopped; x; x = x->next)
            sx_engine_slot_stopped_locked(e, x->slot, now);
        sx_engine_unlock(e);
        while (stopped) {
            sx_xfer *next = stopped->next;
            xfer_put(w, stopped);
            stopped = next;
        }
    }

    for (;;) {
        sx_engine_lock(e);
        if (e->stopping) {
            sx_engine_unlock(e);
            return;
        }
        size_t limit = (size_t)sx_sched_window(&e->sched);
        size_t share = (limit + (size_t)e->nworkers - 1) / (size_t)e->nworkers;
        size_t room = share > w->nactive ? share - w->nactive : 0;
        if (room > SX_TAKE_CHUNK)
            room = SX_TAKE_CHUNK;
        size_t n = room ? sx_sched_take(&e->sched, w->taken, room, now, wake_at) : 0;
        sx_engine_unlock(e);
        for (size_t i = 0; i < n; i++)
            xfer_start(w, w->taken[i]);
        if (n < SX_TAKE_CHUNK)
            return;
    }
}

/* Report every finished transfer in one locked pass. */
static void reap(sx_worker *w)
{
    sx_engine *e = w->engine;
    CURLMsg *msg;
    int left;
    sx_xfer *finished = NULL;
    while ((msg = curl_multi_info_read(w->multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        sx_xfer *x = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
        x->result = (int)msg->data.result;
        curl_multi_remove_handle(w->multi, x->easy);
        active_remove(w, x);
        x->next = finished;
        finished = x;
    }
    if (!finished)
        return;

    /* Classify and copy bodies without the lock; only the bookkeeping needs it. */
    typedef struct {
        sx_xfer *x;
        sx_attempt a;
        char *response;
    } done_t;
    size_t count = 0;
    for (sx_xfer *x = finished; x; x = x->next)
        count++;
    done_t stack_done[64];
    done_t *done = count <= 64 ? stack_done : malloc(count * sizeof *done);
    if (!done) {
        /* Out of memory: report one at a time with the stack array. */
        done = stack_done;
        count = 0;
    }
    size_t i = 0;
    double now = sx_now();
    for (sx_xfer *x = finished; x; x = x->next) {
        long status = 0;
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
        int code = x->result;
        done_t *d = count ? &done[i++] : &stack_done[0];
        d->x = x;
        sx_classify(&d->a, code, x->errbuf, (int)status, x->buf, x->len, x->overflow);
        d->a.hints = x->hints;
        d->response = NULL;
        /* Keep the body of successes and of final HTTP errors (it explains them). */
        if (code == CURLE_OK && x->len && d->a.verdict != SX_V_RETRY) {
            d->response = malloc(x->len);
            if (d->response)
                memcpy(d->response, x->buf, x->len);
        }
        if (!count) {
            sx_engine_lock(e);
            sx_engine_attempt_done_locked(e, x->slot, &d->a, &w->rng, d->response,
                                          d->response ? x->len : 0, now);
            sx_engine_unlock(e);
        }
    }
    if (count) {
        sx_engine_lock(e);
        for (i = 0; i < count; i++) {
            done_t *d = &done[i];
            sx_engine_attempt_done_locked(e, d->x->slot, &d->a, &w->rng, d->response,
                                          d->response ? d->x->len : 0, now);
        }
        int more = e->nworkers > 1 && (e->sched.queued || e->sched.heap_len);
        sx_engine_unlock(e);
        if (more) {
            /* Room opened in the shared window: let the other workers take their share. */
            for (int k = 0; k < e->nworkers; k++)
                if (e->workers[k] != w)
                    sx_worker_wake(e->workers[k]);
        }
    }
    if (done != stack_done)
        free(done);
    while (finished) {
        sx_xfer *next = finished->next;
        xfer_put(w, finished);
        finished = next;
    }
}

static void drain_wakefd(sx_worker *w)
{
    /* Read first, clear the flag second. A wake that lands in between sees the flag still
     * set and skips its write, which is fine: this worker runs a full round (admissions,
     * cancellations, shutdown check) right after, and that round sees what the waker
     * changed under the lock before waking. Clearing first would let the read swallow a
     * write made after the clear, leaving the flag set with nothing to read: every later
     * wake-up would then be skipped and the worker would sleep forever. */
    uint64_t value;
    while (read(w->wakefd, &value, sizeof value) == (ssize_t)sizeof value)
        ;
    atomic_store(&w->wake_pending, 0);
}

static void *worker_main(void *arg)
{
    sx_worker *w = arg;
    sx_engine *e = w->engine;
    struct epoll_event events[SX_MAX_EVENTS];
    int running;

    for (;;) {
        double now = sx_now();
        double wake_at = -1;
        admit(w, now, &wake_at);

        sx_engine_lock(e);
        int stopping = e->stopping;
        sx_engine_unlock(e);
        if (stopping)
            break;

        double deadline = w->curl_deadline;
        if (wake_at >= 0 && (deadline < 0 || wake_at < deadline))
            deadline = wake_at;
        int timeout_ms = -1;
        if (deadline >= 0) {
            double ms = ceil((deadline - sx_now()) * 1000.0);
            timeout_ms = ms <= 0 ? 0 : ms > 60000 ? 60000 : (int)ms;
        }
        int nev = epoll_wait(w->epfd, events, SX_MAX_EVENTS, timeout_ms);
        if (nev < 0 && errno != EINTR)
            break;
        for (int i = 0; i < nev; i++) {
            int fd = events[i].data.fd;
            if (fd == w->wakefd) {
                drain_wakefd(w);
                continue;
            }
            int flags = 0;
            if (events[i].events & EPOLLIN)
                flags |= CURL_CSELECT_IN;
            if (events[i].events & EPOLLOUT)
                flags |= CURL_CSELECT_OUT;
            if (events[i].events & (EPOLLERR | EPOLLHUP))
                flags |= CURL_CSELECT_ERR;
            curl_multi_socket_action(w->multi, fd, flags, &running);
        }
        if (w->curl_deadline >= 0 && sx_now() >= w->curl_deadline) {
            w->curl_deadline = -1;
            curl_multi_socket_action(w->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        }
        reap(w);
    }

    /* Shutdown: normally every transfer still here belongs to a batch that close() stopped.
     * If the loop itself failed (epoll_wait error), stop those batches first so that their
     * slots still end in a final state rather than pending. */
    sx_xfer *x = w->active;
    while (x) {
        sx_xfer *next = x->next;
        curl_multi_remove_handle(w->multi, x->easy);
        x = next;
    }
    double now = sx_now();
    sx_engine_lock(e);
    for (x = w->active; x; x = x->next)
        if (!x->slot->batch->stopped)
            sx_engine_stop_batch_locked(e, x->slot->batch, SX_FAILED, SX_ERR_TRANSPORT,
                                        "an engine worker thread failed (epoll_wait)");
    for (x = w->active; x; x = x->next)
        sx_engine_slot_stopped_locked(e, x->slot, now);
    sx_engine_unlock(e);
    while (w->active) {
        x = w->active;
        active_remove(w, x);
        xfer_destroy(x);
    }
    return NULL;
}

/* ---- lifecycle ---- */

static void worker_free(sx_worker *w)
{
    while (w->pool) {
        sx_xfer *x = w->pool;
        w->pool = x->next;
        xfer_destroy(x);
    }
    if (w->multi)
        curl_multi_cleanup(w->multi);
    if (w->epfd >= 0)
        close(w->epfd);
    if (w->wakefd >= 0)
        close(w->wakefd);
    free(w);
}

sx_worker *sx_worker_new(sx_engine *e, int index, char *err, size_t errlen)
{
    sx_worker *w = calloc(1, sizeof *w);
    if (!w) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    w->engine = e;
    w->index = index;
    w->epfd = -1;
    w->wakefd = -1;
    w->curl_deadline = -1;
    atomic_init(&w->wake_pending, 0);
    sx_rng_seed(&w->rng, (uint64_t)(sx_wall_now() * 1e9) ^ ((uint64_t)index << 32) ^
                             (uint64_t)(uintptr_t)w);

    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->epfd < 0 || w->wakefd < 0) {
        snprintf(err, errlen, "epoll/eventfd: %s", strerror(errno));
        goto err;
    }
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.fd = w->wakefd;
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wakefd, &ev) != 0) {
        snprintf(err, errlen, "epoll_ctl: %s", strerror(errno));
        goto err;
    }
    w->multi = curl_multi_init();
    if (!w->multi) {
        snprintf(err, errlen, "curl_multi_init failed");
        goto err;
    }
    long maxconn = e->opts.max_connections;
    if (maxconn <= 0)
        maxconn = e->opts.sched.max_in_flight / e->opts.workers + 16;
    curl_multi_setopt(w->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(w->multi, CURLMOPT_SOCKETDATA, w);
    curl_multi_setopt(w->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(w->multi, CURLMOPT_TIMERDATA, w);
    curl_multi_setopt(w->multi, CURLMOPT_MAXCONNECTS, maxconn);
    if (e->opts.http2)
        curl_multi_setopt(w->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    return w;

err:
    worker_free(w);
    return NULL;
}

int sx_worker_start(sx_worker *w, char *err, size_t errlen)
{
    int rc = pthread_create(&w->thread, NULL, worker_main, w);
    if (rc != 0) {
        snprintf(err, errlen, "pthread_create: %s", strerror(rc));
        return -1;
    }
    w->started = 1;
    return 0;
}

void sx_worker_wake(sx_worker *w)
{
    if (atomic_exchange(&w->wake_pending, 1))
        return;  /* already woken and not yet running: one wake-up covers both */
    uint64_t one = 1;
    ssize_t rc = write(w->wakefd, &one, sizeof one);
    (void)rc;  /* EAGAIN: the counter is already non-zero, the worker will wake anyway */
}

void sx_worker_join_and_free(sx_worker *w)
{
    if (!w)
        return;
    if (w->started)
        pthread_join(w->thread, NULL);
    worker_free(w);
}
