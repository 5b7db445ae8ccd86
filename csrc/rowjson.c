/* rowjson.c — see rowjson.h. */
#include "rowjson.h"
#include "jsonscan.h"

#include <string.h>

int sx_row_parse(const unsigned char *buf, size_t len, const sx_row_key *keys, size_t nkeys,
                 sx_row_value *out)
{
    sx_json_cursor c = {buf, buf, buf + len};
    for (size_t k = 0; k < nkeys; k++)
        out[k].kind = SX_VAL_ABSENT;
    sx_json_skip_ws(&c);
    if (c.p >= c.end || *c.p != '{')
        return SX_ROW_FALLBACK;
    c.p++;
    sx_json_skip_ws(&c);
    if (c.p < c.end && *c.p == '}') {
        c.p++;
    } else {
        for (;;) {
            sx_json_span key;
            if (c.p >= c.end || *c.p != '"' || !sx_json_string(&c, &key, 0) || key.escaped)
                return SX_ROW_FALLBACK;
            sx_json_skip_ws(&c);
            if (c.p >= c.end || *c.p != ':')
                return SX_ROW_FALLBACK;
            c.p++;
            sx_json_skip_ws(&c);
            if (c.p >= c.end)
                return SX_ROW_FALLBACK;
            sx_row_value v = {0, 0, 0, 0, -1};
            const unsigned char *at = c.p;
            switch (*c.p) {
            case '"': {
                sx_json_span s;
                if (!sx_json_string(&c, &s, 1))
                    return SX_ROW_FALLBACK;
                v.kind = SX_VAL_STRING;
                v.escaped = (uint8_t)s.escaped;
                v.off = s.off;
                v.len = s.len;
                break;
            }
            case 't':
                if (!sx_json_literal(&c, "true", 4))
                    return SX_ROW_FALLBACK;
                v.kind = SX_VAL_TRUE;
                break;
            case 'f':
                if (!sx_json_literal(&c, "false", 5))
                    return SX_ROW_FALLBACK;
                v.kind = SX_VAL_FALSE;
                break;
            case 'n':
                if (!sx_json_literal(&c, "null", 4))
                    return SX_ROW_FALLBACK;
                v.kind = SX_VAL_NULL;
                break;
            default: {
                int is_int = 0;
                if (!sx_json_number(&c, &v.as_int, &is_int))
                    return SX_ROW_FALLBACK;  /* objects and arrays end up here too */
                v.kind = is_int ? SX_VAL_INT : SX_VAL_FLOAT;
                v.off = (size_t)(at - buf);
                v.len = (size_t)(c.p - at);
            }
            }
            const char *name = (const char *)buf + key.off;
            for (size_t k = 0; k < nkeys; k++) {
                if (keys[k].len == key.len && memcmp(keys[k].name, name, key.len) == 0) {
                    out[k] = v;  /* a repeated key: the last value wins */
                    break;
                }
            }
            sx_json_skip_ws(&c);
            int more = sx_json_next(&c, '}');
            if (more < 0)
                return SX_ROW_FALLBACK;
            if (more == 0)
                break;
        }
    }
    sx_json_skip_ws(&c);
    return c.p == c.end ? SX_ROW_PARSED : SX_ROW_FALLBACK;
}
