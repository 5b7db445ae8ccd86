/* fill.c - the answer to a chat request with a response_format: a JSON object shaped by
 * its schema, filled from the last user message (rules in main.c's usage()). */
#include "mock.h"

/* ------------------------------------------------------ structured answers */
/*
 * A chat request with response_format json_schema / json_object(+schema) is answered with
 * a JSON object shaped by the schema (see usage() for the rules). Everything works on
 * offsets into the request body: no schema tree is built and nothing is allocated per
 * request (the worker's doc/ans scratch buffers are reused). Depth, $ref hops and the
 * answer's size are bounded; anything unsupported or malformed gives back the echo.
 */

#define SCHEMA_MAX_DEPTH 32           /* nesting of filled values */
#define SCHEMA_MAX_HOPS 16            /* $ref / anyOf steps to resolve one schema */
#define ANSWER_MAX_BYTES (1u << 20)   /* the answer's JSON text, before escaping */
#define NO_NAME SIZE_MAX
#define MAX_ITEM_PROPS 64            /* batch item properties looked up once per request */

enum { K_ERR, K_OBJECT, K_ARRAY, K_STRING, K_INTEGER, K_NUMBER, K_BOOLEAN, K_NULL, K_LITERAL,
       K_ID /* a batch item's integer "id" */ };

typedef struct {
    const char *p;        /* the request body */
    size_t len;
    size_t root;          /* the schema as given (its $defs serve every $ref) */
    buf_t *out;
    size_t out_start;
    size_t doc_len;       /* the document being answered: its byte length and hash */
    char hex[8];
    int bad;
} fill_t;

static void fput(fill_t *f, const char *s, size_t n) {
    if (f->bad) return;
    if (f->out->len - f->out_start + n > ANSWER_MAX_BYTES) {
        f->bad = 1;
        return;
    }
    buf_put(f->out, s, n);
}

static void fputs_(fill_t *f, const char *s) { fput(f, s, strlen(s)); }

static void fputu(fill_t *f, uint64_t v) {
    char tmp[24];
    size_t n;
    const char *text = u64_text(tmp, v, &n);
    fput(f, text, n);
}

static void set_doc(fill_t *f, const char *d, size_t n) {
    uint32_t h = 0x811c9dc5u; /* FNV-1a, 32 bits */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)d[i];
        h *= 0x01000193u;
    }
    for (int i = 7; i >= 0; i--) {
        f->hex[i] = "0123456789abcdef"[h & 15];
        h >>= 4;
    }
    f->doc_len = n;
}

/* "#", "#/$defs/Name" or "#/definitions/Name" (raw p[s, e)) -> the schema it names */
static size_t ref_target(const fill_t *f, size_t s, size_t e) {
    static const char *const prefixes[] = {"#/$defs/", "#/definitions/"};
    if (raw_is(f->p, s, e, "#")) return f->root;
    for (int i = 0; i < 2; i++) {
        size_t n = strlen(prefixes[i]);
        if (e - s > n && memcmp(f->p + s, prefixes[i], n) == 0) {
            size_t defs = obj_get_n(f->p, f->len, f->root, prefixes[i] + 2, n - 3);
            return obj_get_n(f->p, f->len, defs, f->p + s + n, e - s - n);
        }
    }
    return SIZE_MAX;
}

static int is_null_schema(const fill_t *f, size_t s) {
    size_t t = obj_get(f->p, f->len, s, "type");
    return t != SIZE_MAX && raw_is(f->p, t + 1, str_end(f->p, f->len, t), "null");
}

static int type_kind(const char *p, size_t s, size_t e) {
    /* JSON Schema's names, or Gemini's upper-case ones */
    if (raw_is(p, s, e, "object") || raw_is(p, s, e, "OBJECT")) return K_OBJECT;
    if (raw_is(p, s, e, "array") || raw_is(p, s, e, "ARRAY")) return K_ARRAY;
    if (raw_is(p, s, e, "string") || raw_is(p, s, e, "STRING")) return K_STRING;
    if (raw_is(p, s, e, "integer") || raw_is(p, s, e, "INTEGER")) return K_INTEGER;
    if (raw_is(p, s, e, "number") || raw_is(p, s, e, "NUMBER")) return K_NUMBER;
    if (raw_is(p, s, e, "boolean") || raw_is(p, s, e, "BOOLEAN")) return K_BOOLEAN;
    if (raw_is(p, s, e, "null")) return K_NULL;
    return K_ERR;
}

