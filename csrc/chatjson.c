/* chatjson.c — see chatjson.h. One recursive-descent pass validates the whole body and
 * records where the wanted strings are; only when the body is known good are those strings
 * decoded (in place), so a fallback always leaves the original bytes for json.loads. */
#include "chatjson.h"
#include "jsonscan.h"

#include <string.h>

/* What the value being scanned is, on the path to the fields we extract. */
typedef enum {
    ROLE_SKIP = 0,
    ROLE_TOP,
    ROLE_CHOICES,
    ROLE_CHOICE0,
    ROLE_MESSAGE,
    ROLE_CONTENT,
    ROLE_FINISH,
    ROLE_USAGE,
    ROLE_PROMPT_TOKENS,
    ROLE_COMPLETION_TOKENS,
    ROLE_TOTAL_TOKENS,
    ROLE_INDEX,        /* chunks: choices[0].index, must be 0 */
    ROLE_ERROR,        /* chunks: the top-level "error" value */
    ROLE_ERROR_CODE,   /* chunks: error.code */
} role_t;

typedef sx_json_span str_span;

typedef struct {
    sx_json_cursor c;
    int chunk;         /* reading a chat.completion.chunk (sx_chat_parse_chunk) */
    str_span content, finish;
    int64_t tokens[3];
    int usage_found;   /* usage was an object */
    int error_found;   /* "error" was present and not null */
    int64_t error_code;
} scanner;

enum { OK = SX_JSON_OK, FALLBACK = SX_JSON_FALLBACK };

static int scan_value(scanner *s, role_t role, int depth);

/* The role of key `k` (raw bytes) inside an object of role `parent`. */
static role_t child_role(role_t parent, int chunk, const unsigned char *k, size_t n)
{
#define KEY_IS(lit) (n == sizeof(lit) - 1 && memcmp(k, lit, n) == 0)
    switch (parent) {
    case ROLE_TOP:
        if (KEY_IS("choices"))
            return ROLE_CHOICES;
        if (KEY_IS("usage"))
            return ROLE_USAGE;
        if (chunk && KEY_IS("error"))
            return ROLE_ERROR;
        break;
    case ROLE_CHOICE0:
        if (chunk ? KEY_IS("delta") : KEY_IS("message"))
            return ROLE_MESSAGE;
        if (KEY_IS("finish_reason"))
            return ROLE_FINISH;
        if (chunk && KEY_IS("index"))
            return ROLE_INDEX;
        break;
    case ROLE_ERROR:
        if (KEY_IS("code"))
            return ROLE_ERROR_CODE;
        break;
    case ROLE_MESSAGE:
        if (KEY_IS("content"))
            return ROLE_CONTENT;
        break;
    case ROLE_USAGE:
        if (KEY_IS("prompt_tokens"))
            return ROLE_PROMPT_TOKENS;
        if (KEY_IS("completion_tokens"))
            return ROLE_COMPLETION_TOKENS;
        if (KEY_IS("total_tokens"))
            return ROLE_TOTAL_TOKENS;
        break;
    default:
        break;
    }
    return ROLE_SKIP;
#undef KEY_IS
}

static int scan_object(scanner *s, role_t role, int depth)
{
    unsigned seen = 0;  /* bit per extracted child role: a second one is a duplicate key */
    s->c.p++;             /* '{' */
    sx_json_skip_ws(&s->c);
    if (s->c.p < s->c.end && *s->c.p == '}') {
        s->c.p++;
        return OK;
    }
    for (;;) {
        if (s->c.p >= s->c.end || *s->c.p != '"')
            return FALLBACK;
        str_span key;
        if (!sx_json_string(&s->c, &key, 0))
            return FALLBACK;
        role_t child = ROLE_SKIP;
        if (role != ROLE_SKIP) {
            if (key.escaped)
                return FALLBACK;  /* could spell a wanted key: not worth decoding */
            child = child_role(role, s->chunk, s->c.base + key.off, key.len);
            if (child != ROLE_SKIP) {
                if (seen & (1u << child))
                    return FALLBACK;  /* json.loads keeps the last: leave that to it */
                seen |= 1u << child;
            }
        }
        sx_json_skip_ws(&s->c);
        if (s->c.p >= s->c.end || *s->c.p != ':')
            return FALLBACK;
        s->c.p++;
        sx_json_skip_ws(&s->c);
        if (!scan_value(s, child, depth + 1))
            return FALLBACK;
        int more = sx_json_next(&s->c, '}');
        if (more < 0)
            return FALLBACK;
        if (!more)
            break;
    }
    if (s->chunk)
        return OK;  /* a chunk may carry any subset of the fields */
    if (role == ROLE_MESSAGE && !(seen & (1u << ROLE_CONTENT)))
        return FALLBACK;  /* no content key: json.loads' KeyError path reports it */
    if (role == ROLE_CHOICE0 && !(seen & (1u << ROLE_MESSAGE)))
        return FALLBACK;
    return OK;
}

static int scan_array(scanner *s, role_t role, int depth)
{
    s->c.p++;  /* '[' */
    sx_json_skip_ws(&s->c);
    if (s->c.p < s->c.end && *s->c.p == ']') {
        s->c.p++;
        /* no choices[0]: an answer without one is json.loads' to report; a chunk without
         * one (the usage chunk) is normal */
        return role == ROLE_CHOICES && !s->chunk ? FALLBACK : OK;
    }
    for (size_t i = 0;; i++) {
        if (role == ROLE_CHOICES && i == 1 && s->chunk)
            return FALLBACK;  /* n > 1: which choice is index 0 is json.loads' to sort out */
        role_t child = (role == ROLE_CHOICES && i == 0) ? ROLE_CHOICE0 : ROLE_SKIP;
        if (!scan_value(s, child, depth + 1))
            return FALLBACK;
        int more = sx_json_next(&s->c, ']');
        if (more <= 0)
            return more < 0 ? FALLBACK : OK;
    }
}

