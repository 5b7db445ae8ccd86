/* http.c - the server side of HTTP/1.1 for the mock: connections and their queue of
 * delayed responses (answers leave in request order, each at its deadline, kept in a
 * per-worker min-heap), request heads, and the epoll loop of a worker thread. What a request
 * gets back is routes.c's handle_request. */
#include "mock.h"

_Atomic uint64_t st_requests, st_200, st_429, st_faults, st_fail, st_drop, st_truncate,
    st_stall, st_other;
_Atomic int64_t st_open, st_max_open;
_Atomic uint64_t st_usage_tokens, st_embed_usage_tokens;

char TAG_LISTEN, TAG_STOP;

void die_oom(void) {
    fputs("mockserver: out of memory\n", stderr);
    abort();
}

/* ------------------------------------------------------- connections, heap */

static void heap_swap(worker_t *w, size_t a, size_t b) {
    conn_t *t = w->heap[a];
    w->heap[a] = w->heap[b];
    w->heap[b] = t;
    w->heap[a]->heap_idx = a;
    w->heap[b]->heap_idx = b;
}

static void heap_up(worker_t *w, size_t i) {
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (w->heap[p]->deadline <= w->heap[i]->deadline) break;
        heap_swap(w, p, i);
        i = p;
    }
}

static void heap_down(worker_t *w, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < w->heap_len && w->heap[l]->deadline < w->heap[m]->deadline) m = l;
        if (r < w->heap_len && w->heap[r]->deadline < w->heap[m]->deadline) m = r;
        if (m == i) return;
        heap_swap(w, i, m);
        i = m;
    }
}

static void heap_push(worker_t *w, conn_t *c) {
    if (w->heap_len == w->heap_cap) {
        size_t nc = w->heap_cap ? w->heap_cap * 2 : 1024;
        conn_t **nh = realloc(w->heap, nc * sizeof *nh);
        if (!nh) die_oom();
        w->heap = nh;
        w->heap_cap = nc;
    }
    c->heap_idx = w->heap_len;
    w->heap[w->heap_len++] = c;
    heap_up(w, c->heap_idx);
}

static void heap_remove(worker_t *w, conn_t *c) {
    size_t i = c->heap_idx;
    if (i == HEAP_NONE) return;
    c->heap_idx = HEAP_NONE;
    size_t last = --w->heap_len;
    if (i != last) {
        conn_t *moved = w->heap[last];
        w->heap[i] = moved;
        moved->heap_idx = i;
        heap_down(w, i);
        heap_up(w, moved->heap_idx);
    }
}

static void conn_close(worker_t *w, conn_t *c) {
    heap_remove(w, c);
    if (c->prev) c->prev->next = c->next;
    else w->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    if (c->want_close == CLOSE_GRACEFUL) shutdown(c->fd, SHUT_WR);
    close(c->fd); /* also removes it from the epoll set */
    buf_free(&c->in);
    buf_free(&c->out);
    free(c->q);
    free(c);
    atomic_fetch_sub_explicit(&st_open, 1, memory_order_relaxed);
}

/* --------------------------------------------------------------- responses */

static const char *reason(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    case 529: return "Site Overloaded";
    default: return "Unknown";
    }
}

/* Appends a full response to c->out; returns the header length. */
size_t put_response_typed(conn_t *c, int status, const buf_t *extra, const char *body,
                                 size_t body_len, int keep_alive, const char *ctype) {
    buf_t *o = &c->out;
    size_t start = o->len;
    buf_reserve(o, 160 + (extra ? extra->len : 0) + body_len);
    buf_puts(o, "HTTP/1.1 ");
    buf_putu(o, (uint64_t)status);
    buf_puts(o, " ");
    buf_puts(o, reason(status));
    buf_puts(o, "\r\nContent-Type: ");
    buf_puts(o, ctype);
    buf_puts(o, "\r\nContent-Length: ");
    buf_putu(o, body_len);
    buf_puts(o, keep_alive ? "\r\nConnection: keep-alive\r\n" : "\r\nConnection: close\r\n");
    if (extra) buf_put(o, extra->p, extra->len);
    buf_puts(o, "\r\n");
    size_t hlen = o->len - start;
    buf_put(o, body, body_len);
    return hlen;
}

