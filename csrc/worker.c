/* worker.c — see worker.h. */
#include "worker.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <curl/curl.h>

#include "h1.h"
#include "hints.h"
#include "nativejson.h"
#include "sse.h"
#include "sx_clock.h"

/* Requests taken from the scheduler per locked pass, and events handled per epoll_wait. */
#define SX_TAKE_CHUNK 256
#define SX_MAX_EVENTS 512
/* Transfers per libcurl multi handle. libcurl 7.x keeps one connection cache per multi handle
 * and walks it linearly: every curl_multi_remove_handle visits every cached connection
 * (close_connect_only) and every new transfer walks the host's connection list looking for an
 * idle one, so with one multi handle the cost per request grows with the number in flight
 * (~20% of the worker at 1,000 in flight, ~90% at 10,000). A worker therefore spreads its
 * transfers over "shards", each a multi handle with its own cache of at most about this many
 * connections; all shards share the worker's epoll set, and their timers fold into one
 * epoll_wait timeout. */
#ifndef SX_SHARD_CAP
#define SX_SHARD_CAP 64
#endif
/* epoll tag of the wake-up eventfd (sockets carry their shard index), and of the worker's
 * own HTTP/1.1 connections (h1.h). */
#define SX_WAKE_TAG UINT32_MAX
#define SX_H1_TAG (UINT32_MAX - 1)
/* The own HTTP/1.1 path: bytes read per recv(), and how long an idle connection is kept
 * (libcurl's default maximum age of a connection, CURLOPT_MAXAGE_CONN). */
#define SX_H1_RBUF 65536
#define SX_H1_MAX_IDLE_AGE 118.0
/* New connections a worker opens per round. Opening one costs ~75 µs (socket, connect,
 * libcurl's connection setup); opening 1,000 in one pass delays every first request by the
 * whole pass (~80 ms) and holds up completions meanwhile. In steps, the first requests go out
 * after a few ms and the loop keeps serving the ones already answered. Transfers that can
 * reuse an idle connection are not limited. */
#ifndef SX_RAMP_PER_ROUND
#define SX_RAMP_PER_ROUND 64
#endif
/* First size of a transfer's response buffer when the server sent no Content-Length; it
 * doubles as needed. The buffer is allocated per response and handed to the slot as is. */
#ifndef SX_BUF_INITIAL
#define SX_BUF_INITIAL 1024
#endif
/* libcurl's receive buffer (CURLOPT_BUFFERSIZE) is allocated for every transfer while it runs
 * (16 KB by default, libcurl's minimum is 1 KB): at 10,000 in flight that is most of the
 * engine's memory that is not libcurl's handle itself. A whole response that fits in it is read
 * with one recv(); a larger one takes a round per buffer. So the size follows the responses:
 * the smallest power of two that held the largest response (headers + body) of the last
 * SX_RECV_WINDOW completions, between SX_RECV_MIN and SX_RECV_MAX; it grows at once and
 * shrinks only after a whole window of smaller responses. */
#ifndef SX_RECV_MIN
#define SX_RECV_MIN 1024L
#endif
#define SX_RECV_MAX 16384L
#define SX_RECV_WINDOW 256

/* One multi handle of a worker and the transfers on it (worker thread only). */
typedef struct sx_shard {
    sx_worker *worker;
    CURLM *multi;
    uint32_t index;             /* in worker->shards; tags its sockets in epoll */
    double deadline;            /* libcurl's next timeout for this multi, < 0 for none */
    size_t nactive;             /* transfers on it */
    size_t peak;                /* most transfers it ever ran at once: ~ its connections */
    int touched;                /* on the worker's list of shards to reap this round */
} sx_shard;

typedef struct sx_xfer {
    CURL *easy;
    sx_worker *worker;
    sx_shard *shard;            /* the multi handle it runs on; NULL while pooled */
    sx_slot *slot;              /* NULL while pooled */
    char *buf;                  /* this response's body so far; passes to the slot */
    size_t len, cap;
    size_t max_body;
    int overflow;
    size_t header_bytes;        /* response header bytes seen (for the receive buffer size) */
    long recv_buffer;           /* CURLOPT_BUFFERSIZE currently set on the handle */
    uint8_t custom_ca;          /* CAINFO/CAPATH were set from a batch (not the default) */
    int result;                 /* CURLcode of the finished transfer */
    sx_hints hints;
    /* Streamed answers (sse.h): the raw body still accumulates in buf (Python reads it if
     * the reader falls back); the reader assembles the answer beside it. */
    uint8_t event_stream;       /* the response's Content-Type is text/event-stream */
    uint8_t body_started;       /* on_body ran for this response */
    uint8_t sse_on;             /* ... and decided to read it as a stream (2xx, parse_chat) */
    uint8_t dirty;              /* on the worker's list of transfers with new text */
    sx_sse sse;
    size_t delivered;           /* bytes of sse.content already queued for Python */
    struct sx_xfer *dirty_next;
    char errbuf[CURL_ERROR_SIZE];
    struct sx_xfer *next, *prev;   /* active list, or free list (next only) */
    /* An attempt on the worker's own HTTP/1.1 (h1.h) instead of libcurl: */
    const sx_h1_route *route;   /* non-NULL for such an attempt */
    struct sx_h1c *conn;        /* the connection carrying it */
    sx_h1_resp resp;            /* the response read so far */
    char *head;                 /* the request head; then the body goes from the slot */
    size_t head_len, head_cap;
    size_t sent;                /* bytes of head + body written */
    double started, deadline, connect_deadline;
    uint8_t addr_i;             /* route address being tried */
    uint8_t reopened;           /* already moved once off a connection the server had closed */
} sx_xfer;

/* A connection of the own HTTP/1.1 path. Idle ones wait in their origin's pool, registered
 * for input so a close by the server is seen (and the connection dropped) at once. */
typedef struct sx_h1c {
    int fd;
    struct sx_h1pool *pool;
    sx_xfer *x;                 /* the attempt on it; NULL when idle */
    uint32_t events;            /* registered epoll events */
    uint8_t connecting;
    uint8_t used;               /* has carried a whole response before */
    double idle_since;
    struct sx_h1c *next;        /* the pool's idle stack */
} sx_h1c;

typedef struct sx_h1pool {
    char *origin;               /* sx_h1_route.origin */
    sx_h1c *idle;               /* most recently used first */
    size_t nidle;
    struct sx_h1pool *next;
} sx_h1pool;

