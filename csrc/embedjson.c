/* embedjson.c — see embedjson.h. One pass validates the body; each item's vector is read
 * into scratch space as it is scanned (its index may come after it) and copied to its row
 * when the item closes. */
#include "embedjson.h"
#include "jsonscan.h"

#include <locale.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

enum { OK = SX_JSON_OK, FALLBACK = SX_JSON_FALLBACK };

typedef struct {
    sx_json_cursor c;
    const sx_embed_target *t;
    sx_embed_result *res;
    int saw_data;
} scanner;

/* strtod follows LC_NUMERIC; JSON's decimal point is always '.'. */
static locale_t c_locale;
static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;

static void make_c_locale(void)
{
    c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
}

static const double exact_pow10[23] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

/* Reads the RFC 8259 number at c->p (validating it as jsonscan.h does) into the double
 * nearest to it, in one pass. Clinger's fast path when the digits fit 53 bits and the power
 * of ten is exact (one correctly rounded operation on two exact doubles is the correctly
 * rounded result); strtod otherwise. */
static int read_number(sx_json_cursor *c, double *out)
{
    const unsigned char *start = c->p, *p = start, *end = c->end;
    int neg = 0, digits = 0, exp10 = 0, float_form = 0, slow = 0;
    uint64_t m = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end)
        return FALLBACK;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        for (; p < end && *p >= '0' && *p <= '9'; p++) {
            if (digits < 19)
                m = m * 10 + (uint64_t)(*p - '0');
            else
                slow = 1;
            digits++;
        }
    } else {
        return FALLBACK;
    }
    if (p < end && *p == '.') {
        float_form = 1;
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return FALLBACK;
        for (; p < end && *p >= '0' && *p <= '9'; p++) {
            if (m || *p != '0') {  /* leading zeros of a fraction are not significant */
                if (digits < 19)
                    m = m * 10 + (uint64_t)(*p - '0');
                else
                    slow = 1;
                digits++;
            }
            exp10--;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        float_form = 1;
        p++;
        int eneg = 0, e = 0;
        if (p < end && (*p == '+' || *p == '-'))
            eneg = *p++ == '-';
        if (p >= end || *p < '0' || *p > '9')
            return FALLBACK;
        for (; p < end && *p >= '0' && *p <= '9'; p++) {
            if (e < 100000)
                e = e * 10 + (*p - '0');
            else
                slow = 1;
        }
        exp10 += eneg ? -e : e;
    }
    if (p - start > 4000)
        return FALLBACK;  /* as jsonscan.h: Python refuses such integers */
    if (!float_form && digits > SX_JSON_INT_DIGITS_SAFE)
        return FALLBACK;  /* as jsonscan.h: int() may refuse them, by the run-time limit */
    c->p = p;
    if (!slow && m == 0) {
        /* json.loads reads "-0" as the integer 0: only a float spelling keeps the sign */
        *out = neg && float_form ? -0.0 : 0.0;
        return OK;
    }
    if (!slow && m < (UINT64_C(1) << 53) && exp10 >= -22 && exp10 <= 22) {
        double d = (double)m;
        d = exp10 < 0 ? d / exact_pow10[-exp10] : d * exact_pow10[exp10];
        *out = neg ? -d : d;
        return OK;
    }
    char tmp[4016];  /* numbers are at most 4,000 characters here */
    size_t n = (size_t)(p - start);
    memcpy(tmp, start, n);
    tmp[n] = '\0';  /* the body need not be NUL-terminated */
    pthread_once(&c_locale_once, make_c_locale);
    if (!c_locale)
        return FALLBACK;
    *out = strtod_l(tmp, NULL, c_locale);
    return OK;
}

