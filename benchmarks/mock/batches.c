/*
 * batches.c - the Batch API of the mock: /v1/files and /v1/batches, as OpenAI serves them,
 * on a fast-forward clock.
 *
 *   POST /v1/files                 multipart/form-data: purpose=batch, file=<JSONL>
 *   GET  /v1/files/{id}            the file object
 *   GET  /v1/files/{id}/content    the file's bytes
 *   POST /v1/batches               {"input_file_id", "endpoint", "completion_window"}
 *   GET  /v1/batches               the batches, newest first ({"object":"list","data":...})
 *   GET  /v1/batches/{id}          the batch object
 *   POST /v1/batches/{id}/cancel   cancelling, then cancelled with what was done so far
 *
 * A batch lives --batch-seconds (default 1): validating for the first tenth, in_progress
 * (its request_counts growing with the time) to nine tenths, finalizing, then completed.
 * When it ends, each input line is answered as the online route would answer its body (the
 * same chat / embeddings builders) into an output file; the injected faults go to an error
 * file: --batch-error-every K (every K-th line: a 400 line), --batch-transient-every K (a
 * 500 line), --batch-expire-at F (the batch expires with the first F of its lines done; the
 * rest are batch_expired lines), --batch-fail (validation fails: status failed, no files),
 * --batch-max-requests N (more lines fail validation, as OpenAI's 50,000 limit does).
 * Validation also fails for a line without a string custom_id, an object body or the
 * batch's url, and for a repeated custom_id.
 *
 * Everything is kept in memory under one mutex (the control plane is a handful of requests
 * a second); /_stats counts batch_files, batches_created and batch_lines (lines answered).
 */
#include "mock.h"

#define MAX_STORE_BYTES ((size_t)2 << 30) /* all files together */

typedef struct {
    char id[32];
    char purpose[16];
    char *data;
    size_t len;
    uint64_t created;
} mfile_t;

typedef struct {
    char id[32];
    char input[32];
    char endpoint[32];
    char output[32], error[32]; /* "" until the batch ends (and has lines for them) */
    char fail_reason[160];      /* validation failed: why */
    uint64_t created_ns;
    uint64_t created;           /* unix seconds */
    size_t lines;
    size_t done_at_cancel;      /* SIZE_MAX: not cancelled */
    int cancel_seen;            /* the batch has been shown as cancelling */
    int ended;                  /* the files were written */
    const char *final_status;   /* once ended */
    size_t n_output, n_error;
} mbatch_t;

static pthread_mutex_t store_lock = PTHREAD_MUTEX_INITIALIZER;
static mfile_t *files;
static size_t n_files, cap_files, store_bytes;
static mbatch_t *batches;
static size_t n_batches, cap_batches;
static _Atomic uint64_t st_batch_files, st_batches, st_batch_lines;

void batches_stats(buf_t *b) {
    buf_puts(b, ",\"batch_files\":");
    buf_putu(b, LOAD(st_batch_files));
    buf_puts(b, ",\"batches_created\":");
    buf_putu(b, LOAD(st_batches));
    buf_puts(b, ",\"batch_lines\":");
    buf_putu(b, LOAD(st_batch_lines));
}

static void fail_with(worker_t *w, route_ctx_t *rc, int status, const char *msg) {
    rc->status = status;
    put_error_body(&w->body, msg, "invalid_request_error", NULL);
}

static mfile_t *find_file(const char *id, size_t n) {
    for (size_t i = 0; i < n_files; i++)
        if (strlen(files[i].id) == n && memcmp(files[i].id, id, n) == 0) return &files[i];
    return NULL;
}

static mbatch_t *find_batch(const char *id, size_t n) {
    for (size_t i = 0; i < n_batches; i++)
        if (strlen(batches[i].id) == n && memcmp(batches[i].id, id, n) == 0) return &batches[i];
    return NULL;
}

/* Stores `len` bytes as a new file (takes `data`); NULL when the store is full. */
static mfile_t *add_file(char *data, size_t len, const char *purpose) {
    if (store_bytes + len > MAX_STORE_BYTES) return NULL;
    if (n_files == cap_files) {
        size_t nc = cap_files ? cap_files * 2 : 16;
        mfile_t *nf = realloc(files, nc * sizeof *nf);
        if (!nf) die_oom();
        files = nf;
        cap_files = nc;
    }
    mfile_t *f = &files[n_files];
    memset(f, 0, sizeof *f);
    snprintf(f->id, sizeof f->id, "file-mock%zu", n_files + 1);
    snprintf(f->purpose, sizeof f->purpose, "%s", purpose);
    f->data = data;
    f->len = len;
    f->created = (uint64_t)time(NULL);
    n_files++;
    store_bytes += len;
    return f;
}

