/* sse.c — see sse.h. */
#include "sse.h"

#include <stdlib.h>
#include <string.h>

void sx_sse_init(sx_sse *r)
{
    memset(r, 0, sizeof *r);
    r->error_code = -1;
}

void sx_sse_reset(sx_sse *r)
{
    free(r->data);
    free(r->content);
    free(r->finish);
    free(r->error_body);
    sx_sse_init(r);
}

/* Make room for `more` bytes after *len in *buf. 0 on success; -1 (nothing changed) if out
 * of memory. */
static int reserve(char **buf, size_t *cap, size_t len, size_t more)
{
    if (len + more <= *cap)
        return 0;
    size_t n = *cap ? *cap : 256;
    while (n < len + more)
        n *= 2;
    char *grown = realloc(*buf, n);
    if (!grown)
        return -1;
    *buf = grown;
    *cap = n;
    return 0;
}

static int append(char **buf, size_t *len, size_t *cap, const char *bytes, size_t n)
{
    if (reserve(buf, cap, *len, n) != 0)
        return -1;
    if (n)
        memcpy(*buf + *len, bytes, n);
    *len += n;
    return 0;
}

static int all_space(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\n' && p[i] != '\r')
            return 0;
    return 1;
}

static void keep_error(sx_sse *r, const char *data, size_t n)
{
    r->error = 1;
    r->error_body = malloc(n ? n : 1);
    if (r->error_body) {
        if (n)
            memcpy(r->error_body, data, n);
        r->error_len = n;
    }
}

/* One dispatched event; its data is r->data[0..data_len), ours to rewrite. */
static void on_event(sx_sse *r)
{
    char *data = r->data;
    size_t n = r->data_len;
    if (r->done || r->error)
        return;
    if (n == 6 && memcmp(data, "[DONE]", 6) == 0) {
        r->events++;
        r->done = 1;
        return;
    }
    if (all_space(data, n))
        return;
    r->events++;
    if (r->event_error) {
        keep_error(r, data, n);  /* before the parse below decodes anything */
        sx_chat_chunk c;
        if (sx_chat_parse_chunk(data, n, &c) == SX_CHAT_PARSED && c.error)
            r->error_code = c.error_code;
        return;
    }
    sx_chat_chunk c;
    if (sx_chat_parse_chunk(data, n, &c) != SX_CHAT_PARSED) {
        if (r->at_tail)
            return;  /* the unfinished last event of a body cut mid-way: it never was */
        r->fallback = 1;
        return;
    }
    if (c.error) {
        keep_error(r, data, n);  /* an error chunk is not decoded: these are its bytes */
        r->error_code = c.error_code;
        return;
    }
    if (c.has_finish)
        r->finish_seen = 1;
    if (r->fallback)
        return;  /* Python reads the answer; only [DONE], errors and the end still matter */
    if (c.has_content) {
        if (append(&r->content, &r->content_len, &r->content_cap, data + c.content_off,
                   c.content_len) != 0) {
            r->fallback = 1;
            return;
        }
        r->content_seen = 1;
    }
    if (c.has_finish) {
        r->finish_len = 0;
        if (append(&r->finish, &r->finish_len, &r->finish_cap, data + c.finish_off,
                   c.finish_len) != 0) {
            r->fallback = 1;
            return;
        }
    }
    if (c.has_usage) {
        r->prompt_tokens = c.prompt_tokens;
        r->completion_tokens = c.completion_tokens;
        r->total_tokens = c.total_tokens;
    }
}

static void dispatch(sx_sse *r)
{
    if (r->has_data)
        on_event(r);
    r->has_data = 0;
    r->data_len = 0;
    r->event_error = 0;
}

#define FIELD_IS(lit) (flen == sizeof(lit) - 1 && memcmp(line, lit, flen) == 0)

