/* routes.c - what each request path answers (see mock.h) */
#include "mock.h"

void put_model(buf_t *b, const scan_t *sc) {
    if (sc->model) buf_put(b, sc->model, sc->model_len);
    else buf_puts(b, "mock");
}

/* One streamed chunk's head, up to where its delta or usage begins. */
static void put_chunk_head(buf_t *b, const char *id, const scan_t *sc) {
    buf_puts(b, "data: {\"id\":\"chatcmpl-mock-");
    buf_put(b, id, 16);
    buf_puts(b, "\",\"object\":\"chat.completion.chunk\",\"created\":");
    buf_putu(b, g_created);
    buf_puts(b, ",\"model\":\"");
    put_model(b, sc);
    buf_puts(b, "\",");
}

/* Length of the piece of escaped JSON text t[i..n) that starts at i: about 4 bytes, ending
 * neither inside an escape (a surrogate pair's two escapes stay together) nor inside a UTF-8
 * sequence. */
static size_t piece_len(const char *t, size_t n, size_t i) {
    size_t j = i;
    while (j < n && j - i < 4) {
        if (t[j] == '\\') {
            size_t e = j + 1 < n && t[j + 1] == 'u' ? 6 : 2;
            if (e == 6 && j + 12 <= n && (t[j + 2] == 'd' || t[j + 2] == 'D') &&
                t[j + 3] && strchr("89abAB", t[j + 3]) && t[j + 6] == '\\')
                e = 12;
            j = j + e < n ? j + e : n;
        } else {
            j++;
            while (j < n && ((unsigned char)t[j] & 0xC0) == 0x80) j++;
        }
    }
    return j - i;
}