/* The keywords of one schema object that matter here (value offsets, SIZE_MAX if absent). */
typedef struct {
    size_t ref, type, enm, cnst, any, one, all, props, items;
} sinfo_t;

/* A property of a batch item's schema, resolved once per request. */
typedef struct {
    size_t ks, ke; /* its name */
    int kind;
    sinfo_t si;
    size_t lit;
} prop_t;

/* One pass over the members of the schema object at s. 0, or -1 if malformed. */
static int schema_info(const fill_t *f, size_t s, sinfo_t *si) {
    const char *p = f->p;
    si->ref = si->type = si->enm = si->cnst = si->any = si->one = si->all = si->props =
        si->items = SIZE_MAX;
    if (s >= f->len || p[s] != '{') return -1;
    size_t i = s + 1, ks, ke, v;
    int rc;
    while ((rc = obj_next(p, f->len, &i, &ks, &ke, &v)) == 1) {
        size_t *slot = NULL;
        if (raw_is(p, ks, ke, "type")) slot = &si->type;
        else if (raw_is(p, ks, ke, "properties")) slot = &si->props;
        else if (raw_is(p, ks, ke, "items")) slot = &si->items;
        else if (raw_is(p, ks, ke, "$ref")) slot = &si->ref;
        else if (raw_is(p, ks, ke, "anyOf")) slot = &si->any;
        else if (raw_is(p, ks, ke, "enum")) slot = &si->enm;
        else if (raw_is(p, ks, ke, "const")) slot = &si->cnst;
        else if (raw_is(p, ks, ke, "oneOf")) slot = &si->one;
        else if (raw_is(p, ks, ke, "allOf")) slot = &si->all;
        if (slot && *slot == SIZE_MAX) *slot = v;
    }
    return rc == 0 ? 0 : -1;
}

/*
 * What the schema at s asks for, after following $ref and anyOf/oneOf/allOf (their first
 * alternative that is not {"type":"null"}); *si then describes the schema reached. For
 * K_LITERAL *lit is the value to copy (const, or enum's first value). K_ERR: unsupported.
 */
static int schema_kind(const fill_t *f, size_t s, sinfo_t *si, size_t *lit) {
    *lit = 0;
    const char *p = f->p;
    size_t len = f->len;
    for (int hop = 0;; hop++) {
        if (hop > SCHEMA_MAX_HOPS || schema_info(f, s, si) != 0) return K_ERR;
        if (si->ref != SIZE_MAX) {
            size_t re = str_end(p, len, si->ref);
            if (re == SIZE_MAX) return K_ERR;
            s = ref_target(f, si->ref + 1, re);
            continue;
        }
        if (si->type != SIZE_MAX || si->enm != SIZE_MAX || si->cnst != SIZE_MAX) break;
        size_t alts = si->any != SIZE_MAX ? si->any : si->one != SIZE_MAX ? si->one : si->all;
        if (alts == SIZE_MAX) break;
        if (p[alts] != '[') return K_ERR;
        size_t i = alts + 1, v, first = SIZE_MAX, pick = SIZE_MAX;
        int rc;
        while ((rc = arr_next(p, len, &i, &v)) == 1) {
            if (first == SIZE_MAX) first = v;
            if (p[v] == '{' && !is_null_schema(f, v)) {
                pick = v;
                break;
            }
        }
        if (rc < 0 || first == SIZE_MAX) return K_ERR;
        s = pick != SIZE_MAX ? pick : first;
    }
    if (si->cnst != SIZE_MAX) {
        *lit = si->cnst;
        return K_LITERAL;
    }
    if (si->enm != SIZE_MAX) {
        size_t i = si->enm + 1;
        if (p[si->enm] != '[' || arr_next(p, len, &i, lit) != 1) return K_ERR;
        return K_LITERAL;
    }
    size_t v = si->type;
    if (v == SIZE_MAX) {
        if (si->props != SIZE_MAX) return K_OBJECT;
        if (si->items != SIZE_MAX) return K_ARRAY;
        return K_STRING; /* no type information: any value will do */
    }
    if (p[v] == '"') return type_kind(p, v + 1, str_end(p, len, v));
    if (p[v] != '[') return K_ERR;
    size_t i = v + 1, t;
    int saw_null = 0, rc;
    while ((rc = arr_next(p, len, &i, &t)) == 1) {
        int k = type_kind(p, t + 1, str_end(p, len, t));
        if (k == K_ERR) return K_ERR;
        if (k != K_NULL) return k;
        saw_null = 1;
    }
    return rc == 0 && saw_null ? K_NULL : K_ERR;
}

