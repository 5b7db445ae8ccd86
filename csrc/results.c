/* results.c — see results.h. */
#include "results.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* "Expect:" and the caller's headers. libcurl sends "Expect: 100-continue" for larger POSTs
 * on HTTP/1.1, costing a round trip per request; an empty Expect header turns it off. */
static int header_list(struct curl_slist **out, const char *const *headers, size_t n)
{
    struct curl_slist *list = curl_slist_append(NULL, "Expect:");
    if (!list)
        return -1;
    *out = list;
    for (size_t i = 0; i < n; i++) {
        list = curl_slist_append(*out, headers[i]);
        if (!list)
            return -1;  /* *out is still the whole list so far: the caller frees it */
        *out = list;
    }
    return 0;
}

sx_batch *sx_batch_new(const char *url, const char *const *headers, size_t nheaders,
                       const char *const *bodies, const size_t *lens, const double *tokens,
                       size_t n, const sx_request_opts *opts)
{
    sx_batch *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->efd = -1;
    b->refs = 1;
    b->opts = *opts;
    b->n = n;
    if (opts->max_in_flight > 0) {
        b->cap = calloc(1, sizeof *b->cap);
        if (!b->cap) {
            free(b);
            return NULL;
        }
        b->cap->max = opts->max_in_flight;
        atomic_init(&b->cap->refs, 1);
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int cond_rc = pthread_cond_init(&b->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (cond_rc != 0) {
        free(b->cap);
        free(b);
        return NULL;
    }

    b->url = strdup(url);
    if (!b->url)
        goto err;
    /* the caller's CA strings are copied: the batch outlives the call that made it */
    b->opts.ca_file = b->opts.ca_path = NULL;
    if (opts->ca_file && !(b->opts.ca_file = strdup(opts->ca_file)))
        goto err;
    if (opts->ca_path && !(b->opts.ca_path = strdup(opts->ca_path)))
        goto err;
    b->is_https = strncasecmp(url, "https://", 8) == 0;
    if (header_list(&b->headers, headers, nheaders) != 0)
        goto err;
    b->h1 = sx_h1_route_new(b->url, b->headers);  /* NULL: libcurl carries them */

    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += bodies && bodies[i] ? lens[i] : 0;
    b->arena = malloc(total ? total : 1);
    b->slots = calloc(n ? n : 1, sizeof *b->slots);
    if (!b->arena || !b->slots)
        goto err;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        sx_slot *s = &b->slots[i];
        s->batch = b;
        s->index = (uint32_t)i;
        s->tokens = tokens ? tokens[i] : 1.0;
        if (bodies && bodies[i]) {
            memcpy(b->arena + off, bodies[i], lens[i]);
            s->body = b->arena + off;
            s->body_len = lens[i];
            off += lens[i];
        }
    }
    return b;

err:
    sx_batch_free(b);
    return NULL;
}

int sx_batch_add_target(sx_batch *b, const char *url, const char *const *headers,
                        size_t nheaders)
{
    sx_target *grown = realloc(b->targets, (b->ntargets + 1) * sizeof *grown);
    if (!grown)
        return -1;
    b->targets = grown;
    sx_target *t = &b->targets[b->ntargets];
    memset(t, 0, sizeof *t);
    t->url = strdup(url);
    t->is_https = strncasecmp(url, "https://", 8) == 0;
    if (!t->url || header_list(&t->headers, headers, nheaders) != 0) {
        free(t->url);
        curl_slist_free_all(t->headers);
        return -1;
    }
    t->h1 = sx_h1_route_new(t->url, t->headers);
    b->ntargets++;
    return 0;
}

static void cap_unref(sx_cap *cap)
{
    if (cap && atomic_fetch_sub(&cap->refs, 1) == 1)
        free(cap);
}

void sx_batch_share_cap(sx_batch *b, sx_batch *with)
{
    if (!with->cap || with->cap == b->cap)
        return;
    atomic_fetch_add(&with->cap->refs, 1);
    cap_unref(b->cap);
    b->cap = with->cap;
    b->opts.max_in_flight = with->cap->max;
}

void sx_batch_free(sx_batch *b)
{
    if (!b)
        return;
    cap_unref(b->cap);
    if (b->slots) {
        for (size_t i = 0; i < b->n; i++) {
            free(b->slots[i].response);
            free(b->slots[i].error);
        }
    }
    free(b->slots);
    free(b->arena);
    curl_slist_free_all(b->headers);
    free(b->url);
    sx_h1_route_free(b->h1);
    for (size_t i = 0; i < b->ntargets; i++) {
        sx_h1_route_free(b->targets[i].h1);
        curl_slist_free_all(b->targets[i].headers);
        free(b->targets[i].url);
    }
    free(b->targets);
    free((char *)b->opts.ca_file);
    free((char *)b->opts.ca_path);
    free(b->stop_reason);
    free(b->deltas);
    if (b->efd >= 0)
        close(b->efd);
    pthread_cond_destroy(&b->cond);
    free(b);
}

int sx_batch_finish_slot(sx_slot *s, sx_state state, sx_error_kind kind, int http_status,
                         char *response, size_t response_len, const char *error, double now)
{
    sx_batch *b = s->batch;
    s->where = SX_AT_DONE;
    s->state = (uint8_t)state;
    s->error_kind = (uint8_t)kind;
    if (http_status)
        s->http_status = http_status;
    free(s->response);
    s->response = response;
    s->response_len = response_len;
    free(s->error);
    s->error = error ? strdup(error) : NULL;
    s->latency = s->attempts ? now - s->first_sent : 0.0;
    b->done++;
    if (state == SX_OK)
        b->ok++;
    else if (state == SX_FAILED)
        b->failed++;
    else
        b->cancelled++;
    return b->done == b->n;
}

static void efd_signal(sx_batch *b)
{
    if (b->efd < 0 || b->notify_pending)
        return;
    uint64_t one = 1;
    /* EAGAIN means the counter is already non-zero: the reader is already woken. */
    if (write(b->efd, &one, sizeof one) == (ssize_t)sizeof one || errno == EAGAIN)
        b->notify_pending = 1;
}

void sx_batch_notify(sx_batch *b)
{
    if (b->done == b->n) {
        pthread_cond_broadcast(&b->cond);
        efd_signal(b);
    } else if (b->opts.notify_each) {
        efd_signal(b);
    }
}

int sx_batch_push_delta(sx_batch *b, uint32_t index, const char *text, size_t len)
{
    if (len > INT32_MAX)
        return -1;
    size_t need = b->deltas_len + sizeof(sx_delta_head) + (text ? len : 0);
    if (need > b->deltas_cap) {
        size_t cap = b->deltas_cap ? b->deltas_cap : 4096;
        while (cap < need)
            cap *= 2;
        char *grown = realloc(b->deltas, cap);
        if (!grown)
            return -1;
        b->deltas = grown;
        b->deltas_cap = cap;
    }
    sx_delta_head head = {index, text ? (int32_t)len : -1};
    memcpy(b->deltas + b->deltas_len, &head, sizeof head);
    b->deltas_len += sizeof head;
    if (text && len) {
        memcpy(b->deltas + b->deltas_len, text, len);
        b->deltas_len += len;
    }
    efd_signal(b);
    return 0;
}

char *sx_batch_take_deltas(sx_batch *b, size_t *len)
{
    char *records = b->deltas;
    *len = b->deltas_len;
    b->deltas = NULL;
    b->deltas_len = b->deltas_cap = 0;
    return records;
}

int sx_batch_fileno(sx_batch *b)
{
    if (b->efd >= 0)
        return b->efd;
    b->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (b->efd < 0)
        return -1;
    if (b->done == b->n || (b->opts.notify_each && b->done > 0) || b->deltas_len)
        efd_signal(b);
    return b->efd;
}

void sx_batch_clear_notify(sx_batch *b)
{
    if (b->efd < 0)
        return;
    uint64_t value;
    while (read(b->efd, &value, sizeof value) == (ssize_t)sizeof value)
        ;
    b->notify_pending = 0;
}
