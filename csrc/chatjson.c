/* chatjson.c — see chatjson.h. One recursive-descent pass validates the whole body and
 * records where the wanted strings are; only when the body is known good are those strings
 * decoded (in place), so a fallback always leaves the original bytes for json.loads. */
#include "chatjson.h"

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

typedef struct {
    size_t off, len;   /* the raw (escaped) bytes between the quotes */
    int escaped;
    int found;         /* 1 string, 2 null */
} str_span;

typedef struct {
    const unsigned char *base, *p, *end;
    int chunk;         /* reading a chat.completion.chunk (sx_chat_parse_chunk) */
    str_span content, finish;
    int64_t tokens[3];
    int usage_found;   /* usage was an object */
    int error_found;   /* "error" was present and not null */
    int64_t error_code;
} scanner;

/* Any return of FALLBACK from a scanning function ends the whole parse. */
enum { OK = 1, FALLBACK = 0 };

static void skip_ws(scanner *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t'))
        s->p++;
}

static int hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return FALLBACK;
        v = (v << 4) | d;
    }
    *out = v;
    return OK;
}

/* Length of the strict UTF-8 sequence at p (2..4), or 0 if it is not one: no overlong forms,
 * no encoded surrogates (Python's decoder would pass those through as lone surrogates), no
 * code point above U+10FFFF. */
static int utf8_len(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    if (c >= 0xC2 && c <= 0xDF) {
        if (end - p < 2 || (p[1] & 0xC0) != 0x80)
            return 0;
        return 2;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80)
            return 0;
        if (c == 0xE0 && p[1] < 0xA0)
            return 0;  /* overlong */
        if (c == 0xED && p[1] >= 0xA0)
            return 0;  /* U+D800..U+DFFF */
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 ||
            (p[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && p[1] < 0x90)
            return 0;  /* overlong */
        if (c == 0xF4 && p[1] >= 0x90)
            return 0;  /* above U+10FFFF */
        return 4;
    }
    return 0;
}

/* s->p is at the opening quote. Validates the string; `extracted` strings (whose decoded
 * value we return) also refuse lone surrogate escapes, which UTF-8 cannot carry. */
static int scan_string(scanner *s, str_span *out, int extracted)
{
    const unsigned char *p = s->p + 1, *end = s->end;
    int escaped = 0;
    while (p < end) {
        unsigned c = *p;
        if (c == '"') {
            if (out) {
                out->off = (size_t)(s->p + 1 - s->base);
                out->len = (size_t)(p - (s->p + 1));
                out->escaped = escaped;
            }
            s->p = p + 1;
            return OK;
        }
        if (c == '\\') {
            escaped = 1;
            if (end - p < 2)
                return FALLBACK;
            switch (p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                continue;
            case 'u': {
                unsigned u;
                if (end - p < 6 || !hex4(p + 2, &u))
                    return FALLBACK;
                p += 6;
                if (u >= 0xD800 && u <= 0xDBFF) {
                    unsigned lo;
                    if (end - p >= 6 && p[0] == '\\' && p[1] == 'u' && hex4(p + 2, &lo) &&
                        lo >= 0xDC00 && lo <= 0xDFFF) {
                        p += 6;
                    } else if (extracted) {
                        return FALLBACK;
                    }
                } else if (u >= 0xDC00 && u <= 0xDFFF && extracted) {
                    return FALLBACK;
                }
                continue;
            }
            default:
                return FALLBACK;
            }
        }
        if (c < 0x20)
            return FALLBACK;  /* json.loads (strict) refuses raw control characters */
        if (c < 0x80) {
            p++;
            continue;
        }
        int n = utf8_len(p, end);
        if (!n)
            return FALLBACK;
        p += n;
    }
    return FALLBACK;  /* unterminated */
}

/* RFC 8259 number. *as_int gets the value when it is a plain non-negative integer of at
 * most 18 digits, else -1. Very long numbers fall back (Python refuses integers of more
 * than 4,300 digits). */