static void fill_value(fill_t *f, size_t s, size_t ks, size_t ke, int depth);
static void fill_kind(fill_t *f, int kind, const sinfo_t *si, size_t lit, size_t ks, size_t ke,
                      int depth);
static void fput_str(fill_t *f, size_t s, size_t e);

/* A JSON value of the request (enum/const), copied member by member so that only
 * well-formed JSON comes out. */
static void fill_literal(fill_t *f, size_t v, int depth) {
    const char *p = f->p;
    size_t e = skip_value(p, f->len, v), i = v + 1, ks, ke, x;
    int rc = 0, n = 0;
    if (depth > SCHEMA_MAX_DEPTH || e <= v) {
        f->bad = 1;
        return;
    }
    switch (p[v]) {
    case '"':
        if (e - v < 2 || p[e - 1] != '"') f->bad = 1;
        fput(f, "\"", 1);
        fput_str(f, v + 1, e - 1);
        fput(f, "\"", 1);
        return;
    case '{':
        fput(f, "{", 1);
        while (!f->bad && (rc = obj_next(p, f->len, &i, &ks, &ke, &x)) == 1) {
            if (n++) fput(f, ",", 1);
            fput(f, "\"", 1);
            fput_str(f, ks, ke);
            fput(f, "\":", 2);
            fill_literal(f, x, depth + 1);
        }
        if (rc < 0) f->bad = 1;
        fput(f, "}", 1);
        return;
    case '[':
        fput(f, "[", 1);
        while (!f->bad && (rc = arr_next(p, f->len, &i, &x)) == 1) {
            if (n++) fput(f, ",", 1);
            fill_literal(f, x, depth + 1);
        }
        if (rc < 0) f->bad = 1;
        fput(f, "]", 1);
        return;
    }
    if (!raw_is(p, v, e, "true") && !raw_is(p, v, e, "false") && !raw_is(p, v, e, "null")) {
        /* a number: [-]digits[.digits][(e|E)[+-]digits] */
        size_t j = v + (p[v] == '-'), d0 = j;
        while (j < e && p[j] >= '0' && p[j] <= '9') j++;
        if (j == d0) f->bad = 1;
        if (j < e && p[j] == '.') {
            size_t d1 = ++j;
            while (j < e && p[j] >= '0' && p[j] <= '9') j++;
            if (j == d1) f->bad = 1;
        }
        if (j < e && (p[j] == 'e' || p[j] == 'E')) {
            j++;
            if (j < e && (p[j] == '+' || p[j] == '-')) j++;
            size_t d2 = j;
            while (j < e && p[j] >= '0' && p[j] <= '9') j++;
            if (j == d2) f->bad = 1;
        }
        if (j != e) f->bad = 1;
    }
    fput(f, p + v, e - v);
}

/* Copies the raw string body p[s, e) (a key or a string literal) if its escapes are valid
 * JSON, so that a garbled request still gets a well-formed answer. */
static void fput_str(fill_t *f, size_t s, size_t e) {
    for (size_t i = s; i < e; i++) {
        unsigned char ch = (unsigned char)f->p[i];
        if (ch < 0x20) f->bad = 1;
        if (ch != '\\') continue;
        ch = (unsigned char)f->p[++i]; /* the closing quote follows a lone backslash: i < e */
        uint32_t u;
        if (ch == 'u' ? hex4(f->p, i + 1, e, &u) != 0 : !memchr("\"\\/bfnrt", ch, 8)) f->bad = 1;
    }
    fput(f, f->p + s, e - s);
}

