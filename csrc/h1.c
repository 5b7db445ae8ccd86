/* h1.c — see h1.h. */
#include "h1.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum {
    ST_STATUS = 0,     /* expecting a status line */
    ST_HEADERS,        /* header lines until the blank line */
    ST_BODY_LEN,       /* Content-Length bytes */
    ST_BODY_CLOSE,     /* until the connection closes */
    ST_CHUNK_SIZE,     /* a chunk-size line */
    ST_CHUNK_DATA,
    ST_CHUNK_END,      /* the line end after a chunk's data */
    ST_TRAILERS,       /* trailer lines until the blank line */
    ST_DONE,
};

/* ---- routes ---- */

static int env_set(const char *name)
{
    const char *v = getenv(name);
    return v && v[0];
}

/* Does a no_proxy list name this host (libcurl: comma-separated, "*" for every host; an entry
 * may start with "." and match a domain suffix, which an IP literal or localhost never needs,
 * and may carry a port, which libcurl ignores)? Only exact names are read here: anything else
 * leaves the request to libcurl, which reads the whole syntax. */
static int no_proxy_names(const char *list, const char *host)
{
    size_t hl = strlen(host);
    const char *p = list;
    while (*p) {
        while (*p == ',' || *p == ' ' || *p == '\t')
            p++;
        const char *e = p;
        while (*e && *e != ',' && *e != ' ' && *e != '\t')
            e++;
        size_t n = (size_t)(e - p);
        if (n == 1 && *p == '*')
            return 1;
        if (n && p[0] == '[' && n >= 2 && memchr(p, ']', n)) {  /* "[::1]" or "[::1]:port" */
            const char *close = memchr(p, ']', n);
            if ((size_t)(close - p - 1) == hl && strncasecmp(p + 1, host, hl) == 0)
                return 1;
        } else if (n >= hl && strncasecmp(p, host, hl) == 0 &&
                   (n == hl || (p[hl] == ':' && !strchr(host, ':')))) {
            return 1;
        }
        p = e;
    }
    return 0;
}

/* A proxy libcurl would use for http://host (it reads lower-case http_proxy only, for safety,
 * then all_proxy/ALL_PROXY, unless no_proxy/NO_PROXY names the host). */
static int proxy_for(const char *host)
{
    if (!env_set("http_proxy") && !env_set("all_proxy") && !env_set("ALL_PROXY"))
        return 0;
    const char *no = getenv("no_proxy");
    if (!no || !no[0])
        no = getenv("NO_PROXY");
    return !(no && no_proxy_names(no, host));
}

static int is_tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* Path and query bytes libcurl would send unchanged. */
static int path_ok(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c >= 0x7f || strchr("\"<>\\^`{|}", c))
            return 0;
        /* dot segments: libcurl removes them */
        if (c == '/' && i + 1 < n && p[i + 1] == '.') {
            size_t j = i + 2;
            if (j < n && p[j] == '.')
                j++;
            if (j == n || p[j] == '/' || p[j] == '?')
                return 0;
        }
    }
    return 1;
}

static int header_named(const char *line, size_t namelen, const char *name)
{
    return strlen(name) == namelen && strncasecmp(line, name, namelen) == 0;
}

typedef struct {
    char *p;
    size_t len, cap;
    int failed;
} buf_t;

static void put(buf_t *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *g = realloc(b->p, cap);
        if (!g) {
            b->failed = 1;
            return;
        }
        b->p = g;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void puts_(buf_t *b, const char *s)
{
    put(b, s, strlen(s));
}

static int add_addr(sx_h1_route *r, int family, const void *addr, unsigned port)
{
    if (r->naddrs >= SX_H1_MAX_ADDRS)
        return 0;
    struct sockaddr_storage *ss = &r->addrs[r->naddrs];
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        memcpy(&in->sin_addr, addr, sizeof in->sin_addr);
        r->addrlens[r->naddrs] = sizeof *in;
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        memcpy(&in6->sin6_addr, addr, sizeof in6->sin6_addr);
        r->addrlens[r->naddrs] = sizeof *in6;
    }
    r->naddrs++;
    return 1;
}

