/* jsonscan.c — see jsonscan.h. */
#include "jsonscan.h"

#include <string.h>

#define OK SX_JSON_OK
#define FALLBACK SX_JSON_FALLBACK

void sx_json_skip_ws(sx_json_cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

int sx_json_hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned ch = p[i], d;
        if (ch >= '0' && ch <= '9')
            d = ch - '0';
        else if (ch >= 'a' && ch <= 'f')
            d = ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F')
            d = ch - 'A' + 10;
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
    unsigned ch = p[0];
    if (ch >= 0xC2 && ch <= 0xDF) {
        if (end - p < 2 || (p[1] & 0xC0) != 0x80)
            return 0;
        return 2;
    }
    if (ch >= 0xE0 && ch <= 0xEF) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80)
            return 0;
        if (ch == 0xE0 && p[1] < 0xA0)
            return 0;  /* overlong */
        if (ch == 0xED && p[1] >= 0xA0)
            return 0;  /* U+D800..U+DFFF */
        return 3;
    }
    if (ch >= 0xF0 && ch <= 0xF4) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 ||
            (p[3] & 0xC0) != 0x80)
            return 0;
        if (ch == 0xF0 && p[1] < 0x90)
            return 0;  /* overlong */
        if (ch == 0xF4 && p[1] >= 0x90)
            return 0;  /* above U+10FFFF */
        return 4;
    }
    return 0;
}

int sx_json_string(sx_json_cursor *c, sx_json_span *out, int extracted)
{
    const unsigned char *p = c->p + 1, *end = c->end;
    int escaped = 0;
    while (p < end) {
        unsigned ch = *p;
        if (ch == '"') {
            if (out) {
                out->off = (size_t)(c->p + 1 - c->base);
                out->len = (size_t)(p - (c->p + 1));
                out->escaped = escaped;
            }
            c->p = p + 1;
            return OK;
        }
        if (ch == '\\') {
            escaped = 1;
            if (end - p < 2)
                return FALLBACK;
            switch (p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                continue;
            case 'u': {
                unsigned u;
                if (end - p < 6 || !sx_json_hex4(p + 2, &u))
                    return FALLBACK;
                p += 6;
                if (u >= 0xD800 && u <= 0xDBFF) {
                    unsigned lo;
                    if (end - p >= 6 && p[0] == '\\' && p[1] == 'u' && sx_json_hex4(p + 2, &lo) &&
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
        if (ch < 0x20)
            return FALLBACK;  /* json.loads (strict) refuses raw control characters */
        if (ch < 0x80) {
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

/* Long numbers fall back. json.loads turns an integer literal into an int, which refuses
 * more digits than sys.get_int_max_str_digits() allows; that limit can change at run time
 * but never below SX_JSON_INT_DIGITS_SAFE (jsonscan.h), so longer integers are left to
 * json.loads and the two agree under every setting. A fraction or exponent makes a float,
 * which has no such limit; those are only capped so that a scan stays cheap. */
int sx_json_number(sx_json_cursor *c, int64_t *as_int, int *is_int)
{
    const unsigned char *p = c->p, *end = c->end, *start = p;
    int plain = 1, integral = 1;
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
        plain = integral = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return FALLBACK;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        plain = integral = 0;
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
    if (integral && int_end - start > SX_JSON_INT_DIGITS_SAFE + (*start == '-'))
        return FALLBACK;
    *as_int = -1;
    if (plain && int_end - start <= 18) {
        int64_t v = 0;
        for (const unsigned char *q = start; q < int_end; q++)
            v = v * 10 + (*q - '0');
        *as_int = v;
    }
    if (is_int)
        *is_int = integral;
    c->p = p;
    return OK;
}

int sx_json_literal(sx_json_cursor *c, const char *word, size_t n)
{
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0)
        return FALLBACK;
    c->p += n;
    return OK;
}

int sx_json_next(sx_json_cursor *c, char close)
{
    sx_json_skip_ws(c);
    if (c->p >= c->end)
        return -1;
    if (*c->p == ',') {
        c->p++;
        sx_json_skip_ws(c);
        return 1;
    }
    if (*c->p == close) {
        c->p++;
        return 0;
    }
    return -1;
}

static int skip_object(sx_json_cursor *c, int depth)
{
    c->p++;  /* '{' */
    sx_json_skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return OK;
    }
    for (;;) {
        if (c->p >= c->end || *c->p != '"' || !sx_json_string(c, NULL, 0))
            return FALLBACK;
        sx_json_skip_ws(c);
        if (c->p >= c->end || *c->p != ':')
            return FALLBACK;
        c->p++;
        sx_json_skip_ws(c);
        if (!sx_json_skip(c, depth + 1))
            return FALLBACK;
        int more = sx_json_next(c, '}');
        if (more <= 0)
            return more < 0 ? FALLBACK : OK;
    }
}

static int skip_array(sx_json_cursor *c, int depth)
{
    c->p++;  /* '[' */
    sx_json_skip_ws(c);
    if (c->p < c->end && *c->p == ']') {
        c->p++;
        return OK;
    }
    for (;;) {
        if (!sx_json_skip(c, depth + 1))
            return FALLBACK;
        int more = sx_json_next(c, ']');
        if (more <= 0)
            return more < 0 ? FALLBACK : OK;
    }
}

int sx_json_skip(sx_json_cursor *c, int depth)
{
    if (depth > SX_JSON_MAX_DEPTH || c->p >= c->end)
        return FALLBACK;
    int64_t number;
    switch (*c->p) {
    case '{':
        return skip_object(c, depth);
    case '[':
        return skip_array(c, depth);
    case '"':
        return sx_json_string(c, NULL, 0);
    case 't':
        return sx_json_literal(c, "true", 4);
    case 'f':
        return sx_json_literal(c, "false", 5);
    case 'n':
        return sx_json_literal(c, "null", 4);
    default:
        return sx_json_number(c, &number, NULL);
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

size_t sx_json_decode_in_place(unsigned char *buf, const sx_json_span *span)
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
            sx_json_hex4(r, &u);
            r += 4;
            if (u >= 0xD800 && u <= 0xDBFF) {  /* validated: a low surrogate follows */
                sx_json_hex4(r + 2, &lo);
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

size_t sx_json_join_in_place(unsigned char *buf, const sx_json_span *spans, size_t n)
{
    if (n == 0)
        return 0;
    size_t w = spans[0].off;
    for (size_t i = 0; i < n; i++) {
        size_t len = sx_json_decode_in_place(buf, &spans[i]);
        if (w != spans[i].off)
            memmove(buf + w, buf + spans[i].off, len);
        w += len;
    }
    return w - spans[0].off;
}
