/* json.c - JSON scanning on offsets into a request body (see mock.h): scan_body finds the
 * keys the routes look at; obj_get/obj_next/arr_next walk objects and arrays; json_unescape
 * and put_escaped turn string bodies into UTF-8 and back. */
#include "mock.h"


/* i: index just after an opening quote. Returns the index of the closing quote. */
size_t scan_string(const char *p, size_t len, size_t i) {
    size_t j = i;
    while (j < len) {
        const char *q = memchr(p + j, '"', len - j);
        if (!q) return SIZE_MAX;
        size_t k = (size_t)(q - p), bs = 0;
        while (k - bs > i && p[k - bs - 1] == '\\') bs++;
        if ((bs & 1) == 0) return k;
        j = k + 1;
    }
    return SIZE_MAX;
}

/* end index of the JSON value starting at i (string, array, object or scalar) */
size_t skip_value(const char *p, size_t len, size_t i) {
    if (i >= len) return len;
    if (p[i] == '"') {
        size_t e = scan_string(p, len, i + 1);
        return e == SIZE_MAX ? len : e + 1;
    }
    if (p[i] == '[' || p[i] == '{') {
        int depth = 0;
        while (i < len) {
            char ch = p[i];
            if (ch == '"') {
                size_t e = scan_string(p, len, i + 1);
                if (e == SIZE_MAX) return len;
                i = e + 1;
                continue;
            }
            if (ch == '[' || ch == '{') depth++;
            else if (ch == ']' || ch == '}') {
                if (--depth == 0) return i + 1;
            }
            i++;
        }
        return len;
    }
    while (i < len && p[i] != ',' && p[i] != ']' && p[i] != '}' && p[i] != ' ' &&
           p[i] != '\n' && p[i] != '\r' && p[i] != '\t')
        i++;
    return i;
}

/* Walks string tokens only, so quotes inside string values never confuse it. */
void scan_body(const char *p, size_t len, scan_t *out) {
    memset(out, 0, sizeof *out);
    out->input_off = out->rf_off = out->msgs_off = SIZE_MAX;
    size_t i = 0;
    while (i < len) {
        const char *q = memchr(p + i, '"', len - i);
        if (!q) break;
        size_t s = (size_t)(q - p) + 1;
        size_t e = scan_string(p, len, s);
        if (e == SIZE_MAX) break;
        size_t k = skip_ws(p, len, e + 1);
        if (k >= len || p[k] != ':') {
            i = e + 1;
            continue;
        }
        k = skip_ws(p, len, k + 1);
        size_t klen = e - s;
        const char *key = p + s;
        if (k < len && p[k] == '"' &&
            ((klen == 7 && memcmp(key, "content", 7) == 0) ||
             (klen == 5 && memcmp(key, "model", 5) == 0 && !out->model))) {
            size_t ve = scan_string(p, len, k + 1);
            if (ve == SIZE_MAX) break;
            if (klen == 7) {
                out->content = p + k + 1;
                out->content_len = ve - k - 1;
                out->has_content = 1;
            } else {
                out->model = p + k + 1;
                out->model_len = ve - k - 1;
            }
            i = ve + 1;
            continue;
        }
        if (klen == 5 && memcmp(key, "input", 5) == 0 && out->input_off == SIZE_MAX)
            out->input_off = k;
        if (klen == 15 && memcmp(key, "encoding_format", 15) == 0 && k + 8 <= len &&
            memcmp(p + k, "\"base64\"", 8) == 0)
            out->base64 = 1;
        if (klen == 10 && memcmp(key, "dimensions", 10) == 0) {
            long v = 0;
            size_t d = k;
            while (d < len && p[d] >= '0' && p[d] <= '9' && v <= MAX_EMBED_DIM)
                v = v * 10 + (p[d++] - '0');
            if (d > k && v >= 1 && v <= MAX_EMBED_DIM) out->dimensions = (int)v;
        }
        if (k < len && p[k] == '{' && klen == 15 && out->rf_off == SIZE_MAX &&
            memcmp(key, "response_format", 15) == 0) {
            /* a schema may hold "content"/"model" keys of its own: step over it */
            out->rf_off = k;
            i = skip_value(p, len, k);
            continue;
        }
        if (k + 4 <= len && memcmp(p + k, "true", 4) == 0) {
            if (klen == 6 && memcmp(key, "stream", 6) == 0) out->stream = 1;
            if (klen == 13 && memcmp(key, "include_usage", 13) == 0) out->include_usage = 1;
        }
        if (k < len && p[k] == '[' && klen == 8 && out->msgs_off == SIZE_MAX &&
            memcmp(key, "messages", 8) == 0)
            out->msgs_off = k;
        i = k;
    }
}

/* index of the closing quote of the string value at v, or SIZE_MAX if v is not a string */
size_t str_end(const char *p, size_t len, size_t v) {
    if (v >= len || p[v] != '"') return SIZE_MAX;
    return scan_string(p, len, v + 1);
}