sx_h1_route *sx_h1_route_new(const char *url, const struct curl_slist *headers)
{
    if (!url || strncasecmp(url, "http://", 7) != 0)
        return NULL;
    const char *auth = url + 7;
    size_t alen = strcspn(auth, "/?#");
    const char *rest = auth + alen;
    if (alen == 0 || memchr(auth, '@', alen))
        return NULL;
    /* host and port */
    char host[64];
    const char *hp = auth, *he;
    int v6 = 0;
    if (auth[0] == '[') {
        he = memchr(auth, ']', alen);
        if (!he)
            return NULL;
        hp = auth + 1;
        v6 = 1;
    } else {
        he = memchr(auth, ':', alen);
        if (!he)
            he = auth + alen;
    }
    size_t hlen = (size_t)(he - hp);
    if (hlen == 0 || hlen >= sizeof host)
        return NULL;
    memcpy(host, hp, hlen);
    host[hlen] = '\0';
    const char *after = he + v6;  /* past ']' */
    unsigned port = 80;
    if (after < auth + alen) {
        if (*after != ':' || after + 1 == auth + alen)
            return NULL;
        port = 0;
        for (const char *q = after + 1; q < auth + alen; q++) {
            if (*q < '0' || *q > '9' || port > 6553)
                return NULL;
            port = port * 10 + (unsigned)(*q - '0');
        }
        if (port == 0 || port > 65535)
            return NULL;
    }
    /* path: up to the fragment, "/" when empty */
    size_t plen = strcspn(rest, "#");
    if (!path_ok(rest, plen))
        return NULL;

    if (proxy_for(host))
        return NULL;
    sx_h1_route *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->port = port;
    unsigned char a[16];
    if (v6) {
        if (strchr(host, '%') || inet_pton(AF_INET6, host, a) != 1)
            goto no;
        add_addr(r, AF_INET6, a, port);
    } else if (strcasecmp(host, "localhost") == 0) {
        /* libcurl resolves localhost itself too, to the loopback addresses */
        struct in_addr lo4 = {htonl(INADDR_LOOPBACK)};
        add_addr(r, AF_INET, &lo4, port);
        add_addr(r, AF_INET6, &in6addr_loopback, port);
    } else {
        /* strict dotted quad only: libcurl reads "127.1" and friends its own way */
        int dots = 0;
        for (const char *q = host; *q; q++)
            dots += *q == '.';
        if (dots != 3 || inet_pton(AF_INET, host, a) != 1)
            goto no;
        add_addr(r, AF_INET, a, port);
    }

    /* The header lines: the caller's, checked, and libcurl's defaults unless replaced. */
    buf_t user = {0};
    int have_host = 0, have_ua = 0, have_accept = 0, have_ctype = 0;
    for (const struct curl_slist *h = headers; h; h = h->next) {
        const char *line = h->data;
        if (strcmp(line, "Expect:") == 0)
            continue;  /* the batch's "no 100-continue": this path never sends Expect */
        size_t n = strlen(line);
        size_t colon = 0;
        while (colon < n && is_tchar((unsigned char)line[colon]))
            colon++;
        if (colon == 0 || colon >= n || line[colon] != ':')
            goto no_user;
        for (size_t i = colon + 1; i < n; i++) {
            unsigned char c = (unsigned char)line[i];
            if (c == '\r' || c == '\n' || c == 0 || (c < 0x20 && c != '\t') || c == 0x7f)
                goto no_user;
        }
        size_t v = colon + 1;
        while (v < n && (line[v] == ' ' || line[v] == '\t'))
            v++;
        if (v == n)
            goto no_user;  /* "Name:" removes a libcurl header: leave it to libcurl */
        if (header_named(line, colon, "content-length") ||
            header_named(line, colon, "transfer-encoding") ||
            header_named(line, colon, "connection") || header_named(line, colon, "expect") ||
            header_named(line, colon, "accept-encoding") || header_named(line, colon, "te") ||
            header_named(line, colon, "upgrade") || header_named(line, colon, "keep-alive"))
            goto no_user;
        have_host |= header_named(line, colon, "host");
        have_ua |= header_named(line, colon, "user-agent");
        have_accept |= header_named(line, colon, "accept");
        have_ctype |= header_named(line, colon, "content-type");
        put(&user, line, n);
        put(&user, "\r\n", 2);
    }

    char origin[96];
    if (v6)
        snprintf(origin, sizeof origin, "[%s]:%u", host, port);
    else
        snprintf(origin, sizeof origin, "%s:%u", host, port);
    r->origin = strdup(origin);
    r->host = strdup(host);

    buf_t common = {0};
    if (!have_host) {
        puts_(&common, "Host: ");
        if (port == 80) {
            /* as written in the URL, without the default port */
            if (v6)
                puts_(&common, "[");
            puts_(&common, host);
            if (v6)
                puts_(&common, "]");
        } else {
            puts_(&common, origin);
        }
        puts_(&common, "\r\n");
    }
    if (!have_ua)
        puts_(&common, "User-Agent: semex/0.1\r\n");
    if (!have_accept)
        puts_(&common, "Accept: */*\r\n");
    if (user.len)
        put(&common, user.p, user.len);

    buf_t post = {0}, get = {0};
    puts_(&post, "POST ");
    puts_(&get, "GET ");
    if (plen == 0 || rest[0] != '/') {
        puts_(&post, "/");
        puts_(&get, "/");
    }
    put(&post, rest, plen);
    put(&get, rest, plen);
    puts_(&post, " HTTP/1.1\r\n");
    puts_(&get, " HTTP/1.1\r\n");
    if (common.len) {
        put(&post, common.p, common.len);
        put(&get, common.p, common.len);
    }
    if (!have_ctype)  /* what libcurl sends with POSTFIELDS */
        puts_(&post, "Content-Type: application/x-www-form-urlencoded\r\n");
    puts_(&get, "\r\n");
    int failed = user.failed || common.failed || post.failed || get.failed || !r->origin ||
                 !r->host;
    free(user.p);
    free(common.p);
    r->head_post = post.p;
    r->head_post_len = post.len;
    r->head_get = get.p;
    r->head_get_len = get.len;
    if (failed)
        goto no;
    return r;

no_user:
    free(user.p);
no:
    sx_h1_route_free(r);
    return NULL;
}