struct sx_worker {
    sx_engine *engine;
    int index;
    pthread_t thread;
    int started;
    int epfd;
    int wakefd;
    atomic_int wake_pending;     /* a wake-up was written and not yet consumed */
    uint64_t cancel_seen;        /* engine cancel_gen already handled (worker only) */
    /* The fields below are the worker thread's own. */
    CURLSH *share;               /* DNS cache and TLS sessions, shared by the shards */
    sx_shard **shards;
    uint32_t nshards, shards_alloc;
    uint32_t fill;               /* no shard below this index has room */
    uint32_t *touched;           /* shards that ran socket_action this round */
    uint32_t ntouched;
    long shard_maxconnects;
    size_t warm;                 /* sum of the shards' peaks: connections likely open */
    size_t ramp_left;            /* new connections still allowed this round */
    /* Sockets libcurl opened through on_open, indexed by fd: their epoll registration is
     * kept when libcurl stops watching them between requests (see on_socket). */
    struct sx_fdinfo *fds;
    size_t nfds;
    sx_xfer *active;             /* transfers on the multi handles */
    size_t nactive;
    sx_xfer *pool;               /* idle transfers with their easy handles (worker only) */
    sx_xfer *dirty;              /* transfers whose stream has text not yet queued; filled
                                  * inside socket_action, emptied by the same round's reap */
    sx_rng rng;
    long recv_buffer;            /* receive buffer size for new transfers (worker only) */
    char *default_cainfo;        /* libcurl's built-in CA bundle and directory (may be NULL) */
    char *default_capath;
    long recv_window_max;        /* largest size wanted in the current window */
    unsigned recv_window_n;      /* completions counted in the current window */
    /* The own HTTP/1.1 path (worker only). */
    sx_h1pool *pools;            /* one per origin */
    sx_h1c **conns;              /* by fd */
    size_t nconns;
    size_t h1_open, h1_peak;     /* connections open now, and at most */
    size_t h1_max_idle;          /* idle connections kept per origin */
    sx_xfer *h1_done;            /* finished attempts, reported by this round's reap */
    double h1_next_deadline;     /* earliest timeout of an attempt on it; < 0: none */
    char *rbuf;                  /* SX_H1_RBUF bytes */
    sx_slot *taken[SX_TAKE_CHUNK];
};

typedef struct sx_fdinfo {
    uint32_t events;            /* registered epoll events */
    uint32_t shard;             /* registered shard tag */
    uint8_t owned;              /* opened by on_open and not yet closed by on_close */
    uint8_t registered;         /* in the epoll set */
    uint8_t watched;            /* libcurl wants its events (not CURL_POLL_REMOVE'd) */
} sx_fdinfo;

static void h1_close(sx_worker *w, sx_h1c *c);

/* ---- libcurl callbacks (run on this worker's thread, inside socket_action) ---- */

/* The response's status code, from whichever path carries the attempt. */
static long xfer_status(sx_xfer *x)
{
    if (x->route)
        return x->resp.status;
    long status = 0;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
    return status;
}

/* The first body bytes of a response: read it as an event stream if it is one. */
static void body_start(sx_xfer *x)
{
    x->body_started = 1;
    if (!x->event_stream || x->slot->batch->opts.parse_chat != SX_DIALECT_OPENAI)
        return;
    long status = xfer_status(x);
    x->sse_on = status >= 200 && status < 300;
}

/* Read what arrived of a stream; queue its new text for this round's reap. */
static void stream_more(sx_xfer *x)
{
    sx_sse_feed(&x->sse, x->buf, x->len);
    if (!x->dirty && x->sse.content_len > x->delivered && x->slot->batch->opts.stream_deltas) {
        sx_worker *w = x->worker;
        x->dirty = 1;
        x->dirty_next = w->dirty;
        w->dirty = x;
    }
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    sx_xfer *x = userdata;
    size_t n = size * nmemb;
    if (!x->body_started)
        body_start(x);
    if (x->len + n > x->max_body) {
        x->overflow = 1;
        return 0;  /* any short count makes libcurl abort the transfer */
    }
    if (x->len + n > x->cap) {
        size_t cap = x->cap;
        if (!cap) {
            /* First bytes: size the buffer from Content-Length when the server sent one
             * (exact for identity encoding; a compressed body grows from there). */
            curl_off_t cl = -1;
            if (x->route)
                cl = x->resp.chunked ? -1 : (curl_off_t)x->resp.content_length;
            else
                curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
            cap = cl > 0 && (size_t)cl <= x->max_body ? (size_t)cl : SX_BUF_INITIAL;
        }
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
    if (x->sse_on)
        stream_more(x);
    return n;
}

static size_t on_header(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    sx_xfer *x = userdata;
    size_t n = size * nmemb;
    x->header_bytes += n;
    sx_hints_feed(&x->hints, ptr, n, -1.0);
    /* Only the final response's headers count: a status line starts them again. */
    if (n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) {
        x->event_stream = 0;
    } else if (n > 13 && (ptr[0] == 'c' || ptr[0] == 'C') &&
               strncasecmp(ptr, "content-type:", 13) == 0) {
        size_t i = 13;
        while (i < n && (ptr[i] == ' ' || ptr[i] == '\t'))
            i++;
        x->event_stream = n - i >= 17 && strncasecmp(ptr + i, "text/event-stream", 17) == 0;
    }
    return n;
}

static sx_fdinfo *owned_fd(sx_worker *w, curl_socket_t fd)
{
    if (fd < 0 || (size_t)fd >= w->nfds || !w->fds[fd].owned)
        return NULL;
    return &w->fds[fd];
}

/* libcurl's socket callback. A kept-alive connection's socket is dropped from the watch list
 * when a transfer finishes (CURL_POLL_REMOVE) and added back when the next one starts on it:
 * two epoll_ctl calls per request. For the sockets we opened (on_open) and whose closing we
 * see (on_close), the registration is kept instead, and a watch that asks for what is already
 * registered costs no syscall. An event on a kept but unwatched socket (an idle connection
 * closed by the server) drops the registration then (worker_main). */
static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)easy;
    sx_shard *sh = userp;
    sx_worker *w = sh->worker;
    sx_fdinfo *info = owned_fd(w, fd);
    if (what == CURL_POLL_REMOVE) {
        if (info) {
            info->watched = 0;
            return 0;
        }
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, fd, NULL);
        return 0;
    }
    uint32_t events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) |
                      ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
    if (!(info && info->registered && info->events == events && info->shard == sh->index)) {
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.data.u64 = ((uint64_t)sh->index << 32) | (uint32_t)fd;
        ev.events = events;
        int op = (socketp || (info && info->registered)) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
        if (epoll_ctl(w->epfd, op, fd, &ev) != 0) {
            /* The fd may have been closed and reused behind libcurl's bookkeeping: retry the
             * other way round. */
            op = op == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
            if (epoll_ctl(w->epfd, op, fd, &ev) != 0) {
                if (info)
                    info->registered = 0;
                return -1;
            }
        }
        if (info) {
            info->registered = 1;
            info->events = events;
            info->shard = sh->index;
        }
    }
    if (info)
        info->watched = 1;
    if (!socketp)
        curl_multi_assign(sh->multi, fd, (void *)1);
    return 0;
}