/* The next member of an object; *i is just after '{' or after the previous value.
 * 1: key p[*ks, *ke) (raw, no quotes), value at *v; 0: end of the object; -1: malformed. */
int obj_next(const char *p, size_t len, size_t *i, size_t *ks, size_t *ke, size_t *v) {
    size_t j = skip_ws(p, len, *i);
    if (j < len && p[j] == ',') j = skip_ws(p, len, j + 1);
    if (j >= len) return -1;
    if (p[j] == '}') return 0;
    size_t e = str_end(p, len, j);
    if (e == SIZE_MAX) return -1;
    *ks = j + 1;
    *ke = e;
    j = skip_ws(p, len, e + 1);
    if (j >= len || p[j] != ':') return -1;
    j = skip_ws(p, len, j + 1);
    if (j >= len) return -1;
    size_t ve = skip_value(p, len, j);
    if (ve <= j) return -1;
    *v = j;
    *i = ve;
    return 1;
}

/* The next element of an array; *i is just after '[' or after the previous element. */
int arr_next(const char *p, size_t len, size_t *i, size_t *v) {
    size_t j = skip_ws(p, len, *i);
    if (j < len && p[j] == ',') j = skip_ws(p, len, j + 1);
    if (j >= len) return -1;
    if (p[j] == ']') return 0;
    size_t ve = skip_value(p, len, j);
    if (ve <= j) return -1;
    *v = j;
    *i = ve;
    return 1;
}

/* offset of the value of key p[ks, ke) in the object at obj, or SIZE_MAX */
size_t obj_get_n(const char *p, size_t len, size_t obj, const char *key, size_t klen) {
    if (obj >= len || p[obj] != '{') return SIZE_MAX;
    size_t i = obj + 1, ks, ke, v;
    while (obj_next(p, len, &i, &ks, &ke, &v) == 1)
        if (ke - ks == klen && memcmp(p + ks, key, klen) == 0) return v;
    return SIZE_MAX;
}

size_t obj_get(const char *p, size_t len, size_t obj, const char *key) {
    return obj_get_n(p, len, obj, key, strlen(key));
}

int hex4(const char *p, size_t i, size_t e, uint32_t *out) {
    if (i + 4 > e) return -1;
    uint32_t v = 0;
    for (size_t k = i; k < i + 4; k++) {
        char ch = p[k];
        v <<= 4;
        if (ch >= '0' && ch <= '9') v |= (uint32_t)(ch - '0');
        else if (ch >= 'a' && ch <= 'f') v |= (uint32_t)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F') v |= (uint32_t)(ch - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) { /* a lone surrogate too (as Python's "surrogatepass") */
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* The JSON string body p[s, e) unescaped into b (UTF-8). 0, or -1 on a bad escape. The
 * result is never longer than the escaped text. */
int json_unescape(buf_t *b, const char *p, size_t s, size_t e) {
    b->len = 0;
    buf_reserve(b, e - s + 1);
    char *o = b->p;
    size_t n = 0;
    while (s < e) {
        const char *bs = memchr(p + s, '\\', e - s);
        size_t run = bs ? (size_t)(bs - (p + s)) : e - s;
        memcpy(o + n, p + s, run);
        n += run;
        s += run;
        if (s >= e) break;
        if (s + 1 >= e) return -1;
        char ch = p[s + 1];
        s += 2;
        switch (ch) {
        case '"': case '\\': case '/': o[n++] = ch; break;
        case 'b': o[n++] = '\b'; break;
        case 'f': o[n++] = '\f'; break;
        case 'n': o[n++] = '\n'; break;
        case 'r': o[n++] = '\r'; break;
        case 't': o[n++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (hex4(p, s, e, &cp)) return -1;
            s += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && s + 6 <= e && p[s] == '\\' && p[s + 1] == 'u' &&
                hex4(p, s + 2, e, &lo) == 0 && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                s += 6;
            }
            n += put_utf8(o + n, cp);
            break;
        }
        default: return -1;
        }
    }
    b->len = n;
    return 0;
}


/* JSON text -> the body of a JSON string */
void put_escaped(buf_t *b, const char *s, size_t n) {
    size_t extra = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') extra += 1;
        else if (ch < 0x20) extra += 5;
    }
    buf_reserve(b, n + extra + 1);
    char *o = b->p + b->len;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *o++ = (char)ch;
        } else if (ch >= 0x20) {
            *o++ = '\\';
            *o++ = (char)ch;
        } else {
            memcpy(o, "\\u00", 4);
            o[4] = "0123456789abcdef"[ch >> 4];
            o[5] = "0123456789abcdef"[ch & 15];
            o += 6;
        }
    }
    b->len = (size_t)(o - b->p);
}