void sx_h1_route_free(sx_h1_route *r)
{
    if (!r)
        return;
    free(r->origin);
    free(r->host);
    free(r->head_post);
    free(r->head_get);
    free(r);
}

size_t sx_h1_post_head(const sx_h1_route *route, size_t body_len, char *buf, size_t cap)
{
    memcpy(buf, route->head_post, route->head_post_len);
    int n = snprintf(buf + route->head_post_len, cap - route->head_post_len,
                     "Content-Length: %zu\r\n\r\n", body_len);
    return route->head_post_len + (size_t)n;
}

/* ---- the response reader ---- */

void sx_h1_resp_reset(sx_h1_resp *r)
{
    char *line = r->line;
    size_t cap = r->line_cap;
    memset(r, 0, sizeof *r);
    r->line = line;
    r->line_cap = cap;
    r->content_length = -1;
    r->state = ST_STATUS;
}

void sx_h1_resp_free(sx_h1_resp *r)
{
    free(r->line);
    r->line = NULL;
    r->line_cap = 0;
    r->line_len = 0;
}

static int fail(sx_h1_resp *r, int code, const char *detail)
{
    r->detail = detail;
    return code;
}

/* Strip the line end ("\r\n" or a bare "\n"); n counts the '\n'. */
static size_t content_len(const char *line, size_t n)
{
    n--;
    if (n && line[n - 1] == '\r')
        n--;
    return n;
}

static int ows(char c)
{
    return c == ' ' || c == '\t';
}

/* Value of a header line past "name:", trimmed. */
static void value_of(const char *line, size_t n, size_t colon, const char **v, size_t *vlen)
{
    size_t a = colon + 1, b = n;
    while (a < b && ows(line[a]))
        a++;
    while (b > a && ows(line[b - 1]))
        b--;
    *v = line + a;
    *vlen = b - a;
}

/* Does a comma-separated token list hold tok (case-insensitive)? last: only as its last item. */
static int list_has(const char *v, size_t n, const char *tok, int last)
{
    size_t tl = strlen(tok), i = 0;
    int found = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && v[j] != ',')
            j++;
        size_t a = i, b = j;
        while (a < b && ows(v[a]))
            a++;
        while (b > a && ows(v[b - 1]))
            b--;
        int is = b - a == tl && strncasecmp(v + a, tok, tl) == 0;
        if (last)
            found = is;
        else if (is)
            return 1;
        i = j + 1;
    }
    return found;
}