/* libcurl's socket opener: the plain socket() it would make, recorded as ours. */
static curl_socket_t on_open(void *clientp, curlsocktype purpose, struct curl_sockaddr *addr)
{
    (void)purpose;
    sx_worker *w = clientp;
    curl_socket_t fd = socket(addr->family, addr->socktype, addr->protocol);
    if (fd < 0)
        return CURL_SOCKET_BAD;
    if ((size_t)fd >= w->nfds) {
        size_t n = w->nfds ? w->nfds : 256;
        while (n <= (size_t)fd)
            n *= 2;
        sx_fdinfo *fds = realloc(w->fds, n * sizeof *fds);
        if (!fds)
            return fd;  /* not recorded: handled like any socket we did not open */
        memset(fds + w->nfds, 0, (n - w->nfds) * sizeof *fds);
        w->fds = fds;
        w->nfds = n;
    }
    memset(&w->fds[fd], 0, sizeof w->fds[fd]);
    w->fds[fd].owned = 1;
    return fd;
}

/* libcurl's socket closer. Closing drops the fd from the epoll set (nothing else holds it). May
 * run on the thread that frees the worker, after the worker thread ended. */
static int on_close(void *clientp, curl_socket_t fd)
{
    sx_worker *w = clientp;
    if (fd >= 0 && (size_t)fd < w->nfds)
        memset(&w->fds[fd], 0, sizeof w->fds[fd]);
    return close(fd);
}

static int on_timer(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    sx_shard *sh = userp;
    /* No syscall here: the deadline is folded into the next epoll_wait's timeout. */
    sh->deadline = timeout_ms < 0 ? -1.0 : sx_now() + (double)timeout_ms / 1000.0;
    return 0;
}

/* ---- shards ---- */