/* A float vector as an array of numbers into scratch; *count gets its length. */
static int scan_vector(scanner *s, size_t *count)
{
    const sx_embed_target *t = s->t;
    size_t k = 0;
    s->c.p++;  /* '[' */
    sx_json_skip_ws(&s->c);
    if (s->c.p < s->c.end && *s->c.p == ']') {
        s->c.p++;
        *count = 0;
        return OK;
    }
    for (;;) {
        double d;
        if (s->c.p >= s->c.end || !read_number(&s->c, &d))
            return FALLBACK;  /* not a number (null, NaN, a string): json.loads decides */
        if (k < t->dim) {
            /* Below FLT_MAX + half an ulp the conversion rounds to a finite float;
             * at or above it is overflow, which numpy's rules (inf + warning) decide. */
            if (!(d > -0x1.ffffffp+127 && d < 0x1.ffffffp+127))
                return FALLBACK;
            t->scratch[k] = (float)d;
        }
        k++;
        int more = sx_json_next(&s->c, ']');
        if (more < 0)
            return FALLBACK;
        if (!more)
            break;
    }
    *count = k;
    return OK;
}

/* base64 digit values; 0x80 marks a byte outside the alphabet ('=' included). */
static const unsigned char b64_digit[256] = {
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x3e, 0x80, 0x80, 0x80, 0x3f,
    0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e,
    0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f, 0x30, 0x31, 0x32, 0x33, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
    0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
};

/* A base64 string of little-endian float32: the bytes between its quotes, validated here. */
static int decode_vector(scanner *s, const sx_json_span *span, size_t *count)
{
    const sx_embed_target *t = s->t;
    const unsigned char *p = s->c.base + span->off;
    size_t len = span->len;
    if (len % 4)
        return FALLBACK;  /* Python's decoder is lenient about these; let it decide */
    size_t pad = 0;
    if (len && p[len - 1] == '=')
        pad = (len >= 2 && p[len - 2] == '=') ? 2 : 1;
    size_t bytes = len / 4 * 3 - pad;
    if (bytes % 4)
        return FALLBACK;
    size_t floats = bytes / 4;
    *count = floats;
    if (floats != t->dim) {  /* the row's error: only check it is base64 */
        for (size_t i = 0; i < len - pad; i++)
            if (b64_digit[p[i]] & 0x80)
                return FALLBACK;
        return OK;
    }
    /* Table lookups, not comparisons: base64 digits are random, so a chain of range
     * tests mispredicts several times per character (it cost 8 ns a byte). */
    unsigned char *w = (unsigned char *)t->scratch;
    size_t full = pad ? len - 4 : len, o = 0;
    for (size_t i = 0; i < full; i += 4) {
        unsigned a = b64_digit[p[i]], b = b64_digit[p[i + 1]], c = b64_digit[p[i + 2]],
                 d = b64_digit[p[i + 3]];
        if ((a | b | c | d) & 0x80)
            return FALLBACK;
        uint32_t v = (a << 18) | (b << 12) | (c << 6) | d;
        w[o] = (unsigned char)(v >> 16);
        w[o + 1] = (unsigned char)(v >> 8);
        w[o + 2] = (unsigned char)v;
        o += 3;
    }
    if (pad) {  /* the last quad: 1 or 2 bytes, then '=' padding */
        const unsigned char *q = p + len - 4;
        unsigned a = b64_digit[q[0]], b = b64_digit[q[1]], c = pad == 1 ? b64_digit[q[2]] : 0;
        if ((a | b | c) & 0x80)
            return FALLBACK;
        uint32_t v = (a << 18) | (b << 12) | (c << 6);
        w[o++] = (unsigned char)(v >> 16);
        if (pad == 1)
            w[o++] = (unsigned char)(v >> 8);
    }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    for (size_t i = 0; i < floats; i++) {
        unsigned char *f = w + 4 * i, x;
        x = f[0]; f[0] = f[3]; f[3] = x;
        x = f[1]; f[1] = f[2]; f[2] = x;
    }
#endif
    return OK;
}