static int status_line(sx_h1_resp *r, const char *line, size_t n)
{
    /* "HTTP/1.x NNN[ reason]" */
    if (n < 12 || memcmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') ||
        line[8] != ' ')
        return fail(r, SX_H1_E_MALFORMED, "the server's answer is not an HTTP/1.x response");
    int code = 0;
    for (int i = 9; i < 12; i++) {
        if (line[i] < '0' || line[i] > '9')
            return fail(r, SX_H1_E_MALFORMED, "invalid status code in the response");
        code = code * 10 + (line[i] - '0');
    }
    if (n > 12 && line[12] != ' ')
        return fail(r, SX_H1_E_MALFORMED, "invalid status line in the response");
    if (code < 100)
        return fail(r, SX_H1_E_MALFORMED, "invalid status code in the response");
    if (code == 101)
        return fail(r, SX_H1_E_MALFORMED, "the server switched protocols");
    r->status = code;
    r->minor = line[7] - '0';
    r->keep_alive = r->minor == 1;
    r->chunked = 0;
    r->content_length = -1;
    return SX_H1_MORE;
}

static int header_line(sx_h1_resp *r, const char *line, size_t n)
{
    if (ows(line[0]))
        return SX_H1_MORE;  /* an obsolete folded continuation: nothing we read */
    size_t colon = 0;
    while (colon < n && is_tchar((unsigned char)line[colon]))
        colon++;
    if (colon == 0 || colon >= n || line[colon] != ':')
        return fail(r, SX_H1_E_MALFORMED, "invalid header line in the response");
    const char *v;
    size_t vlen;
    value_of(line, n, colon, &v, &vlen);
    if (r->status < 200)
        return SX_H1_MORE;  /* an informational head frames nothing */
    if (header_named(line, colon, "content-length")) {
        if (vlen == 0 || vlen > 18)
            return fail(r, SX_H1_E_MALFORMED, "invalid Content-Length in the response");
        int64_t cl = 0;
        for (size_t i = 0; i < vlen; i++) {
            if (v[i] < '0' || v[i] > '9')
                return fail(r, SX_H1_E_MALFORMED, "invalid Content-Length in the response");
            cl = cl * 10 + (v[i] - '0');
        }
        if (r->content_length >= 0 && r->content_length != cl)
            return fail(r, SX_H1_E_MALFORMED, "conflicting Content-Length headers");
        r->content_length = cl;
    } else if (header_named(line, colon, "transfer-encoding")) {
        if (!list_has(v, vlen, "chunked", 1))
            return fail(r, SX_H1_E_ENCODING,
                        "the response has a Transfer-Encoding other than chunked");
        r->chunked = 1;
    } else if (header_named(line, colon, "content-encoding")) {
        if (vlen && !(vlen == 8 && strncasecmp(v, "identity", 8) == 0))
            return fail(r, SX_H1_E_ENCODING,
                        "the response body is encoded (Content-Encoding) though no encoding "
                        "was asked for");
    } else if (header_named(line, colon, "connection")) {
        if (list_has(v, vlen, "close", 0))
            r->keep_alive = 0;
        else if (list_has(v, vlen, "keep-alive", 0))
            r->keep_alive = 1;
    }
    return SX_H1_MORE;
}

/* The blank line ending a head: what follows. */
static int head_end(sx_h1_resp *r)
{
    if (r->status < 200) {
        r->state = ST_STATUS;  /* 100 Continue and friends: the real response follows */
        r->lines = 0;
        return SX_H1_MORE;
    }
    if (r->status == 204 || r->status == 304) {
        r->state = ST_DONE;
    } else if (r->chunked) {
        r->state = ST_CHUNK_SIZE;
    } else if (r->content_length >= 0) {
        r->remaining = (uint64_t)r->content_length;
        r->state = r->remaining ? ST_BODY_LEN : ST_DONE;
    } else {
        r->state = ST_BODY_CLOSE;
        r->keep_alive = 0;
    }
    return r->state == ST_DONE ? SX_H1_DONE : SX_H1_MORE;
}