static sx_shard *shard_new(sx_worker *w)
{
    if (w->nshards == w->shards_alloc) {
        uint32_t n = w->shards_alloc ? w->shards_alloc * 2 : 8;
        sx_shard **shards = realloc(w->shards, n * sizeof *shards);
        if (!shards)
            return NULL;
        w->shards = shards;
        uint32_t *touched = realloc(w->touched, n * sizeof *touched);
        if (!touched)
            return NULL;
        w->touched = touched;
        w->shards_alloc = n;
    }
    sx_shard *sh = calloc(1, sizeof *sh);
    if (!sh)
        return NULL;
    sh->worker = w;
    sh->index = w->nshards;
    sh->deadline = -1;
    sh->multi = curl_multi_init();
    if (!sh->multi) {
        free(sh);
        return NULL;
    }
    curl_multi_setopt(sh->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(sh->multi, CURLMOPT_SOCKETDATA, sh);
    curl_multi_setopt(sh->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(sh->multi, CURLMOPT_TIMERDATA, sh);
    curl_multi_setopt(sh->multi, CURLMOPT_MAXCONNECTS, w->shard_maxconnects);
    if (w->engine->opts.http2)
        curl_multi_setopt(sh->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    w->shards[w->nshards++] = sh;
    return sh;
}

/* The first shard with room (so connections are reused where transfers just finished), or a
 * new one. */
static sx_shard *shard_pick(sx_worker *w)
{
    for (uint32_t i = w->fill; i < w->nshards; i++) {
        if (w->shards[i]->nactive < SX_SHARD_CAP) {
            w->fill = i;
            return w->shards[i];
        }
    }
    w->fill = w->nshards;
    return shard_new(w);
}

/* A transfer left shard sh (finished, cancelled or failed to start). */
static void shard_release(sx_worker *w, sx_shard *sh)
{
    sh->nactive--;
    if (sh->index < w->fill)
        w->fill = sh->index;
}

static void shard_touch(sx_worker *w, sx_shard *sh)
{
    if (!sh->touched) {
        sh->touched = 1;
        w->touched[w->ntouched++] = sh->index;
    }
}

static void shard_action(sx_worker *w, sx_shard *sh, curl_socket_t fd, int flags)
{
    int running;
    curl_multi_socket_action(sh->multi, fd, flags, &running);
    shard_touch(w, sh);
}

/* Remove a transfer from its multi handle, or close its own HTTP/1.1 connection. */
static void xfer_detach(sx_worker *w, sx_xfer *x)
{
    if (x->route) {
        if (x->conn)
            h1_close(w, x->conn);
        return;
    }
    curl_multi_remove_handle(x->shard->multi, x->easy);
    shard_release(w, x->shard);
    x->shard = NULL;
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
    sx_sse_init(&x->sse);
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
    /* gzip only, not "" (every encoding libcurl has: "deflate, gzip, br, zstd"): libcurl 7.88
     * formats request headers one byte at a time through its printf (~200 instructions per
     * byte of an Accept-Encoding header, which passes twice), so the 18 bytes saved are ~4% of
     * the worker's instructions per request. Every provider speaks gzip. */
    curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "gzip");
    curl_easy_setopt(h, CURLOPT_USERAGENT, "semex/0.1");
    curl_easy_setopt(h, CURLOPT_OPENSOCKETFUNCTION, on_open);
    curl_easy_setopt(h, CURLOPT_OPENSOCKETDATA, w);
    curl_easy_setopt(h, CURLOPT_CLOSESOCKETFUNCTION, on_close);
    curl_easy_setopt(h, CURLOPT_CLOSESOCKETDATA, w);
    if (w->share)
        curl_easy_setopt(h, CURLOPT_SHARE, w->share);
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
    free(x->head);
    sx_h1_resp_free(&x->resp);
    sx_sse_reset(&x->sse);
    free(x);
}

static void xfer_put(sx_worker *w, sx_xfer *x)
{
    x->slot = NULL;
    x->route = NULL;  /* the batch that owns it may go */
    /* A pooled transfer holds no response buffer: each response gets its own, which then
     * belongs to the slot, so idle handles pin no memory. */
    free(x->buf);
    x->buf = NULL;
    x->cap = 0;
    x->len = 0;
    sx_sse_reset(&x->sse);
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

/* ---- the own HTTP/1.1 path (h1.h) ---- */

static void h1_finish(sx_worker *w, sx_xfer *x, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int h1_connect(sx_worker *w, sx_xfer *x, double now);

static sx_h1c *h1_conn_of(sx_worker *w, int fd)
{
    return fd >= 0 && (size_t)fd < w->nconns ? w->conns[fd] : NULL;
}

static int h1_watch(sx_worker *w, sx_h1c *c, uint32_t events)
{
    if (c->events == events)
        return 0;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = ((uint64_t)SX_H1_TAG << 32) | (uint32_t)c->fd;
    if (epoll_ctl(w->epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) != 0)
        return -1;
    c->events = events;
    return 0;
}

/* Close a connection (idle, or under an attempt that has let go of it). */
static void h1_close(sx_worker *w, sx_h1c *c)
{
    if (c->x)
        c->x->conn = NULL;
    w->conns[c->fd] = NULL;
    close(c->fd);  /* drops it from the epoll set: nothing else holds the fd */
    w->h1_open--;
    free(c);
}

static sx_h1pool *h1_pool(sx_worker *w, const sx_h1_route *r)
{
    for (sx_h1pool *p = w->pools; p; p = p->next)
        if (strcmp(p->origin, r->origin) == 0)
            return p;
    sx_h1pool *p = calloc(1, sizeof *p);
    if (!p || !(p->origin = strdup(r->origin))) {
        free(p);
        return NULL;
    }
    p->next = w->pools;
    w->pools = p;
    return p;
}

/* An idle connection of x's origin, the most recently used, or NULL. */
static sx_h1c *h1_take_idle(sx_worker *w, sx_h1pool *p, double now)
{
    while (p->idle) {
        sx_h1c *c = p->idle;
        p->idle = c->next;
        p->nidle--;
        c->next = NULL;
        if (now - c->idle_since <= SX_H1_MAX_IDLE_AGE)
            return c;
        h1_close(w, c);
    }
    return NULL;
}

/* The attempt let go of its connection: back to the pool when it can carry another. */
static void h1_release(sx_worker *w, sx_xfer *x, int reusable, double now)
{
    sx_h1c *c = x->conn;
    if (!c)
        return;
    x->conn = NULL;
    c->x = NULL;
    if (reusable && c->pool && c->pool->nidle < w->h1_max_idle && h1_watch(w, c, EPOLLIN) == 0) {
        c->used = 1;
        c->idle_since = now;
        c->next = c->pool->idle;
        c->pool->idle = c;
        c->pool->nidle++;
        return;
    }
    h1_close(w, c);
}

/* The attempt is over (code: CURLE_OK or the CURLcode libcurl would have given): off the
 * active list, onto the list this round's reap reports. */
static void h1_finish(sx_worker *w, sx_xfer *x, int code, const char *fmt, ...)
{
    if (x->conn)
        h1_close(w, x->conn);
    x->result = code;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(x->errbuf, sizeof x->errbuf, fmt, ap);
        va_end(ap);
    }
    active_remove(w, x);
    x->next = w->h1_done;
    w->h1_done = x;
}

static long h1_ms(const sx_xfer *x, double now)
{
    return (long)((now - x->started) * 1000.0);
}

/* Write what is left of x's request. Returns 0 while x goes on, -1 once it finished. */
static int h1_send(sx_worker *w, sx_xfer *x, double now);

/* A connection failed before the response's first byte on a connection that had carried
 * one before: the server closed it while idle (keep-alive timeout). Like libcurl, send the
 * request again on a new connection, once, without counting an attempt. Returns 1 if so. */
static int h1_reopen(sx_worker *w, sx_xfer *x, double now)
{
    sx_h1c *c = x->conn;
    if (!c || !c->used || x->reopened || x->resp.received)
        return 0;
    x->reopened = 1;
    h1_close(w, c);
    x->sent = 0;
    x->addr_i = 0;
    sx_h1_resp_reset(&x->resp);
    if (h1_connect(w, x, now) == 0 && x->conn && !x->conn->connecting)
        h1_send(w, x, now);
    return 1;
}

static void h1_fail_io(sx_worker *w, sx_xfer *x, int code, const char *what, int err,
                       double now)
{
    if (h1_reopen(w, x, now))
        return;
    h1_finish(w, x, code, "%s: %s", what, strerror(err));
}

static int h1_send(sx_worker *w, sx_xfer *x, double now)
{
    sx_h1c *c = x->conn;
    const sx_slot *slot = x->slot;
    size_t body_len = slot->body ? slot->body_len : 0;
    size_t total = x->head_len + body_len;
    while (x->sent < total) {
        struct iovec iov[2];
        int k = 0;
        if (x->sent < x->head_len) {
            iov[k].iov_base = x->head + x->sent;
            iov[k++].iov_len = x->head_len - x->sent;
        }
        size_t boff = x->sent > x->head_len ? x->sent - x->head_len : 0;
        if (body_len > boff) {
            iov[k].iov_base = (char *)slot->body + boff;
            iov[k++].iov_len = body_len - boff;
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)k;
        ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        if (n > 0) {
            x->sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (h1_watch(w, c, EPOLLIN | EPOLLOUT) != 0) {
                h1_finish(w, x, CURLE_SEND_ERROR, "epoll_ctl: %s", strerror(errno));
                return -1;
            }
            return 0;
        }
        h1_fail_io(w, x, CURLE_SEND_ERROR, "Send failure", n < 0 ? errno : EPIPE, now);
        return x->conn ? 0 : -1;
    }
    if (h1_watch(w, c, EPOLLIN) != 0) {
        h1_finish(w, x, CURLE_SEND_ERROR, "epoll_ctl: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* Open a connection for x to its route's address x->addr_i (or the next that takes it).
 * Returns 0 with x->conn set (maybe still connecting), or -1 once x finished. */
static int h1_connect(sx_worker *w, sx_xfer *x, double now)
{
    const sx_h1_route *r = x->route;
    int err = 0;
    while (x->addr_i < r->naddrs) {
        const struct sockaddr_storage *sa = &r->addrs[x->addr_i];
        int fd = socket(sa->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            h1_finish(w, x, CURLE_COULDNT_CONNECT, "socket: %s", strerror(errno));
            return -1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        int rc = connect(fd, (const struct sockaddr *)sa, r->addrlens[x->addr_i]);
        if (rc != 0 && errno != EINPROGRESS) {
            err = errno;
            close(fd);
            x->addr_i++;
            continue;
        }
        if ((size_t)fd >= w->nconns) {
            size_t n = w->nconns ? w->nconns : 256;
            while (n <= (size_t)fd)
                n *= 2;
            sx_h1c **grown = realloc(w->conns, n * sizeof *grown);
            if (!grown) {
                close(fd);
                h1_finish(w, x, CURLE_OUT_OF_MEMORY, "out of memory");
                return -1;
            }
            memset(grown + w->nconns, 0, (n - w->nconns) * sizeof *grown);
            w->conns = grown;
            w->nconns = n;
        }
        sx_h1c *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            h1_finish(w, x, CURLE_OUT_OF_MEMORY, "out of memory");
            return -1;
        }
        c->fd = fd;
        c->pool = h1_pool(w, r);
        c->x = x;
        c->connecting = rc != 0;
        w->conns[fd] = c;
        x->conn = c;
        if (++w->h1_open > w->h1_peak) {
            w->h1_peak = w->h1_open;
            w->warm++;
            if (w->ramp_left)
                w->ramp_left--;
        }
        if (c->connecting && h1_watch(w, c, EPOLLOUT) != 0) {
            h1_finish(w, x, CURLE_COULDNT_CONNECT, "epoll_ctl: %s", strerror(errno));
            return -1;
        }
        return 0;
    }
    h1_finish(w, x, CURLE_COULDNT_CONNECT, "Failed to connect to %s port %u after %ld ms: %s",
              r->host, r->port, h1_ms(x, now), strerror(err ? err : ECONNREFUSED));
    return -1;
}

static void h1_sink_header(void *u, const char *line, size_t len)
{
    on_header((char *)line, 1, len, u);
}

static size_t h1_sink_body(void *u, const char *p, size_t n)
{
    return on_body((char *)p, 1, n, u);
}

/* What h1.h's reader reports, as the CURLcode libcurl would have given. */
static int h1_code(int rc)
{
    switch (rc) {
    case SX_H1_E_EMPTY:
        return CURLE_GOT_NOTHING;
    case SX_H1_E_PARTIAL:
        return CURLE_PARTIAL_FILE;
    case SX_H1_E_ENCODING:
        return CURLE_BAD_CONTENT_ENCODING;
    case SX_H1_E_STOPPED:
        return CURLE_WRITE_ERROR;
    default:
        return CURLE_WEIRD_SERVER_REPLY;
    }
}

static void h1_read(sx_worker *w, sx_xfer *x, double now)
{
    sx_h1c *c = x->conn;
    sx_h1_sink sink = {h1_sink_header, h1_sink_body, x};
    for (;;) {
        ssize_t n = recv(c->fd, w->rbuf, SX_H1_RBUF, 0);
        if (n > 0) {
            size_t used = 0;
            int rc = sx_h1_feed(&x->resp, w->rbuf, (size_t)n, &used, &sink);
            if (rc == SX_H1_DONE) {
                size_t total = x->head_len + (x->slot->body ? x->slot->body_len : 0);
                int reusable = x->resp.keep_alive && used == (size_t)n && x->sent == total;
                h1_release(w, x, reusable, now);
                h1_finish(w, x, CURLE_OK, NULL);
                return;
            }
            if (rc < 0) {
                h1_finish(w, x, h1_code(rc), "%s", x->resp.detail);
                return;
            }
            if ((size_t)n < SX_H1_RBUF)
                return;  /* the rest comes with a later event */
            continue;
        }
        if (n == 0) {
            int rc = sx_h1_eof(&x->resp);
            if (rc == SX_H1_DONE) {
                h1_finish(w, x, CURLE_OK, NULL);
            } else if (!h1_reopen(w, x, now)) {
                h1_finish(w, x, h1_code(rc), "%s", x->resp.detail);
            }
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        h1_fail_io(w, x, CURLE_RECV_ERROR, "Recv failure", errno, now);
        return;
    }
}

static void h1_event(sx_worker *w, int fd, uint32_t events, double now)
{
    sx_h1c *c = h1_conn_of(w, fd);
    if (!c)
        return;
    sx_xfer *x = c->x;
    if (!x) {
        /* Idle: the server closed it (or sent what nobody asked for). */
        sx_h1c **pp = &c->pool->idle;
        while (*pp && *pp != c)
            pp = &(*pp)->next;
        if (*pp) {
            *pp = c->next;
            c->pool->nidle--;
        }
        h1_close(w, c);
        return;
    }
    if (c->connecting) {
        /* The socket's own error decides, not the event: a connection closed earlier in this
         * round may have left an event for its fd number, which a new connection now has. */
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
            err = errno;
        if (err == 0 && !(events & EPOLLOUT))
            return;
        if (err) {
            h1_close(w, c);
            x->addr_i++;
            if (x->addr_i < x->route->naddrs) {
                if (h1_connect(w, x, now) == 0 && x->conn && !x->conn->connecting)
                    h1_send(w, x, now);
                return;
            }
            h1_finish(w, x, CURLE_COULDNT_CONNECT,
                      "Failed to connect to %s port %u after %ld ms: %s", x->route->host,
                      x->route->port, h1_ms(x, now), strerror(err ? err : ECONNREFUSED));
            return;
        }
        c->connecting = 0;
        h1_send(w, x, now);
        return;
    }
    size_t total = x->head_len + (x->slot->body ? x->slot->body_len : 0);
    if ((events & EPOLLOUT) && x->sent < total) {
        if (h1_send(w, x, now) != 0 || x->conn != c)
            return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        h1_read(w, x, now);
}

static void h1_deadline(sx_worker *w, double t)
{
    if (w->h1_next_deadline < 0 || t < w->h1_next_deadline)
        w->h1_next_deadline = t;
}

/* Time out the attempts past their deadline; find the next deadline. */
static void h1_timeouts(sx_worker *w, double now)
{
    w->h1_next_deadline = -1;
    sx_xfer *x = w->active;
    while (x) {
        sx_xfer *next = x->next;
        if (x->route && x->conn) {
            int connecting = x->conn->connecting;
            double t = connecting && x->connect_deadline < x->deadline ? x->connect_deadline
                                                                      : x->deadline;
            if (now >= t) {
                if (connecting)
                    h1_finish(w, x, CURLE_OPERATION_TIMEDOUT,
                              "Connection timed out after %ld milliseconds", h1_ms(x, now));
                else
                    h1_finish(w, x, CURLE_OPERATION_TIMEDOUT,
                              "Operation timed out after %ld milliseconds with %zu bytes "
                              "received", h1_ms(x, now), x->resp.received);
            } else {
                h1_deadline(w, t);
            }
        }
        x = next;
    }
}

/* Start x on the own HTTP/1.1 path: an idle connection of its origin, else a new one. */
static void h1_start(sx_worker *w, sx_xfer *x, const sx_h1_route *r, double timeout)
{
    const sx_slot *slot = x->slot;
    double now = sx_now();
    x->route = r;
    x->conn = NULL;
    x->sent = 0;
    x->addr_i = 0;
    x->reopened = 0;
    x->started = now;
    x->deadline = now + timeout;
    double connect_timeout = slot->batch->opts.connect_timeout;
    x->connect_deadline = connect_timeout > 0 ? now + connect_timeout : x->deadline;
    sx_h1_resp_reset(&x->resp);
    size_t need = (slot->body ? r->head_post_len : r->head_get_len) + 48;
    if (need > x->head_cap) {
        char *grown = realloc(x->head, need);
        if (!grown) {
            active_add(w, x);
            h1_finish(w, x, CURLE_OUT_OF_MEMORY, "out of memory");
            return;
        }
        x->head = grown;
        x->head_cap = need;
    }
    if (slot->body) {
        x->head_len = sx_h1_post_head(r, slot->body_len, x->head, x->head_cap);
    } else {
        memcpy(x->head, r->head_get, r->head_get_len);
        x->head_len = r->head_get_len;
    }
    active_add(w, x);
    h1_deadline(w, x->connect_deadline < x->deadline ? x->connect_deadline : x->deadline);
    sx_h1pool *p = h1_pool(w, r);
    sx_h1c *c = p ? h1_take_idle(w, p, now) : NULL;
    if (c) {
        c->x = x;
        x->conn = c;
        h1_send(w, x, now);
        return;
    }
    if (h1_connect(w, x, now) == 0 && !x->conn->connecting)
        h1_send(w, x, now);
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
    x->header_bytes = 0;
    x->event_stream = x->body_started = x->sse_on = x->dirty = 0;
    x->delivered = 0;
    x->errbuf[0] = '\0';
    sx_hints_reset(&x->hints);
    CURL *h = x->easy;
    if (x->recv_buffer != w->recv_buffer) {
        curl_easy_setopt(h, CURLOPT_BUFFERSIZE, w->recv_buffer);
        x->recv_buffer = w->recv_buffer;
    }
    /* The deployment the scheduler chose for this attempt, when the engine has several. */
    const char *url = b->url;
    struct curl_slist *headers = b->headers;
    int is_https = b->is_https;
    if (b->ntargets) {
        const sx_target *t = &b->targets[slot->deploy];
        url = t->url;
        headers = t->headers;
        is_https = t->is_https;
    }
    /* libcurl reads 0 as "no timeout": never let a sub-millisecond timeout round to it. */
    double timeout = o->timeout;
    if (slot->deadline > 0 && slot->deadline - sx_now() < timeout)
        timeout = slot->deadline - sx_now();  /* the last attempt ends with the budget */
    const sx_h1_route *route = !w->engine->opts.own_http1 ? NULL
                             : b->ntargets ? b->targets[slot->deploy].h1 : b->h1;
    if (route) {
        h1_start(w, x, route, timeout);
        return;
    }
    x->route = NULL;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    /* Over TLS, wait for a connection that may turn out to multiplex (HTTP/2 via ALPN)
     * rather than opening one per request. Never for plain http://: there HTTP/1.1 is
     * certain, and PIPEWAIT would queue requests behind a slow one on the same host. */
    curl_easy_setopt(h, CURLOPT_PIPEWAIT, (w->engine->opts.http2 && is_https) ? 1L : 0L);
    if (slot->body) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)slot->body_len);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, slot->body);
    } else {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    }
    long timeout_ms = (long)ceil(timeout * 1000.0);
    long connect_ms = (long)ceil(o->connect_timeout * 1000.0);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms > 0 ? timeout_ms : 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, connect_ms > 0 ? connect_ms : 1L);
    curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)o->max_body);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, o->verify_tls ? 1L : 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, o->verify_tls ? 2L : 0L);
    /* A pooled handle keeps its options: a batch's own CA is set for it, and the next batch
     * without one gets libcurl's defaults back (read from a fresh handle at start-up). */
    if (o->ca_file || o->ca_path || x->custom_ca) {
        curl_easy_setopt(h, CURLOPT_CAINFO, o->ca_file ? o->ca_file : w->default_cainfo);
        curl_easy_setopt(h, CURLOPT_CAPATH, o->ca_path ? o->ca_path : w->default_capath);
        x->custom_ca = o->ca_file || o->ca_path;
    }
    sx_shard *sh = shard_pick(w);
    if (!sh) {
        xfer_put(w, x);
        goto fail;
    }
    if (curl_multi_add_handle(sh->multi, h) != CURLM_OK) {
        xfer_put(w, x);
        goto fail;
    }
    if (++sh->nactive > sh->peak) {
        sh->peak = sh->nactive;
        w->warm++;
        if (w->ramp_left)
            w->ramp_left--;
    }
    x->shard = sh;
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

/* Take what the scheduler admits, in chunks, up to this worker's share of the window, after
 * removing the transfers of stopped batches. One locked pass in the common case (no
 * cancellation, one chunk). Returns 1 when the engine is stopping. */
static int admit(sx_worker *w, double now, double *wake_at)
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
    if (stopped) {
        sx_engine_unlock(e);
        for (sx_xfer *x = stopped; x; x = x->next)
            xfer_detach(w, x);
        sx_engine_lock(e);
        for (sx_xfer *x = stopped; x; x = x->next)
            sx_engine_slot_stopped_locked(e, x->slot, now);
        sx_engine_unlock(e);
        while (stopped) {
            sx_xfer *next = stopped->next;
            xfer_put(w, stopped);
            stopped = next;
        }
        sx_engine_lock(e);
    }

    w->ramp_left = SX_RAMP_PER_ROUND;
    for (;;) {
        /* The lock is held here. */
        if (e->stopping) {
            sx_engine_unlock(e);
            return 1;
        }
        size_t limit = (size_t)sx_sched_window(&e->sched);
        size_t share = (limit + (size_t)e->nworkers - 1) / (size_t)e->nworkers;
        size_t room = share > w->nactive ? share - w->nactive : 0;
        /* Idle connections first; only ramp_left more that may need a new one. */
        size_t ramp = (w->warm > w->nactive ? w->warm - w->nactive : 0) + w->ramp_left;
        int ramping = room > ramp;
        if (ramping)
            room = ramp;
        if (room > SX_TAKE_CHUNK)
            room = SX_TAKE_CHUNK;
        size_t n = room ? sx_sched_take(&e->sched, w->taken, room, now, wake_at) : 0;
        sx_engine_unlock(e);
        for (size_t i = 0; i < n; i++)
            xfer_start(w, w->taken[i]);
        if (ramping && n == room) {
            /* Held back by the ramp with work left, perhaps: come back right after this
             * round's events. */
            *wake_at = now;
            return 0;
        }
        if (n < SX_TAKE_CHUNK)
            return 0;
        sx_engine_lock(e);
    }
}

