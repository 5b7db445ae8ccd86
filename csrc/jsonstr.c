/* jsonstr.c — see jsonstr.h. Output goes through a small staging buffer; long runs of
 * ASCII that need no escape go to `out` straight from the str's own memory. */
#include "jsonstr.h"

#include <stdint.h>
#include <string.h>

#define STAGE 256
#define DIRECT_RUN 32  /* a run of plain ASCII this long skips the staging buffer */

typedef struct {
    sx_bytes_out out;
    void *ctx;
    uint8_t buf[STAGE];
    size_t len;
} stage;

static inline void stage_flush(stage *st)
{
    if (st->len) {
        st->out(st->ctx, st->buf, st->len);
        st->len = 0;
    }
}

/* Room for the longest piece one code point can write (\u00xx: 6 bytes). */
static inline void stage_room(stage *st)
{
    if (st->len > STAGE - 8)
        stage_flush(st);
}

static inline int plain_ascii(uint32_t c)
{
    return c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
}

/* Writes one code point: escaped, or as UTF-8. -1: no UTF-8 form. */
static inline int put(stage *st, uint32_t c)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t *o;
    stage_room(st);
    o = st->buf + st->len;
    if (c < 0x80) {
        if (plain_ascii(c)) {
            o[0] = (uint8_t)c;
            st->len += 1;
            return 0;
        }
        o[0] = '\\';
        switch (c) {
        case '"': o[1] = '"'; break;
        case '\\': o[1] = '\\'; break;
        case '\b': o[1] = 'b'; break;
        case '\f': o[1] = 'f'; break;
        case '\n': o[1] = 'n'; break;
        case '\r': o[1] = 'r'; break;
        case '\t': o[1] = 't'; break;
        default:
            o[1] = 'u';
            o[2] = '0';
            o[3] = '0';
            o[4] = (uint8_t)hex[(c >> 4) & 0xf];
            o[5] = (uint8_t)hex[c & 0xf];
            st->len += 6;
            return 0;
        }
        st->len += 2;
        return 0;
    }
    if (c < 0x800) {
        o[0] = (uint8_t)(0xC0 | (c >> 6));
        o[1] = (uint8_t)(0x80 | (c & 0x3F));
        st->len += 2;
        return 0;
    }
    if (c < 0x10000) {
        if (c >= 0xD800 && c <= 0xDFFF)
            return -1;
        o[0] = (uint8_t)(0xE0 | (c >> 12));
        o[1] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (c & 0x3F));
        st->len += 3;
        return 0;
    }
    if (c > 0x10FFFF)
        return -1;
    o[0] = (uint8_t)(0xF0 | (c >> 18));
    o[1] = (uint8_t)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
    o[3] = (uint8_t)(0x80 | (c & 0x3F));
    st->len += 4;
    return 0;
}

int sx_json_string_write(sx_bytes_out out, void *ctx, int width, const void *units, size_t n)
{
    stage st;
    st.out = out;
    st.ctx = ctx;
    st.len = 0;
    st.buf[st.len++] = '"';
    if (width == 1) {
        const uint8_t *p = units;
        size_t i = 0;
        while (i < n) {
            size_t run = i;
            while (run < n && plain_ascii(p[run]))
                run++;
            if (run - i >= DIRECT_RUN) {
                stage_flush(&st);
                out(ctx, p + i, run - i);
            } else {
                for (size_t k = i; k < run; k++) {
                    stage_room(&st);
                    st.buf[st.len++] = p[k];
                }
            }
            i = run;
            if (i < n && put(&st, p[i++]) < 0)
                return -1;
        }
    } else if (width == 2) {
        const uint16_t *p = units;
        for (size_t i = 0; i < n; i++)
            if (put(&st, p[i]) < 0)
                return -1;
    } else if (width == 4) {
        const uint32_t *p = units;
        for (size_t i = 0; i < n; i++)
            if (put(&st, p[i]) < 0)
                return -1;
    } else {
        return -1;
    }
    stage_room(&st);
    st.buf[st.len++] = '"';
    stage_flush(&st);
    return 0;
}