static void put_file_object(buf_t *b, const mfile_t *f) {
    buf_puts(b, "{\"id\":\"");
    buf_puts(b, f->id);
    buf_puts(b, "\",\"object\":\"file\",\"bytes\":");
    buf_putu(b, f->len);
    buf_puts(b, ",\"created_at\":");
    buf_putu(b, f->created);
    buf_puts(b, ",\"filename\":\"");
    buf_puts(b, f->id);
    buf_puts(b, ".jsonl\",\"purpose\":\"");
    buf_puts(b, f->purpose);
    buf_puts(b, "\"}");
}

/* ------------------------------------------------------------------ files */

/* The part of a multipart body named `name`: its data [*s, *e). 0, or -1 if absent. */
static int multipart_part(const char *p, size_t len, const char *delim, size_t dlen,
                          const char *name, size_t *s, size_t *e) {
    char want[64];
    int wn = snprintf(want, sizeof want, "name=\"%s\"", name);
    size_t at = 0;
    while (at + dlen <= len) {
        const char *d = memmem(p + at, len - at, delim, dlen);
        if (!d) return -1;
        size_t head = (size_t)(d - p) + dlen;
        if (head + 2 > len || memcmp(p + head, "\r\n", 2) != 0) return -1; /* "--" ends */
        head += 2;
        const char *eoh = memmem(p + head, len - head, "\r\n\r\n", 4);
        if (!eoh) return -1;
        size_t data = (size_t)(eoh - p) + 4;
        /* the part ends at CRLF + the next delimiter */
        const char *next = NULL;
        for (size_t k = data; k + 2 + dlen <= len; k++) {
            const char *cr = memchr(p + k, '\r', len - k);
            if (!cr) break;
            k = (size_t)(cr - p);
            if (k + 2 + dlen <= len && p[k + 1] == '\n' && memcmp(p + k + 2, delim, dlen) == 0) {
                next = cr;
                break;
            }
        }
        if (!next) return -1;
        if (memmem(p + head, data - head, want, (size_t)wn)) {
            *s = data;
            *e = (size_t)(next - p);
            return 0;
        }
        at = (size_t)(next - p) + 2;
    }
    return -1;
}

static void upload(worker_t *w, route_ctx_t *rc) {
    const char *p = rc->body;
    size_t len = rc->blen;
    /* the body opens with the delimiter line: "--BOUNDARY\r\n" */
    const char *eol = len > 4 ? memmem(p, len, "\r\n", 2) : NULL;
    if (len < 4 || p[0] != '-' || p[1] != '-' || !eol || eol - p > 200) {
        fail_with(w, rc, 400, "Expected a multipart/form-data body.");
        return;
    }
    size_t dlen = (size_t)(eol - p);
    size_t ps, pe, fs, fe;
    if (multipart_part(p, len, p, dlen, "purpose", &ps, &pe) != 0) {
        fail_with(w, rc, 400, "Missing the 'purpose' field.");
        return;
    }
    if (pe - ps != 5 || memcmp(p + ps, "batch", 5) != 0) {
        fail_with(w, rc, 400, "This mock takes purpose=batch files only.");
        return;
    }
    if (multipart_part(p, len, p, dlen, "file", &fs, &fe) != 0) {
        fail_with(w, rc, 400, "Missing the 'file' field.");
        return;
    }
    char *data = malloc(fe - fs + 1);
    if (!data) die_oom();
    memcpy(data, p + fs, fe - fs);
    data[fe - fs] = 0;
    pthread_mutex_lock(&store_lock);
    mfile_t *f = add_file(data, fe - fs, "batch");
    if (f) put_file_object(&w->body, f);
    pthread_mutex_unlock(&store_lock);
    if (!f) {
        free(data);
        fail_with(w, rc, 400, "The mock's file store is full.");
        return;
    }
    INC(st_batch_files);
}

/* ---------------------------------------------------------------- batches */