size_t put_response(conn_t *c, int status, const buf_t *extra, const char *body,
                           size_t body_len, int keep_alive) {
    return put_response_typed(c, status, extra, body, body_len, keep_alive,
                              "application/json");
}

void put_error_body(buf_t *b, const char *msg, const char *type, const char *code) {
    b->len = 0;
    buf_puts(b, "{\"error\":{\"message\":\"");
    buf_puts(b, msg);
    buf_puts(b, "\",\"type\":\"");
    buf_puts(b, type);
    buf_puts(b, "\",\"param\":null,\"code\":");
    if (code) {
        buf_puts(b, "\"");
        buf_puts(b, code);
        buf_puts(b, "\"");
    } else {
        buf_puts(b, "null");
    }
    buf_puts(b, "}}");
}

static void count_status(int status) {
    timeline_count(status);
    if (status == 200) INC(st_200);
    else if (status == 429) INC(st_429);
    else if (status > 100) INC(st_other);
}

/*
 * The last `len` bytes of c->out are a response due at `deadline`. With nothing
 * queued before it and the deadline passed it is released at once; otherwise it
 * waits its turn (answers leave in request order) and the connection goes into the
 * deadline heap when it becomes the head.
 */
void enqueue(worker_t *w, conn_t *c, size_t len, uint64_t deadline, int status, int kind) {
    if (kind != P_SEND) c->stop_parse = 1;
    if (c->qhead == c->qlen && deadline <= w->now && kind != P_STALL) {
        c->out_ready += len;
        count_status(status);
        if (kind == P_SEND_CLOSE) c->closing = 1;
        return;
    }
    if (c->qlen == c->qcap) {
        if (c->qhead > 0) {
            memmove(c->q, c->q + c->qhead, (c->qlen - c->qhead) * sizeof *c->q);
            c->qlen -= c->qhead;
            c->qhead = 0;
        } else {
            unsigned nc = c->qcap ? c->qcap * 2 : 4;
            pend_t *nq = realloc(c->q, nc * sizeof *nq);
            if (!nq) die_oom();
            c->q = nq;
            c->qcap = nc;
        }
    }
    c->q[c->qlen++] = (pend_t){.len = len, .deadline = deadline, .status = status, .kind = kind};
    if (c->qlen - c->qhead == 1) {
        c->deadline = deadline;
        heap_push(w, c);
    }
}

/* Releases the due responses at the head of the queue. */
static void release_due(worker_t *w, conn_t *c) {
    heap_remove(w, c);
    while (c->qhead < c->qlen && c->q[c->qhead].deadline <= w->now) {
        pend_t *it = &c->q[c->qhead++];
        if (it->kind == P_STALL) {
            c->closing = 1; /* never answered; close once earlier answers are out */
            continue;
        }
        c->out_ready += it->len;
        count_status(it->status);
        if (it->kind == P_SEND_CLOSE) c->closing = 1;
    }
    if (c->qhead == c->qlen) {
        c->qhead = c->qlen = 0;
    } else {
        c->deadline = c->q[c->qhead].deadline;
        heap_push(w, c);
    }
}

static int can_parse(const conn_t *c) {
    return !c->want_close && !c->closing && !c->stop_parse && c->qlen - c->qhead < MAX_QUEUED;
}

/* A response that is not delayed (but still queued behind earlier ones). */
void respond_now(worker_t *w, conn_t *c, int status, const buf_t *extra, int keep_alive) {
    size_t start = c->out.len;
    put_response(c, status, extra, w->body.p, w->body.len, keep_alive);
    enqueue(w, c, c->out.len - start, 0, status, keep_alive ? P_SEND : P_SEND_CLOSE);
}

