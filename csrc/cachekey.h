/* cachekey.h — the answer cache's key of a plain-string prompt, without its request body.
 *
 * python/semex/cache.py keys a chat request by blake2b-128 over a head (kind, URL, the
 * canonical request fields, the body up to the prompt) and the rest of the body: the prompt
 * as a JSON string, then the body's closing bytes. lm.py writes that JSON string with
 * json.dumps(prompt, ensure_ascii=False) and encodes the body as UTF-8, so the bytes hashed
 * here for a prompt must be exactly those: '"' + the text with '"', '\\' and the control
 * characters below U+0020 escaped as Python's json module escapes them (\" \\ \b \f \n
 * \r \t, else \u00xx in lower-case hex), everything else as its UTF-8 + '"'.
 *
 * The text comes as Python holds a str (PEP 393): `n` code points of `width` bytes each
 * (1, 2 or 4), so no UTF-8 copy of it is made. No Python, no allocation. */
#ifndef SEMEX_CACHEKEY_H
#define SEMEX_CACHEKEY_H

#include <stddef.h>

#include "blake2b.h"

/* Feeds the JSON string of the text to `s`. Returns 0, or -1 (with `s` half-fed) when a code
 * point has no UTF-8 form (a lone surrogate: Python's encode raises there) or the width is
 * not 1, 2 or 4. */
int sx_hash_json_string(sx_blake2b *s, int width, const void *units, size_t n);

#endif