#define KEY_IS(span, lit) \
    ((span).len == sizeof(lit) - 1 && memcmp(s->c.base + (span).off, lit, (span).len) == 0)

/* Scan an object's members; `member` is called at each value with the key's span. */
typedef int (*member_fn)(scanner *s, const sx_json_span *key, unsigned *seen, void *arg,
                         int depth);

static int scan_members(scanner *s, member_fn member, void *arg, unsigned *seen, int depth)
{
    if (depth > SX_JSON_MAX_DEPTH)
        return FALLBACK;
    s->c.p++;  /* '{' */
    sx_json_skip_ws(&s->c);
    if (s->c.p < s->c.end && *s->c.p == '}') {
        s->c.p++;
        return OK;
    }
    for (;;) {
        sx_json_span key;
        if (s->c.p >= s->c.end || *s->c.p != '"' || !sx_json_string(&s->c, &key, 0))
            return FALLBACK;
        if (key.escaped)
            return FALLBACK;  /* could spell a wanted key: not worth decoding */
        sx_json_skip_ws(&s->c);
        if (s->c.p >= s->c.end || *s->c.p != ':')
            return FALLBACK;
        s->c.p++;
        sx_json_skip_ws(&s->c);
        if (s->c.p >= s->c.end || !member(s, &key, seen, arg, depth))
            return FALLBACK;
        int more = sx_json_next(&s->c, '}');
        if (more < 0)
            return FALLBACK;
        if (!more)
            return OK;
    }
}

/* A second extracted key: json.loads keeps the last one, leave that to it. */
#define ONCE(bit)                 \
    do {                          \
        if (*seen & (bit))        \
            return FALLBACK;      \
        *seen |= (bit);           \
    } while (0)

enum { ITEM_INDEX = 1, ITEM_EMBEDDING = 2 };

typedef struct {
    int64_t index;
    size_t count;    /* vector length */
} item_t;

static int item_member(scanner *s, const sx_json_span *key, unsigned *seen, void *arg,
                       int depth)
{
    item_t *item = arg;
    if (KEY_IS(*key, "index")) {
        ONCE(ITEM_INDEX);
        int is_int = 0;
        int64_t v;
        if (!sx_json_number(&s->c, &v, &is_int) || !is_int || v < 0)
            return FALLBACK;  /* not a plain count (a fraction, -0, -1, 10**30): Python */
        item->index = v;
        return OK;
    }
    if (KEY_IS(*key, "embedding")) {
        ONCE(ITEM_EMBEDDING);
        if (*s->c.p == '[')
            return scan_vector(s, &item->count);
        if (*s->c.p == '"') {
            /* Base64 needs no JSON string scan: decode_vector accepts only alphabet bytes,
             * so a backslash, a control or a non-ASCII byte before the first quote is a
             * fallback anyway (and a quote cannot hide behind an escape). */
            const unsigned char *open = s->c.p + 1;
            const unsigned char *close = memchr(open, '"', (size_t)(s->c.end - open));
            if (!close)
                return FALLBACK;
            sx_json_span span = {(size_t)(open - s->c.base), (size_t)(close - open), 0, 1};
            s->c.p = close + 1;
            return decode_vector(s, &span, &item->count);
        }
        return FALLBACK;
    }
    return sx_json_skip(&s->c, depth + 1);
}

static int scan_item(scanner *s, int depth)
{
    const sx_embed_target *t = s->t;
    if (*s->c.p != '{')
        return FALLBACK;
    item_t item = {0, 0};
    unsigned seen = 0;
    if (!scan_members(s, item_member, &item, &seen, depth))
        return FALLBACK;
    if (seen != (ITEM_INDEX | ITEM_EMBEDDING))
        return FALLBACK;  /* Python's reader knows what to say about it */
    s->res->vectors++;
    if ((uint64_t)item.index >= t->n) {
        s->res->out_of_range++;
        return OK;
    }
    size_t k = (size_t)item.index;
    if (t->row_state[k] != SX_EMBED_ROW_MISSING) {
        t->row_state[k] = SX_EMBED_ROW_DUPLICATE;
        return OK;
    }
    if (item.count != t->dim) {
        t->row_state[k] = SX_EMBED_ROW_BAD_LENGTH;
        s->res->bad_length = item.count;
        return OK;
    }
    memcpy(t->out + (size_t)t->rows[k] * t->dim, t->scratch, t->dim * sizeof(float));
    t->row_state[k] = SX_EMBED_ROW_OK;
    return OK;
}