void respond_error_now(worker_t *w, conn_t *c, int status, const char *msg,
                              int keep_alive) {
    put_error_body(&w->body, msg, "invalid_request_error", NULL);
    respond_now(w, c, status, NULL, keep_alive);
}

/* ---------------------------------------------------------- request parse */

static int ieq(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n != m) return 0;
    for (size_t i = 0; i < n; i++)
        if (tolower((unsigned char)a[i]) != lit[i]) return 0;
    return 1;
}

static int icontains(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    for (size_t i = 0; i + m <= n; i++)
        if (ieq(a + i, m, lit)) return 1;
    return 0;
}

/* p[0..hlen) is the head including the final CRLFCRLF. Returns 0 or -1 (malformed). */
static int parse_head(const char *p, size_t hlen, req_t *r) {
    memset(r, 0, sizeof *r);
    const char *end = p + hlen - 2; /* points at the final CRLF */
    const char *eol = memchr(p, '\r', (size_t)(end - p) + 1);
    if (!eol) return -1;
    const char *sp1 = memchr(p, ' ', (size_t)(eol - p));
    if (!sp1) return -1;
    const char *sp2 = memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1));
    if (!sp2) return -1;
    r->method = p;
    r->method_len = (size_t)(sp1 - p);
    r->path = sp1 + 1;
    r->path_len = (size_t)(sp2 - sp1 - 1);
    const char *qm = memchr(r->path, '?', r->path_len);
    if (qm) r->path_len = (size_t)(qm - r->path);
    const char *ver = sp2 + 1;
    size_t vlen = (size_t)(eol - ver);
    if (vlen != 8 || memcmp(ver, "HTTP/1.", 7) != 0) return -1;
    int http11 = ver[7] == '1';
    int conn_close = 0, conn_keep = 0;
    const char *line = eol + 2;
    while (line < end) {
        const char *le = memchr(line, '\r', (size_t)(end - line) + 1);
        if (!le) return -1;
        const char *colon = memchr(line, ':', (size_t)(le - line));
        if (colon) {
            size_t nlen = (size_t)(colon - line);
            const char *v = colon + 1;
            while (v < le && (*v == ' ' || *v == '\t')) v++;
            size_t vl = (size_t)(le - v);
            while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t')) vl--;
            if (ieq(line, nlen, "content-length")) {
                size_t cl = 0;
                if (!vl) r->bad_length = 1;
                for (size_t i = 0; i < vl; i++) {
                    if (v[i] < '0' || v[i] > '9' || cl > MAX_BODY_BYTES) {
                        r->bad_length = 1;
                        break;
                    }
                    cl = cl * 10 + (size_t)(v[i] - '0');
                }
                r->content_length = cl;
            } else if (ieq(line, nlen, "transfer-encoding")) {
                if (!ieq(v, vl, "identity")) r->chunked = 1;
            } else if (ieq(line, nlen, "connection")) {
                if (icontains(v, vl, "close")) conn_close = 1;
                if (icontains(v, vl, "keep-alive")) conn_keep = 1;
            } else if (ieq(line, nlen, "expect")) {
                if (ieq(v, vl, "100-continue")) r->expect_continue = 1;
            } else if (ieq(line, nlen, "authorization")) {
                r->has_authorization = vl > 0;
            } else if (ieq(line, nlen, "x-api-key")) {
                r->has_x_api_key = vl > 0;
            } else if (ieq(line, nlen, "anthropic-version")) {
                r->anthropic_version_ok = vl == 10 && memcmp(v, "2023-06-01", 10) == 0;
            } else if (ieq(line, nlen, "x-goog-api-key")) {
                r->has_goog_api_key = vl > 0;
            }
        }
        line = le + 2;
    }
    r->keep_alive = http11 ? !conn_close : (conn_keep && !conn_close);
    return 0;
}