/* Checks the input file's lines for `b` (fills b->lines, or b->fail_reason). */
static void validate(mbatch_t *b, const mfile_t *f) {
    const char *p = f->data;
    size_t len = f->len, at = 0, n = 0;
    char (*seen)[72] = NULL; /* custom ids, to refuse repeats (small batches: a linear look) */
    size_t seen_cap = 0;
    while (at < len) {
        const char *nl = memchr(p + at, '\n', len - at);
        size_t end = nl ? (size_t)(nl - p) : len;
        size_t s = skip_ws(p, end, at);
        if (s < end) {
            n++;
            size_t cid = obj_get(p, end, s, "custom_id"), ce = str_end(p, end, cid);
            size_t url = obj_get(p, end, s, "url"), ue = str_end(p, end, url);
            size_t body = obj_get(p, end, s, "body");
            if (ce == SIZE_MAX || ue == SIZE_MAX || body == SIZE_MAX || p[body] != '{') {
                snprintf(b->fail_reason, sizeof b->fail_reason,
                         "line %zu: needs a string custom_id, a url and an object body", n);
                break;
            }
            if (ue - url - 1 != strlen(b->endpoint) ||
                memcmp(p + url + 1, b->endpoint, ue - url - 1) != 0) {
                snprintf(b->fail_reason, sizeof b->fail_reason,
                         "line %zu: its url is not the batch's endpoint %s", n, b->endpoint);
                break;
            }
            size_t cl = ce - cid - 1;
            if (cl == 0 || cl >= 72) {
                snprintf(b->fail_reason, sizeof b->fail_reason,
                         "line %zu: custom_id must be 1-71 bytes in this mock", n);
                break;
            }
            if (n <= 5000) { /* repeats: checked in the first 5,000 lines */
                int dup = 0;
                for (size_t k = 0; k + 1 < n && !dup; k++)
                    dup = strlen(seen[k]) == cl && memcmp(seen[k], p + cid + 1, cl) == 0;
                if (dup) {
                    snprintf(b->fail_reason, sizeof b->fail_reason,
                             "line %zu: custom_id repeats an earlier line's", n);
                    break;
                }
                if (n > seen_cap) {
                    seen_cap = seen_cap ? seen_cap * 2 : 64;
                    void *ns = realloc(seen, seen_cap * sizeof *seen);
                    if (!ns) die_oom();
                    seen = ns;
                }
                memcpy(seen[n - 1], p + cid + 1, cl);
                seen[n - 1][cl] = 0;
            }
        }
        at = end + 1;
    }
    free(seen);
    if (!b->fail_reason[0] && n == 0) snprintf(b->fail_reason, sizeof b->fail_reason,
                                               "the input file has no requests");
    if (!b->fail_reason[0] && cfg.batch_max_requests && n > (size_t)cfg.batch_max_requests)
        snprintf(b->fail_reason, sizeof b->fail_reason,
                 "the input file has %zu requests, above this mock's limit of %d", n,
                 cfg.batch_max_requests);
    if (!b->fail_reason[0] && cfg.batch_fail)
        snprintf(b->fail_reason, sizeof b->fail_reason, "validation failed (--batch-fail)");
    b->lines = n;
}

/* How far along `b` is at `now`: its status and the lines done. */
static const char *progress_of(const mbatch_t *b, uint64_t now, size_t *done) {
    double t = (double)(now - b->created_ns) / 1e9 / (cfg.batch_seconds > 0 ? cfg.batch_seconds
                                                                             : 1e-9);
    if (b->ended) {
        *done = b->n_output + b->n_error;
        return b->final_status;
    }
    if (b->fail_reason[0]) {
        *done = 0;
        return t < 0.1 ? "validating" : "failed";
    }
    double frac = t < 0.1 ? 0 : t >= 0.9 ? 1 : (t - 0.1) / 0.8;
    size_t lines_done = (size_t)(frac * (double)b->lines);
    if (cfg.batch_expire_at > 0) {
        size_t cap = (size_t)(cfg.batch_expire_at * (double)b->lines);
        if (lines_done > cap) lines_done = cap;
        *done = lines_done;
        if (t >= 1.0) return "expired";
    }
    if (b->done_at_cancel != SIZE_MAX) {
        *done = b->done_at_cancel;
        return "cancelling";
    }
    *done = lines_done;
    if (t < 0.1) return "validating";
    if (t < 0.9) return "in_progress";
    if (t < 1.0) return "finalizing";
    return "completed";
}