/* "NAME:HHHHHHHH", NAME = the property p[ks, ke) ("answer" without one) */
static void fill_string(fill_t *f, size_t ks, size_t ke) {
    fput(f, "\"", 1);
    if (ks == NO_NAME) fput(f, "answer", 6);
    else fput_str(f, ks, ke);
    fput(f, ":", 1);
    fput(f, f->hex, 8);
    fput(f, "\"", 1);
}

/* An object with every property of `props` (SIZE_MAX: none), in order; with id >= 0 an
 * integer property "id" gets id. */
static void fill_object(fill_t *f, size_t props, int64_t id, int depth) {
    const char *p = f->p;
    fput(f, "{", 1);
    if (props != SIZE_MAX) {
        if (p[props] != '{') {
            f->bad = 1;
            return;
        }
        size_t i = props + 1, ks, ke, v;
        int rc = 0, n = 0;
        while (!f->bad && (rc = obj_next(p, f->len, &i, &ks, &ke, &v)) == 1) {
            if (n++) fput(f, ",", 1);
            fput(f, "\"", 1);
            fput_str(f, ks, ke);
            fput(f, "\":", 2);
            if (id >= 0 && raw_is(p, ks, ke, "id")) {
                sinfo_t si;
                size_t lit;
                if (schema_kind(f, v, &si, &lit) == K_INTEGER) {
                    fputu(f, (uint64_t)id);
                    continue;
                }
            }
            fill_value(f, v, ks, ke, depth + 1);
        }
        if (rc < 0) f->bad = 1;
    }
    fput(f, "}", 1);
}

/* The value of a schema whose kind is known; p[ks, ke) is the name of its property. */
static void fill_kind(fill_t *f, int kind, const sinfo_t *si, size_t lit, size_t ks, size_t ke,
                      int depth) {
    switch (kind) {
    case K_OBJECT: fill_object(f, si->props, -1, depth); break;
    case K_ARRAY:
        fput(f, "[", 1);
        if (si->items == SIZE_MAX) fill_string(f, ks, ke); /* items of any type */
        else fill_value(f, si->items, ks, ke, depth + 1);
        fput(f, "]", 1);
        break;
    case K_STRING: fill_string(f, ks, ke); break;
    case K_INTEGER: fputu(f, f->doc_len); break;
    case K_NUMBER:
        fputu(f, f->doc_len);
        fput(f, ".0", 2);
        break;
    case K_BOOLEAN: fput(f, "true", 4); break;
    case K_NULL: fput(f, "null", 4); break;
    case K_LITERAL: fill_literal(f, lit, depth); break;
    default: f->bad = 1;
    }
}

/* The value for schema s; p[ks, ke) is the name of the property it belongs to. */
static void fill_value(fill_t *f, size_t s, size_t ks, size_t ke, int depth) {
    if (f->bad) return;
    if (depth > SCHEMA_MAX_DEPTH) {
        f->bad = 1;
        return;
    }
    sinfo_t si;
    size_t lit = 0;
    int kind = schema_kind(f, s, &si, &lit);
    fill_kind(f, kind, &si, lit, ks, ke, depth);
}

/* Text p[s, e) of the last user message: a string content, or the first "text" part of an
 * array content. 1 if found (and the messages array is well-formed). */
int last_user_text(const char *p, size_t len, size_t msgs, size_t *ts, size_t *te) {
    if (msgs >= len || p[msgs] != '[') return 0;
    size_t i = msgs + 1, m;
    int found = 0, rc;
    while ((rc = arr_next(p, len, &i, &m)) == 1) {
        size_t role = obj_get(p, len, m, "role");
        if (role == SIZE_MAX || !raw_is(p, role + 1, str_end(p, len, role), "user")) continue;
        size_t c = obj_get(p, len, m, "content");
        if (c != SIZE_MAX && p[c] == '[') {
            size_t j = c + 1, part, t = SIZE_MAX;
            while (arr_next(p, len, &j, &part) == 1) {
                size_t ty = obj_get(p, len, part, "type");
                if (ty != SIZE_MAX && raw_is(p, ty + 1, str_end(p, len, ty), "text")) {
                    t = obj_get(p, len, part, "text");
                    break;
                }
            }
            c = t;
        }
        size_t ce = c == SIZE_MAX ? SIZE_MAX : str_end(p, len, c);
        if (ce != SIZE_MAX) {
            *ts = c + 1;
            *te = ce;
            found = 1;
        }
    }
    return found && rc == 0;
}