static int scan_value(scanner *s, role_t role, int depth)
{
    if (depth > SX_CHAT_MAX_DEPTH || s->c.p >= s->c.end)
        return FALLBACK;
    unsigned c = *s->c.p;
    int64_t number;
    switch (role) {
    case ROLE_SKIP:
        break;
    case ROLE_TOP: case ROLE_CHOICE0: case ROLE_MESSAGE:
        if (c != '{')
            return FALLBACK;
        return scan_object(s, role, depth);
    case ROLE_CHOICES:
        if (c != '[')
            return FALLBACK;
        return scan_array(s, role, depth);
    case ROLE_CONTENT: case ROLE_FINISH: {
        str_span *span = role == ROLE_CONTENT ? &s->content : &s->finish;
        if (c == '"') {
            if (!sx_json_string(&s->c, span, 1))
                return FALLBACK;
            span->found = 1;
            return OK;
        }
        if (c == 'n' && sx_json_literal(&s->c, "null", 4)) {
            span->found = 2;
            return OK;
        }
        return FALLBACK;
    }
    case ROLE_USAGE:
        if (c == '{') {
            s->usage_found = 1;
            return scan_object(s, role, depth);
        }
        if (c == 'n')
            return sx_json_literal(&s->c, "null", 4);
        return FALLBACK;
    case ROLE_INDEX:
        if (!sx_json_number(&s->c, &number, NULL) || number != 0)
            return FALLBACK;
        return OK;
    case ROLE_ERROR:
        if (c == 'n')
            return sx_json_literal(&s->c, "null", 4);
        s->error_found = 1;
        if (c == '{')
            return scan_object(s, role, depth);
        break;  /* any other value: an error all the same */
    case ROLE_ERROR_CODE:
        if (c >= '0' && c <= '9') {
            if (!sx_json_number(&s->c, &number, NULL))
                return FALLBACK;
            s->error_code = number;
            return OK;
        }
        break;
    case ROLE_PROMPT_TOKENS: case ROLE_COMPLETION_TOKENS: case ROLE_TOTAL_TOKENS:
        if (c == 'n')
            return sx_json_literal(&s->c, "null", 4);
        if (!sx_json_number(&s->c, &number, NULL) || number < 0)
            return FALLBACK;
        s->tokens[role - ROLE_PROMPT_TOKENS] = number;
        return OK;
    }
    return sx_json_skip(&s->c, depth);  /* off the extracted path: validate and skip */
}

/* Validates buf as one JSON value whose top level is an object; records the wanted spans. */
static int scan_document(scanner *s, char *buf, size_t len, int chunk)
{
    memset(s, 0, sizeof *s);
    if (!buf || len == 0 || len > UINT32_MAX)
        return FALLBACK;
    s->c.base = (const unsigned char *)buf;
    s->c.p = s->c.base;
    s->c.end = s->c.base + len;
    s->chunk = chunk;
    s->error_code = -1;
    sx_json_skip_ws(&s->c);
    if (!scan_value(s, ROLE_TOP, 0))
        return FALLBACK;
    sx_json_skip_ws(&s->c);
    return s->c.p == s->c.end ? OK : FALLBACK;
}

int sx_chat_parse(char *buf, size_t len, sx_chat *out)
{
    memset(out, 0, sizeof *out);
    scanner s;
    if (!scan_document(&s, buf, len, 0) || !s.content.found)
        return SX_CHAT_FALLBACK;  /* content is found only inside choices[0].message */

    unsigned char *ubuf = (unsigned char *)buf;
    if (s.content.found == 1) {
        out->content_off = (uint32_t)s.content.off;
        out->content_len = (uint32_t)sx_json_decode_in_place(ubuf, &s.content);
    } else {
        out->content_null = 1;
    }
    if (s.finish.found == 1) {
        out->finish_off = (uint32_t)s.finish.off;
        out->finish_len = (uint32_t)sx_json_decode_in_place(ubuf, &s.finish);
    } else {
        out->finish_null = 1;
    }
    out->prompt_tokens = s.tokens[0];
    out->completion_tokens = s.tokens[1];
    out->total_tokens = s.tokens[2];
    out->parsed = SX_CHAT_PARSED;
    return SX_CHAT_PARSED;
}

int sx_chat_parse_chunk(char *buf, size_t len, sx_chat_chunk *out)
{
    memset(out, 0, sizeof *out);
    out->error_code = -1;
    scanner s;
    if (!scan_document(&s, buf, len, 1))
        return SX_CHAT_FALLBACK;
    if (s.error_found) {
        /* Nothing is decoded: the caller keeps these bytes as the error's body. */
        out->error = 1;
        out->error_code = s.error_code;
        return SX_CHAT_PARSED;
    }
    unsigned char *ubuf = (unsigned char *)buf;
    if (s.content.found == 1) {
        out->has_content = 1;
        out->content_off = (uint32_t)s.content.off;
        out->content_len = (uint32_t)sx_json_decode_in_place(ubuf, &s.content);
    }
    if (s.finish.found == 1) {
        out->has_finish = 1;
        out->finish_off = (uint32_t)s.finish.off;
        out->finish_len = (uint32_t)sx_json_decode_in_place(ubuf, &s.finish);
    }
    out->has_usage = (uint8_t)s.usage_found;
    out->prompt_tokens = s.tokens[0];
    out->completion_tokens = s.tokens[1];
    out->total_tokens = s.tokens[2];
    return SX_CHAT_PARSED;
}