static int line_fault(size_t k) { /* k: 1-based line number; 0 none, 400 or 500 */
    if (cfg.batch_error_every && k % (size_t)cfg.batch_error_every == 0) return 400;
    if (cfg.batch_transient_every && k % (size_t)cfg.batch_transient_every == 0) return 500;
    return 0;
}

static void put_line_head(buf_t *o, const char *p, size_t cid, size_t ce, size_t k) {
    buf_puts(o, "{\"id\":\"batch_req_");
    buf_putu(o, k);
    buf_puts(o, "\",\"custom_id\":");
    buf_put(o, p + cid, ce + 1 - cid);
}

/* Writes the output and error files of a batch that has ended with `done` lines done. */
static void finish_batch(worker_t *w, mbatch_t *b, const char *status, size_t done) {
    b->ended = 1;
    b->final_status = status;
    if (strcmp(status, "failed") == 0) return;
    const mfile_t *f = find_file(b->input, strlen(b->input));
    buf_t out = {0}, err = {0};
    const char *p = f->data;
    size_t len = f->len, at = 0, k = 0;
    int chat = strcmp(b->endpoint, "/v1/chat/completions") == 0;
    const char *left = strcmp(status, "expired") == 0 ? "batch_expired"
                       : strcmp(status, "cancelled") == 0 ? "batch_cancelled" : NULL;
    while (at < len) {
        const char *nl = memchr(p + at, '\n', len - at);
        size_t end = nl ? (size_t)(nl - p) : len;
        size_t s = skip_ws(p, end, at);
        at = end + 1;
        if (s >= end) continue;
        k++;
        size_t cid = obj_get(p, end, s, "custom_id"), ce = str_end(p, end, cid);
        size_t body = obj_get(p, end, s, "body"), be = skip_value(p, end, body);
        if (k > done) {
            if (!left) continue;
            put_line_head(&err, p, cid, ce, k);
            buf_puts(&err, ",\"response\":null,\"error\":{\"code\":\"");
            buf_puts(&err, left);
            buf_puts(&err, "\",\"message\":\"This request was not executed before the batch ");
            buf_puts(&err, strcmp(left, "batch_expired") == 0 ? "expired" : "was cancelled");
            buf_puts(&err, ".\"}}\n");
            b->n_error++;
            continue;
        }
        int fault = line_fault(k);
        buf_t *o = fault ? &err : &out;
        put_line_head(o, p, cid, ce, k);
        buf_puts(o, ",\"response\":{\"status_code\":");
        buf_putu(o, fault ? (uint64_t)fault : 200);
        buf_puts(o, ",\"request_id\":\"req_mock");
        buf_putu(o, k);
        buf_puts(o, "\",\"body\":");
        if (fault) {
            put_error_body(&w->body, fault == 400 ? "mock: this line was refused (--batch-error-every)"
                                                  : "mock: this line failed (--batch-transient-every)",
                           fault == 400 ? "invalid_request_error" : "server_error", NULL);
        } else {
            scan_t sc;
            scan_body(p + body, be - body, &sc);
            sc.stream = 0; /* a batch line is never streamed */
            w->body.len = 0;
            if (chat) build_chat(w, p + body, be - body, &sc);
            else build_embeddings(w, p + body, be - body, &sc);
            INC(st_batch_lines);
        }
        buf_put(o, w->body.p, w->body.len);
        buf_puts(o, "},\"error\":null}\n");
        if (fault) b->n_error++;
        else b->n_output++;
    }
    w->body.len = 0;
    if (b->n_output) {
        mfile_t *of = add_file(out.p, out.len, "batch_output");
        if (of) snprintf(b->output, sizeof b->output, "%s", of->id);
        else free(out.p);
    } else {
        free(out.p);
    }
    if (b->n_error) {
        mfile_t *ef = add_file(err.p, err.len, "batch_output");
        if (ef) snprintf(b->error, sizeof b->error, "%s", ef->id);
        else free(err.p);
    } else {
        free(err.p);
    }
}

static void put_id_or_null(buf_t *b, const char *id) {
    if (id[0]) {
        buf_puts(b, "\"");
        buf_puts(b, id);
        buf_puts(b, "\"");
    } else {
        buf_puts(b, "null");
    }
}