static int scan_number(scanner *s, int64_t *as_int)
{
    const unsigned char *p = s->p, *end = s->end, *start = p;
    int plain = 1;
    if (p < end && *p == '-') {
        plain = 0;
        p++;
    }
    if (p >= end)
        return FALLBACK;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    } else {
        return FALLBACK;
    }
    const unsigned char *int_end = p;
    if (p < end && *p == '.') {
        plain = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return FALLBACK;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        plain = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return FALLBACK;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p - start > 4000)
        return FALLBACK;
    *as_int = -1;
    if (plain && int_end - start <= 18) {
        int64_t v = 0;
        for (const unsigned char *q = start; q < int_end; q++)
            v = v * 10 + (*q - '0');
        *as_int = v;
    }
    s->p = p;
    return OK;
}

static int scan_literal(scanner *s, const char *word, size_t n)
{
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return FALLBACK;
    s->p += n;
    return OK;
}

static int scan_value(scanner *s, role_t role, int depth);

/* After a member or element: ',' (1: another follows), the closing bracket (0: done), or
 * anything else (-1: not JSON). */
static int next_member(scanner *s, char close)
{
    skip_ws(s);
    if (s->p >= s->end)
        return -1;
    if (*s->p == ',') {
        s->p++;
        skip_ws(s);
        return 1;
    }
    if (*s->p == close) {
        s->p++;
        return 0;
    }
    return -1;
}

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
    s->p++;             /* '{' */
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return OK;
    }
    for (;;) {
        if (s->p >= s->end || *s->p != '"')
            return FALLBACK;
        str_span key;
        if (!scan_string(s, &key, 0))
            return FALLBACK;
        role_t child = ROLE_SKIP;
        if (role != ROLE_SKIP) {
            if (key.escaped)
                return FALLBACK;  /* could spell a wanted key: not worth decoding */
            child = child_role(role, s->chunk, s->base + key.off, key.len);
            if (child != ROLE_SKIP) {
                if (seen & (1u << child))
                    return FALLBACK;  /* json.loads keeps the last: leave that to it */
                seen |= 1u << child;
            }
        }
        skip_ws(s);
        if (s->p >= s->end || *s->p != ':')
            return FALLBACK;
        s->p++;
        skip_ws(s);
        if (!scan_value(s, child, depth + 1))
            return FALLBACK;
        int more = next_member(s, '}');
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
    s->p++;  /* '[' */
    skip_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
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
        int more = next_member(s, ']');
        if (more <= 0)
            return more < 0 ? FALLBACK : OK;
    }
}

static int scan_value(scanner *s, role_t role, int depth)
{
    if (depth > SX_CHAT_MAX_DEPTH || s->p >= s->end)
        return FALLBACK;
    unsigned c = *s->p;
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
            if (!scan_string(s, span, 1))
                return FALLBACK;
            span->found = 1;
            return OK;
        }
        if (c == 'n' && scan_literal(s, "null", 4)) {
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
            return scan_literal(s, "null", 4);
        return FALLBACK;
    case ROLE_INDEX:
        if (!scan_number(s, &number) || number != 0)
            return FALLBACK;
        return OK;
    case ROLE_ERROR:
        if (c == 'n')
            return scan_literal(s, "null", 4);
        s->error_found = 1;
        if (c == '{')
            return scan_object(s, role, depth);
        break;  /* any other value: an error all the same */
    case ROLE_ERROR_CODE:
        if (c >= '0' && c <= '9') {
            if (!scan_number(s, &number))
                return FALLBACK;
            s->error_code = number;
            return OK;
        }
        break;
    case ROLE_PROMPT_TOKENS: case ROLE_COMPLETION_TOKENS: case ROLE_TOTAL_TOKENS:
        if (c == 'n')
            return scan_literal(s, "null", 4);
        if (!scan_number(s, &number) || number < 0)
            return FALLBACK;
        s->tokens[role - ROLE_PROMPT_TOKENS] = number;
        return OK;
    }
    switch (c) {
    case '{':
        return scan_object(s, ROLE_SKIP, depth);
    case '[':
        return scan_array(s, ROLE_SKIP, depth);
    case '"':
        return scan_string(s, NULL, 0);
    case 't':
        return scan_literal(s, "true", 4);
    case 'f':
        return scan_literal(s, "false", 5);
    case 'n':
        return scan_literal(s, "null", 4);
    default:
        return scan_number(s, &number);
    }
}

