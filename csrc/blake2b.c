/* blake2b.c — see blake2b.h. Written from RFC 7693 (sections 2 and 3): the compression
 * function F with the message schedule SIGMA, 12 rounds, the parameter block reduced to
 * its first word (no key, no salt or personalization, fanout = depth = 1), as hashlib's
 * blake2b(digest_size=n) uses it. */
#include "blake2b.h"

#include <string.h>

static const uint64_t blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, unsigned n)
{
    return (x >> n) | (x << (64 - n));
}

/* Little-endian whatever the host's order is (the RFC's words are little-endian). */
static inline uint64_t load64(const uint8_t *p)
{
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

#define G(a, b, c, d, x, y)                         \
    do {                                            \
        v[a] = v[a] + v[b] + (x);                   \
        v[d] = rotr64(v[d] ^ v[a], 32);             \
        v[c] = v[c] + v[d];                         \
        v[b] = rotr64(v[b] ^ v[c], 24);             \
        v[a] = v[a] + v[b] + (y);                   \
        v[d] = rotr64(v[d] ^ v[a], 16);             \
        v[c] = v[c] + v[d];                         \
        v[b] = rotr64(v[b] ^ v[c], 63);             \
    } while (0)

static void compress(sx_blake2b *s, const uint8_t *block, int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *sg = blake2b_sigma[r];
        G(0, 4, 8, 12, m[sg[0]], m[sg[1]]);
        G(1, 5, 9, 13, m[sg[2]], m[sg[3]]);
        G(2, 6, 10, 14, m[sg[4]], m[sg[5]]);
        G(3, 7, 11, 15, m[sg[6]], m[sg[7]]);
        G(0, 5, 10, 15, m[sg[8]], m[sg[9]]);
        G(1, 6, 11, 12, m[sg[10]], m[sg[11]]);
        G(2, 7, 8, 13, m[sg[12]], m[sg[13]]);
        G(3, 4, 9, 14, m[sg[14]], m[sg[15]]);
    }
    for (int i = 0; i < 8; i++)
        s->h[i] ^= v[i] ^ v[i + 8];
}

static inline void count(sx_blake2b *s, size_t n)
{
    s->t[0] += (uint64_t)n;
    if (s->t[0] < (uint64_t)n)
        s->t[1]++;
}

int sx_blake2b_init(sx_blake2b *s, size_t outlen)
{
    if (outlen < 1 || outlen > SX_BLAKE2B_MAX_OUT)
        return -1;
    memcpy(s->h, blake2b_iv, sizeof s->h);
    s->h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;  /* depth 1, fanout 1, no key */
    s->t[0] = s->t[1] = 0;
    s->buflen = 0;
    s->outlen = outlen;
    return 0;
}

void sx_blake2b_update(sx_blake2b *s, const void *data, size_t len)
{
    const uint8_t *in = data;
    while (len > 0) {
        if (s->buflen == SX_BLAKE2B_BLOCK) {  /* more follows: this block is not the last */
            count(s, SX_BLAKE2B_BLOCK);
            compress(s, s->buf, 0);
            s->buflen = 0;
        }
        if (s->buflen == 0) {
            while (len > SX_BLAKE2B_BLOCK) {  /* whole blocks straight from the input */
                count(s, SX_BLAKE2B_BLOCK);
                compress(s, in, 0);
                in += SX_BLAKE2B_BLOCK;
                len -= SX_BLAKE2B_BLOCK;
            }
        }
        size_t take = SX_BLAKE2B_BLOCK - s->buflen;
        if (take > len)
            take = len;
        memcpy(s->buf + s->buflen, in, take);
        s->buflen += take;
        in += take;
        len -= take;
    }
}

void sx_blake2b_final(sx_blake2b *s, uint8_t *out)
{
    count(s, s->buflen);
    memset(s->buf + s->buflen, 0, SX_BLAKE2B_BLOCK - s->buflen);
    compress(s, s->buf, 1);
    for (size_t i = 0; i < s->outlen; i++)
        out[i] = (uint8_t)(s->h[i / 8] >> (8 * (i % 8)));
}