static int scan_data(scanner *s, int depth)
{
    if (*s->c.p != '[')
        return FALLBACK;
    s->c.p++;
    sx_json_skip_ws(&s->c);
    if (s->c.p < s->c.end && *s->c.p == ']') {
        s->c.p++;
        return OK;
    }
    for (;;) {
        if (s->c.p >= s->c.end || !scan_item(s, depth + 1))
            return FALLBACK;
        int more = sx_json_next(&s->c, ']');
        if (more < 0)
            return FALLBACK;
        if (!more)
            return OK;
    }
}

enum { USAGE_PROMPT = 1, USAGE_TOTAL = 2, TOP_DATA = 4, TOP_USAGE = 8 };

static int usage_member(scanner *s, const sx_json_span *key, unsigned *seen, void *arg,
                        int depth)
{
    (void)arg;
    int64_t *slot = NULL;
    if (KEY_IS(*key, "prompt_tokens")) {
        ONCE(USAGE_PROMPT);
        slot = &s->res->prompt_tokens;
    } else if (KEY_IS(*key, "total_tokens")) {
        ONCE(USAGE_TOTAL);
        slot = &s->res->total_tokens;
    } else {
        return sx_json_skip(&s->c, depth + 1);
    }
    if (*s->c.p == 'n')
        return sx_json_literal(&s->c, "null", 4);
    int64_t v;
    if (!sx_json_number(&s->c, &v, NULL) || v < 0)
        return FALLBACK;  /* not a plain count: Python's reader decides */
    *slot = v;
    return OK;
}

static int top_member(scanner *s, const sx_json_span *key, unsigned *seen, void *arg,
                      int depth)
{
    (void)arg;
    if (KEY_IS(*key, "data")) {
        ONCE(TOP_DATA);
        s->saw_data = 1;
        return scan_data(s, depth + 1);
    }
    if (KEY_IS(*key, "usage")) {
        ONCE(TOP_USAGE);
        if (*s->c.p == 'n')
            return sx_json_literal(&s->c, "null", 4);
        if (*s->c.p != '{')
            return FALLBACK;
        unsigned useen = 0;
        return scan_members(s, usage_member, NULL, &useen, depth + 1);
    }
    return sx_json_skip(&s->c, depth + 1);
}

int sx_embed_parse(const char *buf, size_t len, const sx_embed_target *t,
                   sx_embed_result *res)
{
    memset(res, 0, sizeof *res);
    if (!buf || len == 0 || len > UINT32_MAX || !t->dim)
        return SX_EMBED_FALLBACK;
    memset(t->row_state, SX_EMBED_ROW_MISSING, t->n);
    scanner s;
    memset(&s, 0, sizeof s);
    s.c.base = (const unsigned char *)buf;
    s.c.p = s.c.base;
    s.c.end = s.c.base + len;
    s.t = t;
    s.res = res;
    sx_json_skip_ws(&s.c);
    unsigned seen = 0;
    if (s.c.p >= s.c.end || *s.c.p != '{' || !scan_members(&s, top_member, NULL, &seen, 0))
        return SX_EMBED_FALLBACK;
    sx_json_skip_ws(&s.c);
    if (s.c.p != s.c.end || !s.saw_data)
        return SX_EMBED_FALLBACK;
    return SX_EMBED_PARSED;
}
