/* fuzz_h1.c — libFuzzer harness for csrc/h1.c, the engine's own HTTP/1.1 response reader and
 * route builder.
 *
 * Response mode (first byte < 0xF0): the rest is what a server sent. It is read twice: in one
 * piece, and split at points the first byte seeds (1 to 17 bytes a piece, as a slow server or
 * small reads would hand it over). Both readings must agree on everything the worker acts on:
 * the outcome, the status, the keep-alive verdict, how many bytes the response took, and
 * every header and body byte handed over. No reading hands over more bytes than it got.
 *
 * Route mode (first byte >= 0xF0): the rest is a URL and header lines separated by '\n'. A
 * route, when one is made, has a head that is one request line and header lines, each ending
 * in CRLF, with no other CR or LF, and the caller's headers in it (but "Expect:", the batch's
 * no-100-continue marker, which this path never needs). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "h1.h"

static void check(int ok)
{
    if (!ok)
        abort();
}

typedef struct {
    char *heads, *body;
    size_t heads_len, body_len, cap;
} record;

static void append(char **p, size_t *len, size_t cap, const char *s, size_t n)
{
    check(*len + n <= cap);
    memcpy(*p + *len, s, n);
    *len += n;
}

static void on_head(void *u, const char *line, size_t len)
{
    record *r = u;
    check(len > 0 && line[len - 1] == '\n');
    append(&r->heads, &r->heads_len, r->cap, line, len);
}

static size_t on_body(void *u, const char *p, size_t n)
{
    record *r = u;
    append(&r->body, &r->body_len, r->cap, p, n);
    return n;
}

typedef struct {
    int rc, status, keep_alive;
    size_t used;
} outcome;

static outcome read_all(const uint8_t *data, size_t size, unsigned seed, record *rec)
{
    sx_h1_resp r;
    memset(&r, 0, sizeof r);
    sx_h1_resp_reset(&r);
    sx_h1_sink sink = {on_head, on_body, rec};
    outcome o = {SX_H1_MORE, 0, 0, 0};
    size_t off = 0;
    while (off < size) {
        size_t n = size - off;
        if (seed) {
            seed = seed * 1103515245u + 12345u;
            size_t piece = 1 + (seed >> 16) % 17;
            if (piece < n)
                n = piece;
        }
        size_t used = 0;
        int rc = sx_h1_feed(&r, (const char *)data + off, n, &used, &sink);
        check(used <= n);
        if (rc != SX_H1_MORE) {
            o.rc = rc;
            o.used = off + used;
            break;
        }
        check(used == n);
        off += n;
        o.used = off;
    }
    if (o.rc == SX_H1_MORE)
        o.rc = sx_h1_eof(&r);
    if (o.rc < 0)
        check(r.detail != NULL);
    if (o.rc == SX_H1_DONE) {
        check(r.status >= 200 && r.status <= 999);
        o.status = r.status;
        o.keep_alive = r.keep_alive;
    }
    sx_h1_resp_free(&r);
    return o;
}

static void response_mode(const uint8_t *data, size_t size, unsigned seed)
{
    record a = {malloc(size + 1), malloc(size + 1), 0, 0, size};
    record b = {malloc(size + 1), malloc(size + 1), 0, 0, size};
    check(a.heads && a.body && b.heads && b.body);
    outcome x = read_all(data, size, 0, &a);
    outcome y = read_all(data, size, seed | 1u, &b);
    check(x.rc == y.rc);
    if (x.rc == SX_H1_DONE) {
        check(x.status == y.status && x.keep_alive == y.keep_alive && x.used == y.used);
        check(a.heads_len == b.heads_len && memcmp(a.heads, b.heads, a.heads_len) == 0);
        check(a.body_len == b.body_len && memcmp(a.body, b.body, a.body_len) == 0);
        check(a.heads_len + a.body_len <= x.used);
    }
    free(a.heads);
    free(a.body);
    free(b.heads);
    free(b.body);
}

static void route_mode(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    check(text != NULL);
    memcpy(text, data, size);
    text[size] = '\0';
    char *save = NULL;
    char *url = strtok_r(text, "\n", &save);
    struct curl_slist *headers = curl_slist_append(NULL, "Expect:");
    for (char *line = strtok_r(NULL, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        headers = curl_slist_append(headers, line);
    sx_h1_route *r = url ? sx_h1_route_new(url, headers) : NULL;
    if (r) {
        check(r->naddrs >= 1 && r->naddrs <= SX_H1_MAX_ADDRS);
        const char *heads[2] = {r->head_post, r->head_get};
        size_t lens[2] = {r->head_post_len, r->head_get_len};
        for (int k = 0; k < 2; k++) {
            check(strlen(heads[k]) == lens[k]);
            for (size_t i = 0; i < lens[k]; i++) {
                if (heads[k][i] == '\r')
                    check(i + 1 < lens[k] && heads[k][i + 1] == '\n');
                if (heads[k][i] == '\n')
                    check(i > 0 && heads[k][i - 1] == '\r');
            }
        }
        check(lens[1] >= 4 && memcmp(r->head_get + lens[1] - 4, "\r\n\r\n", 4) == 0);
        char buf[1 << 16];
        if (r->head_post_len + 48 <= sizeof buf) {
            size_t n = sx_h1_post_head(r, 12345, buf, sizeof buf);
            check(n > 4 && memcmp(buf + n - 4, "\r\n\r\n", 4) == 0);
        }
        for (struct curl_slist *h = headers->next; h; h = h->next)
            check(strcmp(h->data, "Expect:") == 0 || strstr(r->head_post, h->data) != NULL);
        sx_h1_route_free(r);
    }
    curl_slist_free_all(headers);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    unsigned seed = data[0];
    if (seed >= 0xF0)
        route_mode(data + 1, size - 1);
    else
        response_mode(data + 1, size - 1, seed);
    return 0;
}