static size_t trim_end(const char *d, size_t s, size_t e) {
    while (e > s && (d[e - 1] == ' ' || d[e - 1] == '\t' || d[e - 1] == '\n' || d[e - 1] == '\r'))
        e--;
    return e;
}

/* The first line at or after line start `from` that is "Document <k>:" (numbered, k of 1-9
 * digits) or, with k == NULL, "Document:"; trailing blanks allowed. Returns 1 with the
 * line's start *hs and the start of the next line *he. */
static int find_doc_line(const char *d, size_t n, size_t from, size_t *hs, size_t *he,
                         uint32_t *k) {
    size_t ls = from;
    while (ls < n) {
        const char *nl = memchr(d + ls, '\n', n - ls);
        size_t le = nl ? (size_t)(nl - d) : n;
        if (d[ls] == 'D') {
            size_t e = trim_end(d, ls, le);
            if (k == NULL) {
                if (e - ls == 9 && memcmp(d + ls, "Document:", 9) == 0) {
                    *hs = ls;
                    *he = nl ? le + 1 : n;
                    return 1;
                }
            } else if (e - ls >= 11 && e - ls <= 19 && memcmp(d + ls, "Document ", 9) == 0 &&
                       d[e - 1] == ':') {
                uint32_t v = 0;
                size_t q = ls + 9;
                while (q < e - 1 && d[q] >= '0' && d[q] <= '9') v = v * 10 + (uint32_t)(d[q++] - '0');
                if (q == e - 1) {
                    *hs = ls;
                    *he = nl ? le + 1 : n;
                    *k = v;
                    return 1;
                }
            }
        }
        ls = le + 1;
    }
    return 0;
}

/*
 * The structured answer for the request's response_format into w->ans (JSON text, not
 * yet escaped). 0 if the request does not qualify (the caller echoes instead).
 */
int build_structured(worker_t *w, const char *p, size_t len, const scan_t *sc) {
    size_t rf = sc->rf_off, ts = 0, te = 0;
    size_t t = obj_get(p, len, rf, "type"), schema = SIZE_MAX;
    if (t == SIZE_MAX) return 0;
    size_t tend = str_end(p, len, t);
    if (raw_is(p, t + 1, tend, "json_schema")) {
        schema = obj_get(p, len, obj_get(p, len, rf, "json_schema"), "schema");
        if (schema == SIZE_MAX) return 0;
    } else if (raw_is(p, t + 1, tend, "json_object")) {
        schema = obj_get(p, len, rf, "schema");
    } else {
        return 0;
    }
    if (schema != SIZE_MAX && p[schema] != '{') return 0;
    if (!last_user_text(p, len, sc->msgs_off, &ts, &te)) return 0;
    return build_structured_schema(w, p, len, schema, ts, te);
}

