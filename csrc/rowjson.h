/* rowjson.h — reads one extracted row (a model's answer: a flat JSON object) without Python.
 *
 * sem_extract at one document per prompt used to parse every answer with json.loads and
 * validate the resulting dict in Python, several microseconds per row on the thread that
 * also feeds the engine. sx_row_parse checks an answer and records where each wanted
 * column's value is, in one pass; module.c turns those spans into Python values in bulk.
 *
 * Like chatjson.h this is a fast path, not a JSON library: it either answers "parsed, and
 * these are exactly the values json.loads would give for these keys" or SX_ROW_FALLBACK, and
 * then Python reads the answer (tolerating code fences, prose, nested values...). It accepts
 * only: optional JSON whitespace, one object whose member values are all scalars (strings,
 * numbers, true, false, null), optional JSON whitespace, the end. Everything else falls
 * back: nested objects or arrays anywhere (the caller's rules for those live in Python),
 * escaped keys, lone surrogate escapes, raw control characters in strings (Python's lenient
 * decoder takes those), NaN/Infinity, integers of more than SX_JSON_INT_DIGITS_SAFE digits,
 * non-UTF-8 bytes. A repeated key keeps its last value, as json.loads does.
 *
 * Thread-safe; no allocation; never writes to the buffer. */
#ifndef SEMEX_ROWJSON_H
#define SEMEX_ROWJSON_H

#include <stddef.h>
#include <stdint.h>

enum { SX_ROW_FALLBACK = 0, SX_ROW_PARSED = 1 };

typedef enum {
    SX_VAL_ABSENT = 0,  /* the key is not in the object */
    SX_VAL_NULL,
    SX_VAL_TRUE,
    SX_VAL_FALSE,
    SX_VAL_STRING,      /* off/len: the raw bytes between the quotes; escaped if any \ */
    SX_VAL_INT,         /* off/len: the literal; as_int its value when it fits (else -1) */
    SX_VAL_FLOAT,       /* off/len: the literal (a fraction or an exponent) */
} sx_val_kind;

typedef struct sx_row_value {
    uint8_t kind;       /* sx_val_kind */
    uint8_t escaped;
    size_t off, len;
    int64_t as_int;     /* SX_VAL_INT: the value of a non-negative literal of <= 18 digits */
} sx_row_value;

typedef struct sx_row_key {
    const char *name;   /* UTF-8 */
    size_t len;
} sx_row_key;

/* Reads buf[0..len); out[k] describes keys[k]'s value. Returns SX_ROW_PARSED or
 * SX_ROW_FALLBACK (then out is unspecified). */
int sx_row_parse(const unsigned char *buf, size_t len, const sx_row_key *keys, size_t nkeys,
                 sx_row_value *out);

#endif
