/* fuzz_rowjson.c — libFuzzer harness for csrc/rowjson.c (sem_extract's answer reader).
 *
 * Checks what the parser promises whatever the bytes: no out-of-bounds access (ASan), no UB
 * (UBSan), every recorded value inside the buffer, string spans that decode (as module_rows.c
 * decodes them, in a copy) to no more bytes than they hold, number literals that are
 * numbers. Whether a PARSED row holds exactly what json.loads + OutputSpec.validate give is
 * checked by diff_rowjson.py over the corpus, through semex._engine.read_rows itself. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "jsonscan.h"
#include "rowjson.h"

static void check(int ok)
{
    if (!ok)
        abort();
}

static const sx_row_key KEYS[] = {
    {"topic", 5}, {"sender", 6}, {"n", 1}, {"results", 7}, {"", 0}, {"topic_quote", 11},
};
#define NKEYS (sizeof KEYS / sizeof KEYS[0])

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    sx_row_value out[NKEYS];
    unsigned char *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    int rc = sx_row_parse(data, size, KEYS, NKEYS, out);
    check(rc == SX_ROW_PARSED || rc == SX_ROW_FALLBACK);
    check(memcmp(copy, data, size) == 0);  /* never writes */
    if (rc == SX_ROW_PARSED) {
        for (size_t k = 0; k < NKEYS; k++) {
            const sx_row_value *v = &out[k];
            check(v->kind <= SX_VAL_FLOAT);
            if (v->kind < SX_VAL_STRING)
                continue;
            check(v->off <= size && v->len <= size - v->off);
            if (v->kind == SX_VAL_STRING) {
                memcpy(copy, data + v->off, v->len);
                sx_json_span span = {0, v->len, v->escaped, 1};
                size_t n = v->escaped ? sx_json_decode_in_place(copy, &span) : v->len;
                check(n <= v->len);
                check(v->escaped || memchr(data + v->off, '\\', v->len) == NULL);
            } else {
                const unsigned char *p = data + v->off;
                check(v->len > 0 && (p[0] == '-' || (p[0] >= '0' && p[0] <= '9')));
                if (v->kind == SX_VAL_INT && v->as_int >= 0)
                    check(p[0] != '-');
            }
        }
    }
    free(copy);
    return 0;
}