/* Size the receive buffer of later transfers from a finished one (see SX_RECV_MIN). */
static void recv_buffer_observe(sx_worker *w, const sx_xfer *x)
{
    size_t total = x->header_bytes + x->len;
    long want = SX_RECV_MIN;
    while (want < SX_RECV_MAX && (size_t)want < total)
        want *= 2;
    if (want > w->recv_window_max)
        w->recv_window_max = want;
    if (want > w->recv_buffer)
        w->recv_buffer = want;
    if (++w->recv_window_n >= SX_RECV_WINDOW) {
        w->recv_buffer = w->recv_window_max;
        w->recv_window_max = SX_RECV_MIN;
        w->recv_window_n = 0;
    }
}

/* Queue the new text of every stream that grew this round, in one locked pass. Runs before
 * the round's completions are reported, so a slot's text is queued before its result. */
static void flush_deltas(sx_worker *w)
{
    if (!w->dirty)
        return;
    sx_engine *e = w->engine;
    sx_engine_lock(e);
    while (w->dirty) {
        sx_xfer *x = w->dirty;
        w->dirty = x->dirty_next;
        x->dirty = 0;
        sx_batch *b = x->slot->batch;
        size_t len = x->sse.content_len - x->delivered;
        if (!b->stopped)
            sx_batch_push_delta(b, x->slot->index, x->sse.content + x->delivered, len);
        x->delivered = x->sse.content_len;
    }
    sx_engine_unlock(e);
}