int build_structured_schema(worker_t *w, const char *p, size_t len, size_t schema, size_t ts,
                            size_t te) {
    if (schema != SIZE_MAX && p[schema] != '{') return 0;
    if (json_unescape(&w->doc, p, ts, te)) return 0;

    const char *d = w->doc.p;
    size_t n = w->doc.len, hs, he, hs2, he2, ds = 0, de = n;
    uint32_t k = 0, k2 = 0;
    int sections = find_doc_line(d, n, 0, &hs, &he, &k);
    if (sections) { /* the single document is the first section */
        ds = he;
        de = find_doc_line(d, n, he, &hs2, &he2, &k2) ? hs2 : n;
        de = trim_end(d, ds, de);
    } else if (find_doc_line(d, n, 0, &hs, &ds, NULL)) {
        de = trim_end(d, ds, n);
    }
    fill_t f = {.p = p, .len = len, .root = schema, .out = &w->ans};
    w->ans.len = 0;
    set_doc(&f, d + ds, de - ds);
    if (schema == SIZE_MAX) {
        fputs_(&f, "{\"answer\":\"answer:");
        fput(&f, f.hex, 8);
        fputs_(&f, "\"}");
        return !f.bad;
    }

    /* the batch shape: an object with an array property whose items are objects */
    sinfo_t si;
    size_t lit, props = SIZE_MAX, bks = SIZE_MAX, items = SIZE_MAX;
    if (sections && schema_kind(&f, schema, &si, &lit) == K_OBJECT &&
        (props = si.props) != SIZE_MAX && p[props] == '{') {
        size_t i = props + 1, ks, ke, v;
        while (bks == SIZE_MAX && obj_next(p, len, &i, &ks, &ke, &v) == 1) {
            if (schema_kind(&f, v, &si, &lit) != K_ARRAY || si.items == SIZE_MAX) continue;
            if (schema_kind(&f, si.items, &si, &lit) == K_OBJECT) {
                bks = ks;
                items = si.props;
            }
        }
    }
    if (bks == SIZE_MAX) {
        fill_value(&f, schema, NO_NAME, NO_NAME, 0);
        return !f.bad;
    }
    fput(&f, "{", 1);
    size_t i = props + 1, ks, ke, v;
    int rc = 0, np = 0;
    while (!f.bad && (rc = obj_next(p, len, &i, &ks, &ke, &v)) == 1) {
        if (np++) fput(&f, ",", 1);
        fput(&f, "\"", 1);
        fput_str(&f, ks, ke);
        fput(&f, "\":", 2);
        if (ks != bks) {
            fill_value(&f, v, ks, ke, 1);
            continue;
        }
        fput(&f, "[", 1);
        /* the item's properties, looked up once for all sections */
        prop_t ip[MAX_ITEM_PROPS];
        size_t nip = 0, j = items == SIZE_MAX ? SIZE_MAX : items + 1, iks, ike, iv;
        int irc = 0;
        if (items != SIZE_MAX && p[items] != '{') irc = -1;
        while (j != SIZE_MAX && irc == 0 && (irc = obj_next(p, len, &j, &iks, &ike, &iv)) == 1) {
            irc = 0;
            if (nip == MAX_ITEM_PROPS) {
                irc = 1; /* too many: the general path, per section */
                break;
            }
            prop_t *q = &ip[nip++];
            q->ks = iks;
            q->ke = ike;
            q->kind = schema_kind(&f, iv, &q->si, &q->lit);
            if (q->kind == K_INTEGER && raw_is(p, iks, ike, "id")) q->kind = K_ID;
        }
        if (irc < 0) f.bad = 1;
        size_t sec = he; /* the current section's text starts here; k is its number */
        for (int m = 0;; m++) {
            size_t nx_hs = n, nx_he = n;
            uint32_t nx_k = 0;
            int more = find_doc_line(d, n, sec, &nx_hs, &nx_he, &nx_k);
            if (m) fput(&f, ",", 1);
            set_doc(&f, d + sec, trim_end(d, sec, more ? nx_hs : n) - sec);
            if (irc) {
                fill_object(&f, items, k, 2);
            } else {
                fput(&f, "{", 1);
                for (size_t q = 0; q < nip && !f.bad; q++) {
                    if (q) fput(&f, ",", 1);
                    fput(&f, "\"", 1);
                    fput_str(&f, ip[q].ks, ip[q].ke);
                    fput(&f, "\":", 2);
                    if (ip[q].kind == K_ID) fputu(&f, k);
                    else fill_kind(&f, ip[q].kind, &ip[q].si, ip[q].lit, ip[q].ks, ip[q].ke, 3);
                }
                fput(&f, "}", 1);
            }
            if (!more || f.bad) break;
            sec = nx_he;
            k = nx_k;
        }
        fput(&f, "]", 1);
        set_doc(&f, d + ds, de - ds);
    }
    if (rc < 0) f.bad = 1;
    fput(&f, "}", 1);
    return !f.bad;
}