static int chunk_size_line(sx_h1_resp *r, const char *line, size_t n)
{
    uint64_t size = 0;
    size_t i = 0;
    for (; i < n; i++) {
        char c = line[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            break;
        if (size >> 56)
            return fail(r, SX_H1_E_MALFORMED, "chunk size too large");
        size = size * 16 + (uint64_t)d;
    }
    if (i == 0)
        return fail(r, SX_H1_E_MALFORMED, "invalid chunk size line");
    while (i < n && ows(line[i]))
        i++;
    if (i < n && line[i] != ';')
        return fail(r, SX_H1_E_MALFORMED, "invalid chunk size line");
    r->remaining = size;
    r->state = size ? ST_CHUNK_DATA : ST_TRAILERS;
    return SX_H1_MORE;
}

/* One whole line (with its '\n') in the current line state. */
static int line_done(sx_h1_resp *r, const char *line, size_t n, const sx_h1_sink *sink)
{
    size_t c = content_len(line, n);
    switch (r->state) {
    case ST_STATUS:
    case ST_HEADERS: {
        r->head_bytes += n;
        if (r->head_bytes > SX_H1_MAX_HEAD)
            return fail(r, SX_H1_E_TOO_LARGE, "the response head is too large");
        int rc;
        if (r->state == ST_STATUS) {
            if (c == 0)
                return SX_H1_MORE;  /* empty lines before a status line are ignored (RFC 9112) */
            rc = status_line(r, line, c);
            r->state = ST_HEADERS;
        } else if (c == 0) {
            sink->header(sink->u, line, n);
            return head_end(r);
        } else {
            rc = header_line(r, line, c);
        }
        if (rc != SX_H1_MORE)
            return rc;
        r->lines++;
        sink->header(sink->u, line, n);
        return SX_H1_MORE;
    }
    case ST_CHUNK_SIZE:
        return chunk_size_line(r, line, c);
    case ST_CHUNK_END:
        if (c != 0)
            return fail(r, SX_H1_E_MALFORMED, "no line end after chunk data");
        r->state = ST_CHUNK_SIZE;
        return SX_H1_MORE;
    case ST_TRAILERS:
        if (c == 0) {
            r->state = ST_DONE;
            return SX_H1_DONE;
        }
        return SX_H1_MORE;
    default:
        return fail(r, SX_H1_E_MALFORMED, "internal: line in a body state");
    }
}

static int line_state(int state)
{
    return state == ST_STATUS || state == ST_HEADERS || state == ST_CHUNK_SIZE ||
           state == ST_CHUNK_END || state == ST_TRAILERS;
}

int sx_h1_feed(sx_h1_resp *r, const char *p, size_t n, size_t *used, const sx_h1_sink *sink)
{
    size_t i = 0;
    int rc = SX_H1_MORE;
    r->received += n;
    while (i < n && rc == SX_H1_MORE) {
        if (line_state(r->state)) {
            const char *nl = memchr(p + i, '\n', n - i);
            size_t take = nl ? (size_t)(nl - (p + i)) + 1 : n - i;
            size_t limit = r->state == ST_STATUS || r->state == ST_HEADERS ? SX_H1_MAX_LINE
                                                                            : 4096;
            if (r->line_len + take > limit)
                return fail(r, SX_H1_E_TOO_LARGE, "a response line is too long");
            if (!nl || r->line_len) {
                if (r->line_len + take > r->line_cap) {
                    size_t cap = r->line_cap ? r->line_cap : 512;
                    while (cap < r->line_len + take)
                        cap *= 2;
                    char *g = realloc(r->line, cap);
                    if (!g)
                        return fail(r, SX_H1_E_TOO_LARGE, "out of memory for a response line");
                    r->line = g;
                    r->line_cap = cap;
                }
                memcpy(r->line + r->line_len, p + i, take);
                r->line_len += take;
            }
            i += take;
            if (!nl)
                break;
            if (r->line_len) {
                rc = line_done(r, r->line, r->line_len, sink);
                r->line_len = 0;
            } else {
                rc = line_done(r, p + i - take, take, sink);
            }
            continue;
        }
        /* body bytes */
        size_t take = n - i;
        if (r->state != ST_BODY_CLOSE && take > r->remaining)
            take = (size_t)r->remaining;
        if (sink->body(sink->u, p + i, take) != take)
            return fail(r, SX_H1_E_STOPPED, "the body was refused");
        i += take;
        if (r->state == ST_BODY_CLOSE)
            continue;
        r->remaining -= take;
        if (r->remaining == 0) {
            if (r->state == ST_BODY_LEN) {
                r->state = ST_DONE;
                rc = SX_H1_DONE;
            } else {
                r->state = ST_CHUNK_END;
            }
        }
    }
    if (used)
        *used = i;
    if (rc == SX_H1_DONE)
        r->state = ST_DONE;
    return rc;
}

int sx_h1_eof(sx_h1_resp *r)
{
    if (r->state == ST_BODY_CLOSE) {
        r->state = ST_DONE;
        return SX_H1_DONE;
    }
    if (r->state == ST_DONE)
        return SX_H1_DONE;
    if (r->received == 0)
        return fail(r, SX_H1_E_EMPTY, "Empty reply from server");
    return fail(r, SX_H1_E_PARTIAL, r->state == ST_BODY_LEN
                                        ? "transfer closed with outstanding read data remaining"
                                        : "the connection closed in the middle of the response");
}
