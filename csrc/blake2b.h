/* blake2b.h — BLAKE2b (RFC 7693), unkeyed, for the answer cache's keys.
 *
 * The cache keys a request by blake2b-128 of its kind, URL and body (python/semex/cache.py);
 * Python computes them with hashlib, and the hit path computes the same digests here, many
 * at once, so that a fully cached re-run costs no Python call per row. The output must be
 * bit for bit what hashlib.blake2b(data, digest_size=n).digest() gives: the tests compare
 * the two.
 *
 * Usage: sx_blake2b_init(&s, 16); sx_blake2b_update(&s, p, n) any number of times;
 * sx_blake2b_final(&s, out). A state is a plain struct: copying it (s2 = s) forks the hash,
 * which is how one shared prefix is hashed once for many keys. No allocation, no globals,
 * safe from any thread. */
#ifndef SEMEX_BLAKE2B_H
#define SEMEX_BLAKE2B_H

#include <stddef.h>
#include <stdint.h>

#define SX_BLAKE2B_BLOCK 128
#define SX_BLAKE2B_MAX_OUT 64

typedef struct {
    uint64_t h[8];
    uint64_t t[2];                      /* bytes compressed so far (128-bit counter) */
    uint8_t buf[SX_BLAKE2B_BLOCK];      /* the block not compressed yet: the last one is
                                           compressed by final(), flagged as last */
    size_t buflen;
    size_t outlen;
} sx_blake2b;

/* outlen: 1..64 bytes of digest. Returns 0, or -1 for an outlen out of range. */
int sx_blake2b_init(sx_blake2b *s, size_t outlen);
void sx_blake2b_update(sx_blake2b *s, const void *data, size_t len);
/* Writes s->outlen bytes to out; the state is spent afterwards. */
void sx_blake2b_final(sx_blake2b *s, uint8_t *out);

#endif