/* A finished attempt, classified without the lock; reported under it. */
typedef struct {
    sx_xfer *x;
    sx_attempt a;
    char *response;
    size_t response_len;
    size_t tail;        /* streamed text of response[delivered..tail) still to queue */
    int restart;        /* text was queued for this attempt, which failed: queue a restart */
} sx_done;

/* The body of a streamed answer ended with the transfer (a->verdict OK so far): decide what
 * the stream was and what the slot gets. */
static void stream_conclude(sx_xfer *x, sx_done *d)
{
    sx_attempt *a = &d->a;
    switch (sx_sse_finish(&x->sse, x->buf, x->len)) {
    case SX_SSE_COMPLETE: {
        size_t len;
        char *answer = sx_sse_take_answer(&x->sse, &a->chat, &len);
        if (!answer)
            break;  /* out of memory: the raw body goes to Python as a fallback */
        d->response = answer;
        d->response_len = len;
        d->tail = a->chat.content_len;
        return;
    }
    case SX_SSE_FALLBACK:
        break;
    case SX_SSE_CUT:
        a->verdict = SX_V_RETRY;
        a->kind = SX_ERR_CONNECTION;
        snprintf(a->reason, sizeof a->reason,
                 "connection error: the event stream ended before [DONE] (%zu bytes)", x->len);
        return;
    case SX_SSE_ERROR: {
        int status = sx_sse_error_status(&x->sse);
        size_t len;
        char *body = sx_sse_take_error(&x->sse, &len);
        sx_classify(a, CURLE_OK, NULL, status, body, len, 0);
        a->http_status = status;
        snprintf(a->reason, sizeof a->reason,
                 "the server reported an error inside the event stream (status %d)", status);
        /* Kept even when retryable: the engine frees it on a retry and keeps it if the
         * retries run out, so the final error carries the provider's message. */
        d->response = body;
        d->response_len = body ? len : 0;
        return;
    }
    }
    /* Fallback: the raw body, as for any answer chatjson cannot read. */
    d->response = x->buf;
    d->response_len = x->len;
    x->buf = NULL;
    x->cap = 0;
}

