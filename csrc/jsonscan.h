/* jsonscan.h — validating JSON scanning pieces shared by the answer readers (chatjson.c,
 * embedjson.c).
 *
 * Each reader walks one provider answer in a single recursive-descent pass and extracts a
 * few fields; these are the pieces that do not depend on which fields: whitespace, strings,
 * numbers, literals, member separators, and skipping a whole value. Every piece validates
 * exactly what json.loads (strict) accepts and answers SX_JSON_FALLBACK for anything else,
 * so a reader built from them either reproduces json.loads or hands the body back to it.
 * Strings must be strict UTF-8 with no raw control characters; numbers follow RFC 8259 and
 * are at most 4,000 characters long.
 *
 * The cursor never reads outside [base, end). No allocation; thread-safe (no shared state). */
#ifndef SEMEX_JSONSCAN_H
#define SEMEX_JSONSCAN_H

#include <stddef.h>
#include <stdint.h>

#define SX_JSON_MAX_DEPTH 64

/* Any return of FALLBACK from a scanning piece ends the whole parse. */
enum { SX_JSON_FALLBACK = 0, SX_JSON_OK = 1 };

typedef struct sx_json_cursor {
    const unsigned char *base, *p, *end;
} sx_json_cursor;

/* The raw (still escaped) bytes between a string's quotes. */
typedef struct sx_json_span {
    size_t off, len;   /* offset from base */
    int escaped;       /* the raw bytes contain a backslash escape */
    int found;         /* for readers: 0 not seen, 1 a string, 2 null */
} sx_json_span;

void sx_json_skip_ws(sx_json_cursor *c);

/* Four hex digits at p into *out. */
int sx_json_hex4(const unsigned char *p, unsigned *out);

/* c->p is at the opening quote; on OK it is past the closing one. `extracted` strings
 * (values a reader returns) also refuse lone surrogate escapes, which UTF-8 cannot carry.
 * `out` may be NULL. */
int sx_json_string(sx_json_cursor *c, sx_json_span *out, int extracted);

/* Integer literals with more digits than this fall back to json.loads: CPython's
 * _PY_LONG_MAX_STR_DIGITS_THRESHOLD, the lowest value sys.set_int_max_str_digits accepts
 * besides 0 (no limit), below which int() never refuses. tests/test_hints.py checks the
 * agreement under lowered limits at run time. */
#define SX_JSON_INT_DIGITS_SAFE 640

/* An RFC 8259 number (integers of more than SX_JSON_INT_DIGITS_SAFE digits fall back).
 * *as_int gets its value when it is a plain non-negative integer of at
 * most 18 digits, else -1. `is_int` (may be NULL) is set to 1 when the number has no
 * fraction and no exponent (a negative integer too). */
int sx_json_number(sx_json_cursor *c, int64_t *as_int, int *is_int);

/* The literal `word` (n bytes) at c->p. */
int sx_json_literal(sx_json_cursor *c, const char *word, size_t n);

/* After a member or element: ',' (1: another follows; whitespace after it skipped), the
 * closing bracket (0: done), or anything else (-1: not JSON). */
int sx_json_next(sx_json_cursor *c, char close);

/* Validate and skip any value at c->p, `depth` levels deep (FALLBACK beyond
 * SX_JSON_MAX_DEPTH). */
int sx_json_skip(sx_json_cursor *c, int depth);

/* Decode a validated string span (sx_json_string with extracted=1) in place, at its own
 * offset; returns the decoded length. The writer never overtakes the reader: every escape
 * is at least as long as what it decodes to. */
size_t sx_json_decode_in_place(unsigned char *buf, const sx_json_span *span);

/* Decode spans[0..n) (validated, in buffer order, not overlapping) and write them back to
 * back from spans[0].off: their concatenation. Returns its length. Everything between the
 * first span's start and the last span's end may be overwritten. */
size_t sx_json_join_in_place(unsigned char *buf, const sx_json_span *spans, size_t n);

#endif