/* The batch object of `b` now (ending it, when its time has come). */
static void put_batch(worker_t *w, buf_t *o, mbatch_t *b) {
    size_t done;
    const char *status = progress_of(b, w->now, &done);
    if (!b->ended && (strcmp(status, "completed") == 0 || strcmp(status, "expired") == 0 ||
                      strcmp(status, "failed") == 0)) {
        finish_batch(w, b, status, done);
    } else if (!b->ended && b->done_at_cancel != SIZE_MAX) {
        /* the cancel's own answer says "cancelling"; any later look finds it cancelled */
        if (b->cancel_seen) finish_batch(w, b, "cancelled", b->done_at_cancel);
        b->cancel_seen = 1;
    }
    if (b->ended) status = b->final_status;
    size_t failed = 0;
    for (size_t k = 1; k <= done && !b->ended; k++) failed += line_fault(k) != 0;
    if (b->ended) failed = b->n_error;
    buf_puts(o, "{\"id\":\"");
    buf_puts(o, b->id);
    buf_puts(o, "\",\"object\":\"batch\",\"endpoint\":\"");
    buf_puts(o, b->endpoint);
    buf_puts(o, "\",\"errors\":");
    if (strcmp(status, "failed") == 0) {
        buf_puts(o, "{\"object\":\"list\",\"data\":[{\"code\":\"invalid_request\",\"message\":\"");
        buf_puts(o, b->fail_reason);
        buf_puts(o, "\",\"param\":null,\"line\":null}]}");
    } else {
        buf_puts(o, "null");
    }
    buf_puts(o, ",\"input_file_id\":\"");
    buf_puts(o, b->input);
    buf_puts(o, "\",\"completion_window\":\"24h\",\"status\":\"");
    buf_puts(o, status);
    buf_puts(o, "\",\"output_file_id\":");
    put_id_or_null(o, b->output);
    buf_puts(o, ",\"error_file_id\":");
    put_id_or_null(o, b->error);
    buf_puts(o, ",\"created_at\":");
    buf_putu(o, b->created);
    buf_puts(o, ",\"request_counts\":{\"total\":");
    buf_putu(o, b->fail_reason[0] ? 0 : b->lines);
    buf_puts(o, ",\"completed\":");
    buf_putu(o, done - failed);
    buf_puts(o, ",\"failed\":");
    buf_putu(o, failed);
    buf_puts(o, "},\"metadata\":null}");
}

static void create(worker_t *w, route_ctx_t *rc) {
    const char *p = rc->body;
    size_t len = rc->blen, s = skip_ws(p, len, 0);
    size_t fid = obj_get(p, len, s, "input_file_id"), fe = str_end(p, len, fid);
    size_t ep = obj_get(p, len, s, "endpoint"), ee = str_end(p, len, ep);
    size_t cw = obj_get(p, len, s, "completion_window"), ce = str_end(p, len, cw);
    if (fe == SIZE_MAX || ee == SIZE_MAX || ce == SIZE_MAX) {
        fail_with(w, rc, 400, "input_file_id, endpoint and completion_window are required.");
        return;
    }
    if (!raw_is(p, cw + 1, ce, "24h")) {
        fail_with(w, rc, 400, "completion_window must be 24h.");
        return;
    }
    int chat = raw_is(p, ep + 1, ee, "/v1/chat/completions");
    if (!chat && !raw_is(p, ep + 1, ee, "/v1/embeddings")) {
        fail_with(w, rc, 400, "endpoint must be /v1/chat/completions or /v1/embeddings.");
        return;
    }
    pthread_mutex_lock(&store_lock);
    const mfile_t *f = find_file(p + fid + 1, fe - fid - 1);
    if (!f || strcmp(f->purpose, "batch") != 0) {
        pthread_mutex_unlock(&store_lock);
        fail_with(w, rc, 400, "No such input file (purpose batch).");
        return;
    }
    if (n_batches == cap_batches) {
        size_t nc = cap_batches ? cap_batches * 2 : 16;
        mbatch_t *nb = realloc(batches, nc * sizeof *nb);
        if (!nb) die_oom();
        batches = nb;
        cap_batches = nc;
    }
    mbatch_t *b = &batches[n_batches++];
    memset(b, 0, sizeof *b);
    snprintf(b->id, sizeof b->id, "batch_mock%zu", n_batches);
    snprintf(b->input, sizeof b->input, "%s", f->id);
    snprintf(b->endpoint, sizeof b->endpoint, "%s",
             chat ? "/v1/chat/completions" : "/v1/embeddings");
    b->created_ns = w->now;
    b->created = (uint64_t)time(NULL);
    b->done_at_cancel = SIZE_MAX;
    validate(b, f);
    put_batch(w, &w->body, b);
    pthread_mutex_unlock(&store_lock);
    INC(st_batches);
}

