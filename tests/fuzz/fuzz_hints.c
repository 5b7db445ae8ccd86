/* fuzz_hints.c — libFuzzer harness for csrc/hints.c (and sx_backoff).
 *
 * The input is a response's header block: lines separated by "\n" (each may hold any byte,
 * NUL included). Whatever they say, no delay the engine acts on may exceed max_hint_wait or
 * be NaN/negative other than the -1 "none", every parsed field is finite, and sx_backoff
 * never returns more than max(backoff_cap, max_hint_wait). The first input byte picks
 * max_hint_wait, so the cap's edge is exercised too. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hints.h"
#include "ratelimit.h"

static void check(int ok)
{
    if (!ok)
        abort();
}

static void check_delay(double d, double max_wait)
{
    check(d == -1 || (d >= 0 && d <= max_wait));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    static const double waits[] = {0, 0.5, 1, 30, 120, 3600};
    double max_wait = waits[data[0] % (sizeof waits / sizeof waits[0])];
    data++;
    size--;

    sx_hints h;
    sx_hints_reset(&h);
    const double wall = 1700000000.0;
    size_t start = 0;
    for (size_t i = 0; i <= size; i++) {
        if (i < size && data[i] != '\n')
            continue;
        size_t len = i - start;
        /* An exact-size heap copy of the line, so ASan sees any read past its end. */
        char *line = malloc(len ? len : 1);
        if (!line)
            abort();
        memcpy(line, data + start, len);
        sx_hints_feed(&h, line, len, wall);
        double dur = sx_parse_duration(line, len);
        check(dur == -1 || (dur >= 0 && isfinite(dur)));
        free(line);
        start = i + 1;
    }
    /* the whole input as an error body too (Gemini's RetryInfo), in an exact-size copy */
    char *body = malloc(size ? size : 1);
    if (!body)
        abort();
    memcpy(body, data, size);
    sx_hints_feed_body(&h, body, size);
    free(body);
    check(h.reset_input_tokens == -1 || (h.reset_input_tokens >= 0 &&
                                         isfinite(h.reset_input_tokens)));
    check(h.reset_output_tokens == -1 || (h.reset_output_tokens >= 0 &&
                                          isfinite(h.reset_output_tokens)));
    check(h.retry_after == -1 || (h.retry_after >= 0 && isfinite(h.retry_after)));
    check(h.reset_requests == -1 || (h.reset_requests >= 0 && isfinite(h.reset_requests)));
    check(h.reset_tokens == -1 || (h.reset_tokens >= 0 && isfinite(h.reset_tokens)));
    check(h.remaining_requests >= -1 && h.remaining_tokens >= -1);
    check(h.limit_requests >= -1 && h.limit_tokens >= -1);

    double retry = sx_hints_retry_delay(&h, max_wait);
    check_delay(retry, max_wait);
    check_delay(sx_hints_exhausted_delay(&h, 1, max_wait), max_wait);
    check_delay(sx_hints_exhausted_delay(&h, 1e6, max_wait), max_wait);
    double asked = sx_hints_asked_delay(&h);
    check(asked == -1 || (asked >= 0 && isfinite(asked)));

    sx_rng rng;
    sx_rng_seed(&rng, size);
    const double cap = 8.0;
    for (int retry_no = 1; retry_no <= 64; retry_no *= 2) {
        double d = sx_backoff(&rng, retry_no, 0.5, cap, asked, max_wait);
        check(d >= 0 && d <= (cap > max_wait ? cap : max_wait));
    }
    return 0;
}