int path_ends(const req_t *r, const char *suffix) {
    size_t n = strlen(suffix);
    return r->path_len >= n && memcmp(r->path + r->path_len - n, suffix, n) == 0;
}

/* Parses and handles complete requests from buf; returns the bytes consumed. */
static size_t process(worker_t *w, conn_t *c, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len && can_parse(c)) {
        const char *p = buf + off;
        size_t avail = len - off;
        const char *eoh = memmem(p, avail, "\r\n\r\n", 4);
        if (!eoh) {
            if (avail > MAX_HEADER_BYTES)
                respond_error_now(w, c, 431, "Request head too large.", 0);
            break;
        }
        size_t hlen = (size_t)(eoh - p) + 4;
        req_t r;
        if (parse_head(p, hlen, &r) != 0 || r.bad_length) {
            respond_error_now(w, c, 400, "Malformed request.", 0);
            break;
        }
        if (r.chunked) {
            respond_error_now(w, c, 411, "Chunked request bodies are not supported; send Content-Length.", 0);
            break;
        }
        if (r.content_length > MAX_BODY_BYTES) {
            respond_error_now(w, c, 413, "Request body too large.", 0);
            break;
        }
        if (avail - hlen < r.content_length) {
            if (r.expect_continue && !c->continue_sent) {
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                buf_put(&c->out, cont, sizeof cont - 1);
                enqueue(w, c, sizeof cont - 1, 0, 0, P_SEND);
                c->continue_sent = 1;
            }
            break;
        }
        c->continue_sent = 0;
        handle_request(w, c, &r, p + hlen, r.content_length);
        off += hlen + r.content_length;
    }
    return off;
}

static void consume_in(worker_t *w, conn_t *c) {
    if (c->in.len == 0) return;
    size_t used = process(w, c, c->in.p, c->in.len);
    if (used == 0) return;
    memmove(c->in.p, c->in.p + used, c->in.len - used);
    c->in.len -= used;
    if (c->in.len == 0 && c->in.cap > 65536) buf_free(&c->in);
}

static void conn_flush(conn_t *c) {
    while (c->out_off < c->out_ready) {
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out_ready - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return; /* EPOLLOUT resumes */
        c->want_close = CLOSE_ABORT;
        return;
    }
    if (c->out_off == c->out.len) {
        c->out_off = c->out_ready = c->out.len = 0;
        if (c->out.cap > 65536) buf_free(&c->out);
        if (c->closing && !c->want_close) c->want_close = CLOSE_GRACEFUL;
    } else if (c->out_off > 0) {
        memmove(c->out.p, c->out.p + c->out_off, c->out.len - c->out_off);
        c->out.len -= c->out_off;
        c->out_ready -= c->out_off;
        c->out_off = 0;
    }
}

