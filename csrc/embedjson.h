/* embedjson.h — reads an OpenAI embeddings answer straight into a float32 matrix.
 *
 * An embeddings answer is mostly numbers: 1,536 per input, a hundred inputs per request.
 * Turning each into a Python float (json.loads) and then into a numpy array costs more than
 * the HTTP; this reader writes each vector into the caller's matrix row (numpy memory)
 * without any Python object, so it can run with the GIL released.
 *
 * Like chatjson.h it is a fast path, not a JSON library: it answers "parsed, and exactly
 * what json.loads + numpy.float32 would have produced" or SX_EMBED_FALLBACK, and then Python
 * reads the body with json.loads (and raises its own errors). The whole body is validated
 * (jsonscan.h). Extracted:
 *   data[*].index        a plain integer: input `index` of the request
 *   data[*].embedding    an array of numbers, or a string of base64 little-endian float32
 *                        (encoding_format="base64")
 *   usage.prompt_tokens / total_tokens   non-negative integers, null or absent (0)
 * Numbers convert exactly: float(strtod(x)), which is float32(json.loads(x)) (a correctly
 * rounded double rounded once more to float32; both steps are what Python and numpy do).
 *
 * Each vector goes to the row its `index` names, whatever order the items come in; what is
 * wrong with one item is that input's outcome, not a failed parse:
 *   SX_EMBED_ROW_OK          its vector was written
 *   SX_EMBED_ROW_MISSING     no item named this input (a response with fewer vectors)
 *   SX_EMBED_ROW_DUPLICATE   two items named it (the row's content is unspecified)
 *   SX_EMBED_ROW_BAD_LENGTH  its vector's length is not `dim` (nothing written)
 * Items whose index is outside [0, n) are only counted (out_of_range).
 * Falls back on: no "data" array, an item that is not an object or lacks index/embedding,
 * a non-integer index, an embedding element that is not a number, a number that overflows
 * float32 (|x| >= FLT_MAX + half an ulp), base64 that is escaped, not canonical or not a whole
 * number of floats, duplicate keys on the extracted path, escaped keys on that path,
 * nesting deeper than SX_JSON_MAX_DEPTH, bodies over 4 GiB.
 *
 * A fallback may have written some rows already: the caller rereads that request whole.
 * Thread-safe; no allocation; the body is not modified. */
#ifndef SEMEX_EMBEDJSON_H
#define SEMEX_EMBEDJSON_H

#include <stddef.h>
#include <stdint.h>

enum {
    SX_EMBED_FALLBACK = 0,  /* not handled: let json.loads read the body */
    SX_EMBED_PARSED = 1,
};

enum {
    SX_EMBED_ROW_MISSING = 0,
    SX_EMBED_ROW_OK = 1,
    SX_EMBED_ROW_DUPLICATE = 2,
    SX_EMBED_ROW_BAD_LENGTH = 3,
};

/* Where one request's vectors go. */
typedef struct sx_embed_target {
    float *out;              /* row r is out[r * dim .. r * dim + dim) */
    size_t dim;              /* >= 1 */
    const int64_t *rows;     /* input k of the request -> its row of out (caller checked) */
    size_t n;                /* inputs in the request */
    uint8_t *row_state;      /* n entries, written: SX_EMBED_ROW_* */
    float *scratch;          /* dim floats of working space */
} sx_embed_target;

typedef struct sx_embed_result {
    int64_t prompt_tokens, total_tokens;  /* 0 when absent or null */
    size_t vectors;          /* items in data */
    size_t out_of_range;     /* items whose index is not in [0, n) */
    size_t bad_length;       /* the length of the last vector whose length was not dim */
} sx_embed_result;

/* Reads buf[0..len). Returns SX_EMBED_PARSED (rows written, row_state and *res filled) or
 * SX_EMBED_FALLBACK. */
int sx_embed_parse(const char *buf, size_t len, const sx_embed_target *t,
                   sx_embed_result *res);

#endif