/* Classify one finished transfer and take its body. No lock. */
static void conclude(sx_worker *w, sx_xfer *x, sx_done *d)
{
    long status = xfer_status(x);
    int code = x->result;
    if (code == CURLE_OK)
        recv_buffer_observe(w, x);
    d->x = x;
    sx_classify(&d->a, code, x->errbuf, (int)status, x->buf, x->len, x->overflow);
    d->a.hints = x->hints;
    if (code == CURLE_OK && (status == 429 || status == 503))
        sx_hints_feed_body(&d->a.hints, x->buf, x->len);
    d->response = NULL;
    d->response_len = 0;
    d->tail = 0;
    if (x->sse_on && code == CURLE_OK && d->a.verdict == SX_V_OK) {
        stream_conclude(x, d);
    } else if (code == CURLE_OK && x->len && d->a.verdict != SX_V_RETRY) {
        /* Keep the body of successes and of final HTTP errors (it explains them): the
         * buffer itself passes to the slot, trimmed if growth left much slack. */
        char *body = x->buf;
        if (x->cap - x->len > 256 + x->len / 8) {
            char *trimmed = realloc(body, x->len);
            if (trimmed)
                body = trimmed;
        }
        d->response = body;
        d->response_len = x->len;
        x->buf = NULL;
        x->cap = 0;
        /* Read the answer here, off the GIL and beside the Python thread. */
        if (d->a.verdict == SX_V_OK && x->slot->batch->opts.parse_chat)
            sx_answer_parse(x->slot->batch->opts.parse_chat, body, x->len, &d->a.chat);
    }
    d->restart = x->delivered > 0 && d->a.verdict != SX_V_OK;
}

/* Report one concluded attempt. [E held] */
static void report_locked(sx_worker *w, sx_done *d, double now)
{
    sx_xfer *x = d->x;
    sx_slot *slot = x->slot;
    sx_batch *b = slot->batch;
    if (b->opts.stream_deltas && !b->stopped) {
        if (d->tail > x->delivered)  /* the last line, read only at the end of the body */
            sx_batch_push_delta(b, slot->index, d->response + x->delivered,
                                d->tail - x->delivered);
        else if (d->restart)
            sx_batch_push_delta(b, slot->index, NULL, 0);
    }
    sx_engine_attempt_done_locked(w->engine, slot, &d->a, &w->rng, d->response,
                                  d->response_len, now);
}

