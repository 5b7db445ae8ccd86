/* jsonstr.h — a Python str written as the JSON string json.dumps(text, ensure_ascii=False)
 * gives, in UTF-8: '"' + the text with '"', '\\' and the control characters below U+0020
 * escaped as Python's json module escapes them (\" \\ \b \f \n \r \t, else \u00xx in
 * lower-case hex), everything else as its UTF-8 + '"'.
 *
 * Two users need exactly those bytes: request bodies (module_rows.c chat_bodies: lm.py
 * writes a plain prompt's body around its JSON string) and the answer cache's key of a
 * plain-string prompt (module.c prompt_keys: python/semex/cache.py keys a chat request by
 * blake2b-128 over a head and the body's rest, the prompt's JSON string then the closing
 * bytes), so the one writer serves both: the bytes go to `out`, a buffer's append or a
 * hash's update.
 *
 * The text comes as Python holds a str (PEP 393): `n` code points of `width` bytes each
 * (1, 2 or 4), so no UTF-8 copy of it is made. No Python, no allocation. */
#ifndef SEMEX_JSONSTR_H
#define SEMEX_JSONSTR_H

#include <stddef.h>

typedef void (*sx_bytes_out)(void *ctx, const void *bytes, size_t n);

/* Writes the JSON string of the text to out(ctx, ...), in pieces. Returns 0, or -1 (with
 * part of it written) when a code point has no UTF-8 form (a lone surrogate: Python's encode
 * raises there) or the width is not 1, 2 or 4. */
int sx_json_string_write(sx_bytes_out out, void *ctx, int width, const void *units, size_t n);

#endif