/* ------------------------------------------------------------------ routes */

/* The path after `prefix` ("/v1/files"...): "" or "/<id>[/<verb>]" split into id, verb. */
static int split_rest(const req_t *r, size_t plen, const char **id, size_t *idn,
                      const char **verb, size_t *vn) {
    const char *p = r->path + plen;
    size_t n = r->path_len - plen;
    *id = *verb = NULL;
    *idn = *vn = 0;
    if (n == 0) return 0;
    if (p[0] != '/' || n == 1) return -1;
    p++;
    n--;
    const char *slash = memchr(p, '/', n);
    *id = p;
    *idn = slash ? (size_t)(slash - p) : n;
    if (slash) {
        *verb = slash + 1;
        *vn = n - *idn - 1;
    }
    return *idn ? 0 : -1;
}

static int is(const req_t *r, const char *method) {
    return r->method_len == strlen(method) && memcmp(r->method, method, r->method_len) == 0;
}

void route_files(worker_t *w, route_ctx_t *rc) {
    const char *id, *verb;
    size_t idn, vn;
    const req_t *r = rc->r;
    if (split_rest(r, 9, &id, &idn, &verb, &vn) != 0) {
        fail_with(w, rc, 404, "Unknown path.");
        return;
    }
    if (!id) {
        if (is(r, "POST")) upload(w, rc);
        else fail_with(w, rc, 405, "Method not allowed; use POST.");
        return;
    }
    if (!is(r, "GET")) {
        fail_with(w, rc, 405, "Method not allowed; use GET.");
        return;
    }
    pthread_mutex_lock(&store_lock);
    const mfile_t *f = find_file(id, idn);
    if (f && !verb) {
        put_file_object(&w->body, f);
    } else if (f && vn == 7 && memcmp(verb, "content", 7) == 0) {
        buf_put(&w->body, f->data, f->len);
        rc->ctype = "application/octet-stream";
    } else {
        f = NULL;
    }
    pthread_mutex_unlock(&store_lock);
    if (!f) fail_with(w, rc, 404, "No such file.");
}

void route_batches(worker_t *w, route_ctx_t *rc) {
    const char *id, *verb;
    size_t idn, vn;
    const req_t *r = rc->r;
    if (split_rest(r, 11, &id, &idn, &verb, &vn) != 0) {
        fail_with(w, rc, 404, "Unknown path.");
        return;
    }
    if (!id) {
        if (is(r, "POST")) {
            create(w, rc);
            return;
        }
        if (!is(r, "GET")) {
            fail_with(w, rc, 405, "Method not allowed.");
            return;
        }
        buf_puts(&w->body, "{\"object\":\"list\",\"data\":[");
        pthread_mutex_lock(&store_lock);
        for (size_t i = n_batches; i-- > 0;) {
            if (i + 1 != n_batches) buf_puts(&w->body, ",");
            put_batch(w, &w->body, &batches[i]);
        }
        pthread_mutex_unlock(&store_lock);
        buf_puts(&w->body, "],\"has_more\":false}");
        return;
    }
    int cancel = verb && vn == 6 && memcmp(verb, "cancel", 6) == 0;
    if ((verb && !cancel) || (cancel && !is(r, "POST")) || (!cancel && !is(r, "GET"))) {
        fail_with(w, rc, verb && !cancel ? 404 : 405, verb && !cancel ? "Unknown path."
                                                                      : "Method not allowed.");
        return;
    }
    pthread_mutex_lock(&store_lock);
    mbatch_t *b = find_batch(id, idn);
    if (b && cancel && !b->ended) {
        size_t done;
        const char *status = progress_of(b, w->now, &done);
        if (strcmp(status, "validating") == 0 || strcmp(status, "in_progress") == 0 ||
            strcmp(status, "finalizing") == 0)
            b->done_at_cancel = done;
    }
    if (b) put_batch(w, &w->body, b);
    pthread_mutex_unlock(&store_lock);
    if (!b) fail_with(w, rc, 404, "No such batch.");
}
