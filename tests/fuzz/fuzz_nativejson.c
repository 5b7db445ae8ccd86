/* fuzz_nativejson.c — libFuzzer harness for csrc/nativejson.c (Anthropic and Gemini answers).
 *
 * The first byte picks the reader (even: Anthropic, odd: Gemini); the rest is the body. The
 * same promises as fuzz_chatjson.c: no out-of-bounds access (ASan), no UB (UBSan), spans
 * inside the buffer, strict UTF-8 in what was extracted, a FALLBACK that leaves the buffer
 * untouched. Whether a PARSED answer is exactly what semex's Python reader of that dialect
 * gives is checked by diff_nativejson.py over the corpus (this file built with
 * -DSX_FUZZ_DUMP). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nativejson.h"

#ifndef SX_FUZZ_DUMP
static int valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + len > n)
            return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

static void check(int ok)
{
    if (!ok)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    int dialect = (data[0] & 1) ? SX_DIALECT_GEMINI : SX_DIALECT_ANTHROPIC;
    data++;
    size--;
    /* An exact-size heap copy, so ASan sees any read past the end. */
    char *buf = malloc(size ? size : 1);
    char *orig = malloc(size ? size : 1);
    if (!buf || !orig)
        abort();
    memcpy(buf, data, size);
    memcpy(orig, data, size);
    sx_chat c;
    int r = sx_answer_parse(dialect, buf, size, &c);
    if (r == SX_CHAT_PARSED) {
        check(c.parsed == SX_CHAT_PARSED);
        check((size_t)c.content_off + c.content_len <= size);
        check((size_t)c.finish_off + c.finish_len <= size);
        if (!c.content_null)
            check(valid_utf8((unsigned char *)buf + c.content_off, c.content_len));
        if (!c.finish_null)
            check(valid_utf8((unsigned char *)buf + c.finish_off, c.finish_len));
        check(c.prompt_tokens >= 0 && c.completion_tokens >= 0 && c.total_tokens >= 0);
    } else {
        check(r == SX_CHAT_FALLBACK && c.parsed == SX_CHAT_FALLBACK);
        check(memcmp(buf, orig, size) == 0);
    }
    free(buf);
    free(orig);
    return 0;
}
#else
/* For each file named (its first byte the dialect, as above): one line of JSON,
 * {"parsed": false} or {"parsed": true, "content":
 * <hex or null>, "finish": <hex or null>, "tokens": [p, c, t]}. Hex, because the decoded
 * strings are compared byte for byte with what json.loads gives, encoded as UTF-8. */
static void hex(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++)
        printf("%02x", (unsigned char)s[i]);
    putchar('"');
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            perror(argv[i]);
            return 2;
        }
        size_t cap = 1 << 16, len = 0, n;
        char *buf = malloc(cap);
        while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
            len += n;
            if (len == cap)
                buf = realloc(buf, cap *= 2);
        }
        fclose(f);
        if (!buf)
            return 2;
        sx_chat c;
        int dialect = len && (buf[0] & 1) ? SX_DIALECT_GEMINI : SX_DIALECT_ANTHROPIC;
        char *body = buf + (len ? 1 : 0);
        size_t blen = len ? len - 1 : 0;
        if (sx_answer_parse(dialect, body, blen, &c) != SX_CHAT_PARSED) {
            printf("{\"parsed\": false}\n");
        } else {
            printf("{\"parsed\": true, \"content\": ");
            if (c.content_null)
                printf("null");
            else
                hex(body + c.content_off, c.content_len);
            printf(", \"finish\": ");
            if (c.finish_null)
                printf("null");
            else
                hex(body + c.finish_off, c.finish_len);
            printf(", \"tokens\": [%lld, %lld, %lld]}\n", (long long)c.prompt_tokens,
                   (long long)c.completion_tokens, (long long)c.total_tokens);
        }
        free(buf);
    }
    return 0;
}
#endif