/* Report every finished transfer in one locked pass. */
static void reap(sx_worker *w)
{
    sx_engine *e = w->engine;
    CURLMsg *msg;
    int left;
    sx_xfer *finished = w->h1_done;  /* the own HTTP/1.1 path's, already off the active list */
    w->h1_done = NULL;
    flush_deltas(w);
    for (uint32_t t = 0; t < w->ntouched; t++) {
        sx_shard *sh = w->shards[w->touched[t]];
        sh->touched = 0;
        while ((msg = curl_multi_info_read(sh->multi, &left))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            sx_xfer *x = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
            x->result = (int)msg->data.result;
            xfer_detach(w, x);
            active_remove(w, x);
            x->next = finished;
            finished = x;
        }
    }
    w->ntouched = 0;
    if (!finished)
        return;

    /* Classify and take bodies without the lock; only the bookkeeping needs it. */
    size_t count = 0;
    for (sx_xfer *x = finished; x; x = x->next)
        count++;
    sx_done stack_done[64];
    sx_done *done = count <= 64 ? stack_done : malloc(count * sizeof *done);
    double now = sx_now();
    if (!done) {
        /* Out of memory: report one at a time with the stack array. */
        for (sx_xfer *x = finished; x; x = x->next) {
            conclude(w, x, &stack_done[0]);
            sx_engine_lock(e);
            report_locked(w, &stack_done[0], now);
            sx_engine_unlock(e);
        }
    } else {
        size_t i = 0;
        for (sx_xfer *x = finished; x; x = x->next)
            conclude(w, x, &done[i++]);
        sx_engine_lock(e);
        for (i = 0; i < count; i++)
            report_locked(w, &done[i], now);
        int more = e->nworkers > 1 && (e->sched.queued || e->sched.heap_len);
        sx_engine_unlock(e);
        if (more) {
            /* Room opened in the shared window: let the other workers take their share. */
            for (int k = 0; k < e->nworkers; k++)
                if (e->workers[k] != w)
                    sx_worker_wake(e->workers[k]);
        }
        if (done != stack_done)
            free(done);
    }
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

    for (;;) {
        double now = sx_now();
        double wake_at = -1;
        if (admit(w, now, &wake_at))
            break;

        double deadline = wake_at;
        for (uint32_t i = 0; i < w->nshards; i++) {
            double d = w->shards[i]->deadline;
            if (d >= 0 && (deadline < 0 || d < deadline))
                deadline = d;
        }
        if (w->h1_next_deadline >= 0 && (deadline < 0 || w->h1_next_deadline < deadline))
            deadline = w->h1_next_deadline;
        int timeout_ms = -1;
        if (w->h1_done)
            deadline = 0;  /* attempts that ended while starting: report them now */
        if (deadline >= 0) {
            double ms = ceil((deadline - sx_now()) * 1000.0);
            timeout_ms = ms <= 0 ? 0 : ms > 60000 ? 60000 : (int)ms;
        }
        int nev = epoll_wait(w->epfd, events, SX_MAX_EVENTS, timeout_ms);
        if (nev < 0 && errno != EINTR)
            break;
        double evnow = nev > 0 ? sx_now() : 0;
        for (int i = 0; i < nev; i++) {
            uint32_t tag = (uint32_t)(events[i].data.u64 >> 32);
            if (tag == SX_WAKE_TAG) {
                drain_wakefd(w);
                continue;
            }
            if (tag == SX_H1_TAG) {
                h1_event(w, (int)(uint32_t)events[i].data.u64, events[i].events, evnow);
                continue;
            }
            curl_socket_t fd = (curl_socket_t)(uint32_t)events[i].data.u64;
            sx_fdinfo *info = owned_fd(w, fd);
            if (info && !info->watched) {
                /* A kept registration libcurl is not watching (see on_socket). */
                epoll_ctl(w->epfd, EPOLL_CTL_DEL, fd, NULL);
                info->registered = 0;
                continue;
            }
            int flags = 0;
            if (events[i].events & EPOLLIN)
                flags |= CURL_CSELECT_IN;
            if (events[i].events & EPOLLOUT)
                flags |= CURL_CSELECT_OUT;
            if (events[i].events & (EPOLLERR | EPOLLHUP))
                flags |= CURL_CSELECT_ERR;
            shard_action(w, w->shards[tag], fd, flags);
        }
        double after = sx_now();
        for (uint32_t i = 0; i < w->nshards; i++) {
            sx_shard *sh = w->shards[i];
            if (sh->deadline >= 0 && after >= sh->deadline) {
                sh->deadline = -1;
                shard_action(w, sh, CURL_SOCKET_TIMEOUT, 0);
            }
        }
        if (w->h1_next_deadline >= 0 && after >= w->h1_next_deadline)
            h1_timeouts(w, after);
        reap(w);
    }
    /* Attempts of the own HTTP/1.1 path that ended in the last admission: stopped below
     * like the rest. */
    while (w->h1_done) {
        sx_xfer *x = w->h1_done;
        w->h1_done = x->next;
        active_add(w, x);
    }

    /* Shutdown: normally every transfer still here belongs to a batch that close() stopped.
     * If the loop itself failed (epoll_wait error), stop those batches first so that their
     * slots still end in a final state rather than pending. */
    sx_xfer *x = w->active;
    while (x) {
        sx_xfer *next = x->next;
        xfer_detach(w, x);
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
    for (uint32_t i = 0; i < w->nshards; i++) {
        curl_multi_cleanup(w->shards[i]->multi);
        free(w->shards[i]);
    }
    free(w->shards);
    free(w->touched);
    for (size_t fd = 0; fd < w->nconns; fd++) {
        if (w->conns[fd]) {
            close((int)fd);
            free(w->conns[fd]);
        }
    }
    free(w->conns);
    while (w->pools) {
        sx_h1pool *p = w->pools;
        w->pools = p->next;
        free(p->origin);
        free(p);
    }
    free(w->rbuf);
    /* After every easy handle and multi handle that used it is gone. */
    if (w->share)
        curl_share_cleanup(w->share);
    free(w->fds);
    free(w->default_cainfo);
    free(w->default_capath);
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
    w->recv_buffer = SX_RECV_MIN;
    w->recv_window_max = SX_RECV_MIN;
    w->h1_next_deadline = -1;
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
    ev.data.u64 = (uint64_t)SX_WAKE_TAG << 32;
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wakefd, &ev) != 0) {
        snprintf(err, errlen, "epoll_ctl: %s", strerror(errno));
        goto err;
    }
    /* Shards (multi handles) are made as transfers need them. Each keeps up to its share of
     * the worker's connection cache: by default room for all its transfers plus a few idle. */
    long share = (e->opts.sched.max_in_flight + e->opts.workers - 1) / e->opts.workers;
    long nshards = (share + SX_SHARD_CAP - 1) / SX_SHARD_CAP;
    w->shard_maxconnects = SX_SHARD_CAP + 4;
    if (e->opts.max_connections > 0) {
        w->shard_maxconnects = (e->opts.max_connections + nshards - 1) / nshards;
        if (w->shard_maxconnects < 1)
            w->shard_maxconnects = 1;
    }
    /* The own HTTP/1.1 path keeps as many idle connections per origin as the shards would. */
    w->h1_max_idle = e->opts.max_connections > 0 ? (size_t)e->opts.max_connections
                                                 : (size_t)share + 4;
    w->rbuf = malloc(SX_H1_RBUF);
    if (!w->rbuf) {
        snprintf(err, errlen, "out of memory");
        goto err;
    }
    /* One DNS cache and TLS session cache for all shards: a shard's first connection then
     * needs no resolver thread and may resume a session. Only this thread uses it. */
    w->share = curl_share_init();
    if (w->share) {
        curl_share_setopt(w->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
        curl_share_setopt(w->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    }
    /* libcurl's own CA defaults, to restore on a pooled handle after a batch set its own */
    CURL *probe = curl_easy_init();
    if (probe) {
        char *value = NULL;
        if (curl_easy_getinfo(probe, CURLINFO_CAINFO, &value) == CURLE_OK && value)
            w->default_cainfo = strdup(value);
        value = NULL;
        if (curl_easy_getinfo(probe, CURLINFO_CAPATH, &value) == CURLE_OK && value)
            w->default_capath = strdup(value);
        curl_easy_cleanup(probe);
    }
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

void sx_worker_join(sx_worker *w)
{
    if (w && w->started) {
        pthread_join(w->thread, NULL);
        w->started = 0;
    }
}

void sx_worker_join_and_free(sx_worker *w)
{
    if (!w)
        return;
    sx_worker_join(w);
    worker_free(w);
}