static void put_utf8(unsigned char **w, unsigned cp)
{
    unsigned char *o = *w;
    if (cp < 0x80) {
        *o++ = (unsigned char)cp;
    } else if (cp < 0x800) {
        *o++ = (unsigned char)(0xC0 | (cp >> 6));
        *o++ = (unsigned char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *o++ = (unsigned char)(0xE0 | (cp >> 12));
        *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (unsigned char)(0x80 | (cp & 0x3F));
    } else {
        *o++ = (unsigned char)(0xF0 | (cp >> 18));
        *o++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (unsigned char)(0x80 | (cp & 0x3F));
    }
    *w = o;
}

/* Decodes a validated string span in place; returns the decoded length. The writer never
 * overtakes the reader: every escape is at least as long as what it decodes to. */
static size_t decode_in_place(unsigned char *buf, const str_span *span)
{
    unsigned char *r = buf + span->off, *end = r + span->len, *w = r;
    if (!span->escaped)
        return span->len;
    while (r < end) {
        if (*r != '\\') {
            *w++ = *r++;
            continue;
        }
        unsigned char e = r[1];
        r += 2;
        switch (e) {
        case 'b': *w++ = '\b'; break;
        case 'f': *w++ = '\f'; break;
        case 'n': *w++ = '\n'; break;
        case 'r': *w++ = '\r'; break;
        case 't': *w++ = '\t'; break;
        case 'u': {
            unsigned u, lo;
            hex4(r, &u);
            r += 4;
            if (u >= 0xD800 && u <= 0xDBFF) {  /* validated: a low surrogate follows */
                hex4(r + 2, &lo);
                r += 6;
                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(&w, u);
            break;
        }
        default: *w++ = e; break;  /* " \ / */
        }
    }
    return (size_t)(w - (buf + span->off));
}

/* Validates buf as one JSON value whose top level is an object; records the wanted spans. */
static int scan_document(scanner *s, char *buf, size_t len, int chunk)
{
    memset(s, 0, sizeof *s);
    if (!buf || len == 0 || len > UINT32_MAX)
        return FALLBACK;
    s->base = (const unsigned char *)buf;
    s->p = s->base;
    s->end = s->base + len;
    s->chunk = chunk;
    s->error_code = -1;
    skip_ws(s);
    if (!scan_value(s, ROLE_TOP, 0))
        return FALLBACK;
    skip_ws(s);
    return s->p == s->end ? OK : FALLBACK;
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
        out->content_len = (uint32_t)decode_in_place(ubuf, &s.content);
    } else {
        out->content_null = 1;
    }
    if (s.finish.found == 1) {
        out->finish_off = (uint32_t)s.finish.off;
        out->finish_len = (uint32_t)decode_in_place(ubuf, &s.finish);
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
        out->content_len = (uint32_t)decode_in_place(ubuf, &s.content);
    }
    if (s.finish.found == 1) {
        out->has_finish = 1;
        out->finish_off = (uint32_t)s.finish.off;
        out->finish_len = (uint32_t)decode_in_place(ubuf, &s.finish);
    }
    out->has_usage = (uint8_t)s.usage_found;
    out->prompt_tokens = s.tokens[0];
    out->completion_tokens = s.tokens[1];
    out->total_tokens = s.tokens[2];
    return SX_CHAT_PARSED;
}
