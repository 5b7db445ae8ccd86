/* h1.h — the engine's own HTTP/1.1 for plain http:// origins: request heads and a response
 * reader.
 *
 * Why not libcurl for these: at 1,000 in flight on loopback, libcurl 7.88 spent ~26 µs of user
 * CPU per transfer (it re-parses the URL, formats every request header through its printf,
 * walks its connection cache, allocates per transfer and poll()s a connection before reusing
 * it), more than half of the engine's ~50 µs per request, where wrk does the whole exchange in
 * 17 µs (benchmarks/PERF-LOG.md). Local servers and gateways inside a network (llama.cpp,
 * vLLM, Ollama, nginx) speak plain HTTP/1.1, and for them the worker writes the request itself
 * and reads the answer with this reader. Everything else stays with libcurl: TLS, HTTP/2,
 * proxies, host names other than localhost (no resolver thread here), and headers whose
 * meaning libcurl would change (sx_h1_route_new decides, once per batch).
 *
 * Pure code: no sockets, no threads, no clock. worker.c owns the connections. */
#ifndef SEMEX_H1_H
#define SEMEX_H1_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <curl/curl.h>

#define SX_H1_MAX_ADDRS 4

/* Where and how a batch's requests go when the engine speaks HTTP/1.1 itself. [R] */
typedef struct sx_h1_route {
    struct sockaddr_storage addrs[SX_H1_MAX_ADDRS];  /* tried in order when one refuses */
    socklen_t addrlens[SX_H1_MAX_ADDRS];
    int naddrs;
    char *origin;       /* "host:port" as written, for errors and as the connection pool key */
    char *host;         /* for errors: "127.0.0.1" */
    unsigned port;
    char *head_post;    /* "POST /path HTTP/1.1\r\nHost: ...\r\n...": every header but
                         * Content-Length, without the blank line */
    size_t head_post_len;
    char *head_get;     /* the whole head of a GET, blank line included */
    size_t head_get_len;
} sx_h1_route;

/* The route for url and headers (the batch's curl_slist, "Expect:" first), or NULL when libcurl
 * must carry these requests: not http://, a host that is neither an IP literal nor localhost,
 * a proxy set in the environment (http_proxy, all_proxy, ALL_PROXY, unless no_proxy/NO_PROXY
 * is "*" or names the host exactly, e.g. "localhost,127.0.0.1"),
 * a header libcurl would treat specially (Host, User-Agent and Accept replace the defaults, as
 * with libcurl; Content-Length, Transfer-Encoding, Connection, Accept-Encoding, TE, Upgrade,
 * Expect with a value, and "Name:"/"Name;" forms are left to it), or out of memory. */
sx_h1_route *sx_h1_route_new(const char *url, const struct curl_slist *headers);
void sx_h1_route_free(sx_h1_route *r);

/* What the reader hands over: every head line (status line, header lines, the blank line,
 * each with its line end, for 1xx heads too, as libcurl's header callback gets them) and the
 * body bytes, de-chunked. body returns n to go on, anything else to stop the response. */
typedef struct sx_h1_sink {
    void (*header)(void *u, const char *line, size_t len);
    size_t (*body)(void *u, const char *p, size_t n);
    void *u;
} sx_h1_sink;

enum {
    SX_H1_MORE = 0,          /* the response goes on */
    SX_H1_DONE = 1,          /* complete */
    SX_H1_E_EMPTY = -1,      /* the connection closed before any byte */
    SX_H1_E_PARTIAL = -2,    /* closed in the middle of a response */
    SX_H1_E_MALFORMED = -3,  /* not a valid HTTP/1.x response */
    SX_H1_E_TOO_LARGE = -4,  /* a head line or the head longer than the limits */
    SX_H1_E_ENCODING = -5,   /* a Content-Encoding or Transfer-Encoding we did not ask for */
    SX_H1_E_STOPPED = -6,    /* sink->body refused the bytes */
};

/* libcurl's limits: one header line, the whole head. */
#define SX_H1_MAX_LINE (100 * 1024)
#define SX_H1_MAX_HEAD (300 * 1024)

typedef struct sx_h1_resp {
    int state;
    int status;              /* of the final response once its status line is read */
    int minor;               /* HTTP/1.minor */
    int keep_alive;          /* the connection may carry the next request */
    int chunked;
    int64_t content_length;  /* -1: none */
    uint64_t remaining;      /* of the body, or of the current chunk */
    size_t head_bytes;       /* head bytes so far (all heads of this response) */
    size_t received;         /* bytes fed so far */
    int lines;               /* lines of the current head */
    char *line;              /* a line split across reads (kept between responses) */
    size_t line_len, line_cap;
    const char *detail;      /* what was wrong, for a SX_H1_E_* */
} sx_h1_resp;

/* Ready for the next response on a connection (keeps the line buffer). */
void sx_h1_resp_reset(sx_h1_resp *r);
void sx_h1_resp_free(sx_h1_resp *r);

/* Read n bytes of the response. Returns SX_H1_MORE, SX_H1_DONE (*used: bytes that belonged to
 * it; any after are not the response's) or an SX_H1_E_* (r->detail says why). */
int sx_h1_feed(sx_h1_resp *r, const char *p, size_t n, size_t *used, const sx_h1_sink *sink);

/* The connection ended (EOF): SX_H1_DONE for a body that runs to the close, else an error. */
int sx_h1_eof(sx_h1_resp *r);

/* The head of one POST: route->head_post, Content-Length, the blank line, into buf (cap bytes,
 * at least head_post_len + 40). Returns its length. */
size_t sx_h1_post_head(const sx_h1_route *route, size_t body_len, char *buf, size_t cap);

#endif