/* The answer `text` (escaped JSON string content) as an event stream into w->body. */
static void build_chat_stream(worker_t *w, const char *id, const scan_t *sc, const char *text,
                              size_t n, uint64_t prompt, uint64_t completion) {
    buf_t *b = &w->body;
    b->len = 0;
    buf_reserve(b, 200 + n * 40);
    put_chunk_head(b, id, sc);
    buf_puts(b, "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                "\"logprobs\":null,\"finish_reason\":null}]}\n\n");
    for (size_t i = 0; i < n;) {
        size_t k = piece_len(text, n, i);
        put_chunk_head(b, id, sc);
        buf_puts(b, "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"");
        buf_put(b, text + i, k);
        buf_puts(b, "\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        i += k;
    }
    put_chunk_head(b, id, sc);
    buf_puts(b, "\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,"
                "\"finish_reason\":\"stop\"}]}\n\n");
    if (sc->include_usage) {
        put_chunk_head(b, id, sc);
        buf_puts(b, "\"choices\":[],\"usage\":{\"prompt_tokens\":");
        buf_putu(b, prompt);
        buf_puts(b, ",\"completion_tokens\":");
        buf_putu(b, completion);
        buf_puts(b, ",\"total_tokens\":");
        buf_putu(b, prompt + completion);
        buf_puts(b, "}}\n\n");
    }
    buf_puts(b, "data: [DONE]\n\n");
}

void build_chat(worker_t *w, const char *body, size_t blen, const scan_t *sc) {
    int structured = sc->rf_off != SIZE_MAX && build_structured(w, body, blen, sc);
    buf_t *b = &w->body;
    b->len = 0;
    uint64_t prompt = blen / 4 + 1, completion = sc->content_len / 4 + 1;
    char hex[17];
    uint64_t h = fnv1a(body, blen);
    for (int i = 15; i >= 0; i--) {
        hex[i] = "0123456789abcdef"[h & 15];
        h >>= 4;
    }
    if (sc->stream) {
        buf_t *t = &w->text;
        t->len = 0;
        if (structured) {
            put_escaped(t, w->ans.p, w->ans.len);
            completion = t->len / 4 + 1;
        } else {
            buf_puts(t, "echo: ");
            buf_put(t, sc->content, sc->content_len);
        }
        build_chat_stream(w, hex, sc, t->p, t->len, prompt, completion);
        if (t->cap > (4u << 20)) buf_free(t);
        w->usage_prompt = prompt;
        w->usage_completion = completion;
        return;
    }
    buf_reserve(b, 320 + sc->content_len + sc->model_len + (structured ? w->ans.len : 0));
    buf_puts(b, "{\"id\":\"chatcmpl-mock-");
    buf_put(b, hex, 16);
    buf_puts(b, "\",\"object\":\"chat.completion\",\"created\":");
    buf_putu(b, g_created);
    buf_puts(b, ",\"model\":\"");
    put_model(b, sc);
    buf_puts(b, "\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"");
    if (structured) {
        size_t at = b->len;
        put_escaped(b, w->ans.p, w->ans.len);
        completion = (b->len - at) / 4 + 1;
        if (w->doc.cap > (4u << 20)) buf_free(&w->doc); /* a huge message: give it back */
    } else {
        buf_puts(b, "echo: ");
        buf_put(b, sc->content, sc->content_len);
    }
    buf_puts(b, "\"},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":");
    buf_putu(b, prompt);
    buf_puts(b, ",\"completion_tokens\":");
    buf_putu(b, completion);
    buf_puts(b, ",\"total_tokens\":");
    buf_putu(b, prompt + completion);
    buf_puts(b, "}}");
    w->usage_prompt = prompt;
    w->usage_completion = completion;
}

/* One vector of `dim` values in [-1, 1) from the input's hash: as JSON numbers with six
 * decimals, or (base64) as little-endian float32 bytes, as OpenAI's encoding_format does. */
static void put_embedding(buf_t *b, size_t index, const char *p, size_t n, int dim, int b64) {
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    buf_puts(b, "{\"object\":\"embedding\",\"index\":");
    buf_putu(b, index);
    buf_puts(b, b64 ? ",\"embedding\":\"" : ",\"embedding\":[");
    uint64_t h = fnv1a(p, n);
    unsigned char pend[3];
    int npend = 0;
    for (int d = 0; d < dim; d++) {
        double v = (double)(splitmix64(&h) >> 11) * 0x1.0p-53 * 2.0 - 1.0; /* [-1, 1) */
        int64_t m = (int64_t)(v * 1e6 + (v < 0 ? -0.5 : 0.5));
        if (b64) {
            float f = (float)((double)m / 1e6);
            unsigned char bytes[4];
            memcpy(bytes, &f, 4); /* x86-64 and aarch64: little-endian already */
            for (int k = 0; k < 4; k++) {
                pend[npend++] = bytes[k];
                if (npend == 3) {
                    char q[4] = {alphabet[pend[0] >> 2],
                                 alphabet[((pend[0] & 3) << 4) | (pend[1] >> 4)],
                                 alphabet[((pend[1] & 15) << 2) | (pend[2] >> 6)],
                                 alphabet[pend[2] & 63]};
                    buf_put(b, q, 4);
                    npend = 0;
                }
            }
            continue;
        }
        if (d) buf_puts(b, ",");
        if (m < 0) {
            buf_puts(b, "-");
            m = -m;
        }
        buf_putu(b, (uint64_t)(m / 1000000));
        char frac[8] = {'.'};
        int64_t f = m % 1000000;
        for (int k = 6; k >= 1; k--) {
            frac[k] = (char)('0' + f % 10);
            f /= 10;
        }
        buf_put(b, frac, 7);
    }
    if (b64) {
        if (npend) {
            unsigned char b1 = npend > 1 ? pend[1] : 0;
            char q[4] = {alphabet[pend[0] >> 2], alphabet[((pend[0] & 3) << 4) | (b1 >> 4)],
                         npend > 1 ? alphabet[(b1 & 15) << 2] : '=', '='};
            buf_put(b, q, 4);
        }
        buf_puts(b, "\"}");
    } else {
        buf_puts(b, "]}");
    }
}

/* One embedding per input: a string gives one, an array gives one per element. */
void build_embeddings(worker_t *w, const char *body, size_t blen, const scan_t *sc) {
    buf_t *b = &w->body;
    b->len = 0;
    int dim = sc->dimensions ? sc->dimensions : cfg.embed_dim, b64 = sc->base64;
    buf_puts(b, "{\"object\":\"list\",\"data\":[");
    size_t i = sc->input_off;
    if (i >= blen) {
        put_embedding(b, 0, body, blen, dim, b64);
    } else if (body[i] == '[') {
        size_t n = 0;
        i = skip_ws(body, blen, i + 1);
        while (i < blen && body[i] != ']' && n < MAX_EMBED_INPUTS) {
            size_t e = skip_value(body, blen, i);
            if (e <= i) break;
            if (n) buf_puts(b, ",");
            put_embedding(b, n++, body + i, e - i, dim, b64);
            i = skip_ws(body, blen, e);
            if (i < blen && body[i] == ',') i = skip_ws(body, blen, i + 1);
        }
        if (n == 0)
            put_embedding(b, 0, body + sc->input_off, blen - sc->input_off < 2 ? 1 : 2, dim, b64);
    } else {
        size_t e = skip_value(body, blen, i);
        put_embedding(b, 0, body + i, e - i, dim, b64);
    }
    uint64_t prompt = blen / 4 + 1;
    buf_puts(b, "],\"model\":\"");
    put_model(b, sc);
    buf_puts(b, "\",\"usage\":{\"prompt_tokens\":");
    buf_putu(b, prompt);
    buf_puts(b, ",\"total_tokens\":");
    buf_putu(b, prompt);
    buf_puts(b, "}}");
    w->usage_prompt = prompt;
    w->usage_completion = 0;
}

static void build_stats(worker_t *w) {
    buf_t *b = &w->body;
    b->len = 0;
#define FIELD(name, val) do { buf_puts(b, name); buf_putu(b, (uint64_t)(val)); } while (0)
    FIELD("{\"requests\":", LOAD(st_requests));
    FIELD(",\"responses_200\":", LOAD(st_200));
    FIELD(",\"responses_429\":", LOAD(st_429));
    FIELD(",\"faults\":", LOAD(st_faults));
    FIELD(",\"open_connections\":", LOAD(st_open));
    FIELD(",\"max_open_connections\":", LOAD(st_max_open));
    FIELD(",\"responses_other\":", LOAD(st_other));
    FIELD(",\"faults_fail\":", LOAD(st_fail));
    FIELD(",\"faults_drop\":", LOAD(st_drop));
    FIELD(",\"faults_truncate\":", LOAD(st_truncate));
    FIELD(",\"faults_stall\":", LOAD(st_stall));
    FIELD(",\"threads\":", cfg.threads);
    FIELD(",\"usage_tokens\":", LOAD(st_usage_tokens));
    FIELD(",\"embed_usage_tokens\":", LOAD(st_embed_usage_tokens));
    batches_stats(b);
    buf_puts(b, "}");
#undef FIELD
}

/* ----------------------------------------------------------------- handlers */

static void route_chat(worker_t *w, route_ctx_t *rc) {
    scan_t sc;
    scan_body(rc->body, rc->blen, &sc);
    build_chat(w, rc->body, rc->blen, &sc);
    if (sc.stream) rc->ctype = "text/event-stream";
}

static void route_embeddings(worker_t *w, route_ctx_t *rc) {
    scan_t sc;
    scan_body(rc->body, rc->blen, &sc);
    build_embeddings(w, rc->body, rc->blen, &sc);
}

static void route_stats(worker_t *w, route_ctx_t *rc) {
    (void)rc;
    build_stats(w);
}

static void route_timeline(worker_t *w, route_ctx_t *rc) {
    (void)rc;
    build_timeline(&w->body);
}

/* ------------------------------------------------------------------- table */
/*
 * The first entry whose path and method match answers. A new route: a handler (here, or in
 * a file of its own declared in mock.h) and a line here, above any entry whose path would
 * also match it. RT_API routes go through the whole pipeline of handle_request below.
 */
static const route_t routes[] = {
    {NULL, MATCH_EXACT, "/_stats", 0, route_stats, D_OPENAI},
    {NULL, MATCH_EXACT, "/_timeline", 0, route_timeline, D_OPENAI},
    {"POST", MATCH_SUFFIX, "/chat/completions", RT_API, route_chat, D_OPENAI},
    {"POST", MATCH_SUFFIX, "/embeddings", RT_API | RT_EMBED, route_embeddings, D_OPENAI},
    {NULL, MATCH_PREFIX, "/v1/files", 0, route_files, D_OPENAI},  /* the Batch API (batches.c) */
    {NULL, MATCH_PREFIX, "/v1/batches", 0, route_batches, D_OPENAI},
    {"POST", MATCH_SUFFIX, "/v1/messages", RT_API, route_messages, D_ANTHROPIC},  /* native.c */
    {"POST", MATCH_SUFFIX, ":generateContent", RT_API, route_generate, D_GEMINI},
};

static int path_matches(const req_t *r, const route_t *rt) {
    size_t n = strlen(rt->path);
    if (r->path_len < n) return 0;
    switch (rt->match) {
    case MATCH_EXACT: return r->path_len == n && memcmp(r->path, rt->path, n) == 0;
    case MATCH_PREFIX: return memcmp(r->path, rt->path, n) == 0;
    default: return memcmp(r->path + r->path_len - n, rt->path, n) == 0;
    }
}

static int method_is(const req_t *r, const char *m) {
    size_t n = strlen(m);
    return r->method_len == n && memcmp(r->method, m, n) == 0;
}

/* The route for the request; NULL with *allowed = the method of the first route whose path
 * matched (NULL: none did). */
static const route_t *find_route(const req_t *r, const char **allowed) {
    *allowed = NULL;
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        const route_t *rt = &routes[i];
        if (!path_matches(r, rt)) continue;
        if (!rt->method || method_is(r, rt->method)) return rt;
        if (!*allowed) *allowed = rt->method;
    }
    return NULL;
}

/* --------------------------------------------------------- request handling */

/*
 * One request, in this order: the route (404/405); for RT_COUNT routes the request counts in
 * /_stats and starts the timeline; RT_LIMIT: the bare limiter, then --rpm/--tpm (429s);
 * RT_FAULT: --fail/--drop/--truncate/--stall; the handler builds w->body (not called for a
 * --fail fault) and, with --tpm-usage, its answer's completion tokens are charged (RT_LIMIT);
 * RT_DELAY: the response waits --latency-ms ± --jitter-ms. The x-ratelimit-* headers (the
 * level after the prompt's tokens) go on 200s only.
 */
void handle_request(worker_t *w, conn_t *c, const req_t *r, const char *body, size_t blen) {
    const char *allowed;
    const route_t *rt = find_route(r, &allowed);
    unsigned flags = rt ? rt->flags : RT_COUNT;
    w->hdrs.len = 0;
    if (flags & RT_COUNT) {
        INC(st_requests);
        timeline_start(w->now);
    }
    if (!rt) {
        if (!allowed) {
            respond_error_now(w, c, 404, "Unknown path.", r->keep_alive);
        } else {
            char msg[80];
            snprintf(msg, sizeof msg, "Method not allowed; use %s.", allowed);
            respond_error_now(w, c, 405, msg, r->keep_alive);
        }
        return;
    }

    if (flags & RT_LIMIT) {
        /* the bare limiter: 429, no headers, a short body like nginx's */
        if (!bare_take(w->now)) {
            static const char page[] = "<html><head><title>429 Too Many Requests</title></head>"
                                       "<body><center><h1>429 Too Many Requests</h1></center>"
                                       "</body></html>\n";
            w->body.len = 0;
            buf_put(&w->body, page, sizeof page - 1);
            respond_now(w, c, 429, NULL, r->keep_alive);
            return;
        }
        /* rate limits */
        int which = 0;
        uint64_t retry = ratelimit_take(w->now, blen, &w->hdrs, &which, rt->dialect,
                                        !!(flags & RT_EMBED));
        if (retry) {
            char msg[160];
            snprintf(msg, sizeof msg,
                     "Rate limit reached for %s (mock). Please try again in %llums.",
                     which & 1 ? "requests" : "tokens", (unsigned long long)retry);
            if (rt->dialect == D_OPENAI)
                put_error_body(&w->body, msg, which & 1 ? "requests" : "tokens",
                               "rate_limit_exceeded");
            else
                put_dialect_error(&w->body, rt->dialect, 429, msg, "rate_limit_error", retry);
            respond_now(w, c, 429, &w->hdrs, r->keep_alive);
            return;
        }
    }

    /* faults: one draw, disjoint intervals, so each rate is exact */
    enum { F_NONE, F_FAIL, F_DROP, F_TRUNC, F_STALL } fault = F_NONE;
    if ((flags & RT_FAULT) &&
        cfg.fail_rate + cfg.drop_rate + cfg.truncate_rate + cfg.stall_rate > 0) {
        double u = rng_unit(&w->rng_fault), acc = cfg.fail_rate;
        if (u < acc) fault = F_FAIL;
        else if (u < (acc += cfg.drop_rate)) fault = F_DROP;
        else if (u < (acc += cfg.truncate_rate)) fault = F_TRUNC;
        else if (u < (acc += cfg.stall_rate)) fault = F_STALL;
    }
    if (fault != F_NONE) INC(st_faults);
    if (fault == F_DROP) {
        INC(st_drop);
        c->want_close = CLOSE_ABORT;
        return;
    }
    if (fault == F_STALL) {
        INC(st_stall);
        enqueue(w, c, 0, w->now + (uint64_t)(cfg.stall_timeout_ms * 1e6), 0, P_STALL);
        return;
    }

    route_ctx_t rc = {.r = r, .body = body, .blen = blen, .status = 200, .ctype = NULL};
    if (fault == F_FAIL) {
        INC(st_fail);
        rc.status = (w->fail_toggle++ & 1) ? 503 : 500;
        const char *msg = rc.status == 500
                              ? "The server had an error while processing your request."
                              : "The engine is currently overloaded, please try again later.";
        if (rt->dialect == D_OPENAI) {
            put_error_body(&w->body, msg, "server_error", NULL);
        } else {
            /* Anthropic says it is overloaded with its own 529 */
            if (rc.status == 503 && rt->dialect == D_ANTHROPIC) rc.status = 529;
            w->body.len = 0;
            put_dialect_error(&w->body, rt->dialect, rc.status, msg,
                              rc.status == 500 ? "api_error" : "overloaded_error", 0);
        }
    } else {
        w->body.len = 0;
        w->usage_prompt = w->usage_completion = 0;
        rt->handler(w, &rc);
        if (flags & RT_LIMIT)
            ratelimit_charge(w->now, w->usage_completion, !!(flags & RT_EMBED));
        if (rc.status == 200 && (flags & RT_COUNT)) {
            uint64_t used = w->usage_prompt + w->usage_completion;
            atomic_fetch_add_explicit(flags & RT_EMBED ? &st_embed_usage_tokens : &st_usage_tokens,
                                      used, memory_order_relaxed);
        }
    }
    int status = rc.status;
    int keep = r->keep_alive && fault != F_TRUNC;
    size_t start = c->out.len;
    size_t hlen = put_response_typed(c, status, status == 200 ? &w->hdrs : NULL, w->body.p,
                                     w->body.len, keep, rc.ctype ? rc.ctype : "application/json");
    if (fault == F_TRUNC) {
        INC(st_truncate);
        c->out.len = start + hlen + w->body.len / 2;
        status = 0; /* counted as a fault, not as a 200 */
    }
    uint64_t delay = 0;
    if (flags & RT_DELAY) {
        double ms = cfg.latency_ms;
        if (cfg.jitter_ms > 0) ms += (2.0 * rng_unit(&w->rng_jitter) - 1.0) * cfg.jitter_ms;
        delay = ms > 0 ? (uint64_t)(ms * 1e6) : 0;
    }
    if (!(flags & RT_COUNT)) status = 0; /* not a response in /_stats either */
    enqueue(w, c, c->out.len - start, w->now + delay, status, keep ? P_SEND : P_SEND_CLOSE);
}