static void conn_read(worker_t *w, conn_t *c, uint32_t ev) {
    for (;;) {
        ssize_t n = recv(c->fd, w->scratch, SCRATCH_SIZE, 0);
        if (n > 0) {
            if (c->in.len == 0 && can_parse(c)) {
                size_t used = process(w, c, w->scratch, (size_t)n);
                if (used < (size_t)n && !c->want_close)
                    buf_put(&c->in, w->scratch + used, (size_t)n - used);
            } else {
                if (c->in.len + (size_t)n > MAX_INBUF) {
                    c->want_close = CLOSE_ABORT;
                    return;
                }
                buf_put(&c->in, w->scratch, (size_t)n);
                if (can_parse(c)) consume_in(w, c);
            }
            if (c->want_close == CLOSE_ABORT) return;
            /* a short read drained the socket; without RDHUP no EOF is waiting */
            if ((size_t)n < SCRATCH_SIZE && !(ev & EPOLLRDHUP)) break;
            continue;
        }
        if (n == 0) { /* peer closed: answer what is ready, then go */
            conn_flush(c);
            c->want_close = CLOSE_ABORT;
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        c->want_close = CLOSE_ABORT;
        return;
    }
    conn_flush(c);
}

/* The deadline at the head of a connection's queue passed. */
static void conn_fire(worker_t *w, conn_t *c) {
    release_due(w, c);
    conn_flush(c);
    if (can_parse(c) && c->in.len) {
        consume_in(w, c);
        conn_flush(c);
    }
}

static void on_accept(worker_t *w) {
    for (;;) {
        int fd = accept4(w->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if ((errno == EMFILE || errno == ENFILE) && w->reserve_fd >= 0) {
                /* out of descriptors: shed one connection so the backlog moves */
                close(w->reserve_fd);
                int s = accept(w->lfd, NULL, NULL);
                if (s >= 0) close(s);
                w->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                if (s >= 0) continue;
                return;
            }
            perror("mockserver: accept");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        if (!c) die_oom();
        c->fd = fd;
        c->heap_idx = HEAP_NONE;
        c->next = w->conns;
        if (w->conns) w->conns->prev = c;
        w->conns = c;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                 .data.ptr = c};
        int64_t open_now = atomic_fetch_add_explicit(&st_open, 1, memory_order_relaxed) + 1;
        int64_t mx = LOAD(st_max_open);
        while (open_now > mx &&
               !atomic_compare_exchange_weak_explicit(&st_max_open, &mx, open_now,
                                                      memory_order_relaxed, memory_order_relaxed)) {
        }
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
            perror("mockserver: epoll_ctl");
            c->want_close = CLOSE_ABORT;
            conn_close(w, c);
        }
    }
}

static int wait_events(worker_t *w, struct epoll_event *evs) {
    if (w->heap_len == 0) return epoll_wait(w->epfd, evs, MAX_EVENTS, -1);
    uint64_t now = now_ns(), d = w->heap[0]->deadline;
    uint64_t left = d > now ? d - now : 0;
#ifdef SYS_epoll_pwait2
    static _Atomic int no_pwait2;
    if (!LOAD(no_pwait2)) {
        struct timespec ts = {.tv_sec = (time_t)(left / 1000000000ull),
                              .tv_nsec = (long)(left % 1000000000ull)};
        long n = syscall(SYS_epoll_pwait2, w->epfd, evs, MAX_EVENTS, &ts, NULL, (size_t)0);
        if (n >= 0 || errno != ENOSYS) return (int)n;
        atomic_store(&no_pwait2, 1);
    }
#endif
    return epoll_wait(w->epfd, evs, MAX_EVENTS, (int)((left + 999999) / 1000000));
}

void *worker_main(void *arg) {
    worker_t *w = arg;
    struct epoll_event *evs = calloc(MAX_EVENTS, sizeof *evs);
    if (!evs) die_oom();
    for (;;) {
        int n = wait_events(w, evs);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("mockserver: epoll_wait");
            break;
        }
        w->now = now_ns();
        int stop = 0;
        for (int i = 0; i < n; i++) {
            void *tag = evs[i].data.ptr;
            if (tag == &TAG_LISTEN) {
                on_accept(w);
            } else if (tag == &TAG_STOP) {
                stop = 1;
            } else {
                conn_t *c = tag;
                uint32_t ev = evs[i].events;
                if (ev & (EPOLLERR | EPOLLHUP)) {
                    c->want_close = CLOSE_ABORT;
                } else {
                    if (ev & (EPOLLIN | EPOLLRDHUP)) conn_read(w, c, ev);
                    if (!c->want_close && (ev & EPOLLOUT)) conn_flush(c);
                }
                if (c->want_close) conn_close(w, c);
            }
        }
        if (stop) break;
        w->now = now_ns();
        while (w->heap_len && w->heap[0]->deadline <= w->now) {
            conn_t *c = w->heap[0];
            conn_fire(w, c);
            if (c->want_close) conn_close(w, c);
        }
    }
    free(evs);
    while (w->conns) {
        w->conns->want_close = CLOSE_ABORT;
        conn_close(w, w->conns);
    }
    return NULL;
}