static void on_line(sx_sse *r, const char *line, size_t n)
{
    if (n == 0) {
        dispatch(r);
        return;
    }
    if (line[0] == ':')
        return;  /* a comment: keep-alive */
    const char *colon = memchr(line, ':', n);
    size_t flen = colon ? (size_t)(colon - line) : n;
    const char *value = colon ? colon + 1 : line + n;
    size_t vlen = (size_t)(line + n - value);
    if (vlen && value[0] == ' ') {
        value++;
        vlen--;
    }
    if (FIELD_IS("data")) {
        if (r->done || r->error)
            return;  /* nothing after these is read: do not buffer it either */
        if ((r->has_data && append(&r->data, &r->data_len, &r->data_cap, "\n", 1) != 0) ||
            append(&r->data, &r->data_len, &r->data_cap, value, vlen) != 0) {
            r->fallback = 1;
            r->data_len = 0;  /* the event is lost to this reader; Python reads the body */
        }
        r->has_data = 1;
    } else if (FIELD_IS("event")) {
        r->event_error = vlen == 5 && memcmp(value, "error", 5) == 0;
    }
    /* id:, retry: and unknown fields do not change the answer */
}

#undef FIELD_IS

/* Read the lines of raw[r->line..len); at_end: the body is complete. */
static void read_lines(sx_sse *r, const char *raw, size_t len, int at_end)
{
    if (!r->started) {
        if (len < 3 && !at_end)
            return;  /* could be the start of a BOM */
        r->started = 1;
        if (len >= 3 && memcmp(raw, "\xEF\xBB\xBF", 3) == 0)
            r->line = r->seek = 3;
    }
    size_t p = r->seek;
    while (p < len) {
        char c = raw[p];
        if (c != '\n' && c != '\r') {
            p++;
            continue;
        }
        size_t eol = 1;
        if (c == '\r') {
            if (p + 1 < len)
                eol = raw[p + 1] == '\n' ? 2 : 1;
            else if (!at_end)
                break;  /* \r at the end of what arrived: wait to see whether \n follows */
        }
        on_line(r, raw + r->line, p - r->line);
        p += eol;
        r->line = p;
    }
    r->seek = p;
    if (at_end) {
        /* An event without its blank line is read only if it makes sense whole. */
        r->at_tail = 1;
        if (r->line < len)
            on_line(r, raw + r->line, len - r->line);
        r->line = r->seek = len;
        dispatch(r);
    }
}

void sx_sse_feed(sx_sse *r, const char *raw, size_t len)
{
    read_lines(r, raw, len, 0);
}

sx_sse_verdict sx_sse_finish(sx_sse *r, const char *raw, size_t len)
{
    read_lines(r, raw, len, 1);
    if (r->error)
        return SX_SSE_ERROR;
    if (r->fallback || r->events == 0)
        return SX_SSE_FALLBACK;  /* no events at all: not an event stream; json.loads says */
    if (r->done || r->finish_seen)
        return SX_SSE_COMPLETE;
    return SX_SSE_CUT;
}

char *sx_sse_take_answer(sx_sse *r, sx_chat *chat, size_t *len)
{
    memset(chat, 0, sizeof *chat);
    size_t total = r->content_len + r->finish_len;
    if (total > UINT32_MAX)
        return NULL;
    /* The content buffer itself becomes the answer, with the finish_reason after it. */
    if (reserve(&r->content, &r->content_cap, r->content_len, r->finish_len + 1) != 0)
        return NULL;
    char *answer = r->content;
    if (r->finish_len)
        memcpy(answer + r->content_len, r->finish, r->finish_len);
    chat->parsed = SX_CHAT_PARSED;
    chat->content_null = !r->content_seen;
    chat->finish_null = !r->finish_seen;
    chat->content_off = 0;
    chat->content_len = (uint32_t)r->content_len;
    chat->finish_off = (uint32_t)r->content_len;
    chat->finish_len = (uint32_t)r->finish_len;
    chat->prompt_tokens = r->prompt_tokens;
    chat->completion_tokens = r->completion_tokens;
    chat->total_tokens = r->total_tokens;
    *len = total;
    r->content = NULL;
    r->content_len = r->content_cap = 0;
    return answer;
}

char *sx_sse_take_error(sx_sse *r, size_t *len)
{
    char *body = r->error_body;
    *len = body ? r->error_len : 0;
    r->error_body = NULL;
    r->error_len = 0;
    return body;
}

int sx_sse_error_status(const sx_sse *r)
{
    if (r->error_code >= 400 && r->error_code <= 599)
        return (int)r->error_code;
    return 500;
}
