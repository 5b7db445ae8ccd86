/* test_engine.c — standalone tests of the C engine (no Python).
 *
 * Pure parts (token bucket, AIMD window, backoff, header hints, classification, scheduler)
 * are driven with fake clocks; the engine is driven end to end with real worker threads
 * against a tiny HTTP/1.1 server that lives in this file.
 *
 * Usage: test_engine [name-substring]
 *   SX_TEST_TIMEOUT=<s>  watchdog for the whole run (default 120 s; raise it under valgrind)
 * Prints one line per test and finally "N passed, M failed"; exits non-zero on any failure.
 *
 * Build: see Makefile next to this file (make test | tsan | asan). */
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "engine.h"
#include "hints.h"
#include "nativejson.h"
#include "ratelimit.h"
#include "results.h"
#include "sched.h"
#include "sse.h"
#include "sx_clock.h"

/* ------------------------------------------------------------------ assertions */

static unsigned long g_checks;
static unsigned long g_failures;

#define CHECK(expr)                                                                      \
    do {                                                                                 \
        g_checks++;                                                                      \
        if (!(expr)) {                                                                   \
            g_failures++;                                                                \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr);     \
        }                                                                                \
    } while (0)

/* Like CHECK, but leaves the test function at once (for things later checks depend on). */
#define REQUIRE(expr)                                                                    \
    do {                                                                                 \
        g_checks++;                                                                      \
        if (!(expr)) {                                                                   \
            g_failures++;                                                                \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #expr);   \
            return;                                                                      \
        }                                                                                \
    } while (0)

#define CHECK_NEAR(actual, expected, eps)                                                \
    do {                                                                                 \
        double a_ = (double)(actual), e_ = (double)(expected);                           \
        g_checks++;                                                                      \
        if (!(fabs(a_ - e_) <= (eps))) {                                                 \
            g_failures++;                                                                \
            fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %.9g, expected %s = %.9g "   \
                            "(eps %g)\n",                                                \
                    __FILE__, __LINE__, #actual, a_, #expected, e_, (double)(eps));      \
        }                                                                                \
    } while (0)

#define EPS 1e-9

static double mono_now(void)
{
    return sx_now();
}

static void sleep_s(double s)
{
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ------------------------------------------------------------------ token bucket */

static void test_bucket_unlimited(void)
{
    sx_bucket b;
    sx_bucket_init(&b, 0, 5.0);
    for (int i = 0; i < 10000; i++)
        CHECK(sx_bucket_take(&b, 1e6, 5.0) == 0.0);
    sx_bucket_refund(&b, 1e9);
    CHECK(sx_bucket_take(&b, 1.0, 5.0) == 0.0);

    sx_bucket neg;
    sx_bucket_init(&neg, -10, 0.0);
    CHECK(sx_bucket_take(&neg, 123.0, 0.0) == 0.0);
}

static void test_bucket_rpm_burst_then_paced(void)
{
    const double t0 = 1000.0;
    sx_bucket b;
    sx_bucket_init(&b, 600, t0);    /* 10/s, burst 10 */
    CHECK_NEAR(b.rate, 10.0, EPS);
    CHECK_NEAR(b.capacity, 10.0, EPS);
    CHECK_NEAR(b.tokens, 10.0, EPS);  /* starts full */
    for (int i = 0; i < 10; i++)
        CHECK(sx_bucket_take(&b, 1.0, t0) == 0.0);
    double wait = sx_bucket_take(&b, 1.0, t0);
    CHECK_NEAR(wait, 0.1, 1e-9);
    /* A refused take takes nothing: asking again at once gives the same answer. */
    CHECK_NEAR(sx_bucket_take(&b, 1.0, t0), 0.1, 1e-9);

    /* Paced: one request every ~0.1 s (a hair later, so decimal steps never round short). */
    for (int i = 1; i <= 20; i++) {
        double t = t0 + i * 0.1 + 1e-9;
        CHECK(sx_bucket_take(&b, 1.0, t) == 0.0);
        CHECK_NEAR(sx_bucket_take(&b, 1.0, t), 0.1, 1e-6);
    }

    /* A slow bucket still holds at least one token. */
    sx_bucket slow;
    sx_bucket_init(&slow, 6, t0);   /* 0.1/s */
    CHECK_NEAR(slow.capacity, 1.0, EPS);
    CHECK(sx_bucket_take(&slow, 1.0, t0) == 0.0);
    CHECK_NEAR(sx_bucket_take(&slow, 1.0, t0), 10.0, 1e-9);
}

/* Binary-exact rates and times from here on (8 tokens/s, steps of 1/16 s), so the
 * arithmetic below is exact and the checks can be tight. */
static void test_bucket_continuous_refill(void)
{
    const double t0 = 64.0;
    sx_bucket b;
    sx_bucket_init(&b, 480, t0);    /* 8/s, burst 8 */
    CHECK(sx_bucket_take(&b, 8.0, t0) == 0.0);
    CHECK(b.tokens == 0.0);
    /* Half a token after 1/16 s: not enough for 1, wait another 1/16 s. */
    CHECK(sx_bucket_take(&b, 1.0, t0 + 0.0625) == 0.0625);
    CHECK(b.tokens == 0.5);
    CHECK(sx_bucket_take(&b, 1.0, t0 + 0.125) == 0.0);
    CHECK(b.tokens == 0.0);
    /* 2.5 tokens after another 5/16 s. */
    CHECK(sx_bucket_take(&b, 2.0, t0 + 0.4375) == 0.0);
    CHECK(b.tokens == 0.5);
    CHECK(sx_bucket_take(&b, 1.0, t0 + 0.4375) == 0.0625);
    /* Never more than the capacity, however long it idles. */
    CHECK(sx_bucket_take(&b, 1.0, t0 + 1000.0) == 0.0);
    CHECK(b.tokens == 7.0);
    /* Time going backwards refills nothing and breaks nothing. */
    CHECK(sx_bucket_take(&b, 7.0, t0 + 999.0) == 0.0);
    CHECK(sx_bucket_take(&b, 1.0, t0 + 999.0) > 0.0);
    CHECK(b.tokens == 0.0);
}

static void test_bucket_oversized_and_refund(void)
{
    const double t0 = 16.0;
    sx_bucket b;
    sx_bucket_init(&b, 480, t0);     /* 8/s, capacity 8 */
    /* Not full: an oversized cost waits for a full bucket, not for 20 tokens. */
    CHECK(sx_bucket_take(&b, 1.0, t0) == 0.0);
    CHECK(sx_bucket_take(&b, 20.0, t0) == 0.125);
    CHECK(b.tokens == 7.0);
    /* Full: allowed, leaves the bucket negative. */
    CHECK(sx_bucket_take(&b, 20.0, t0 + 0.125) == 0.0);
    CHECK(b.tokens == -12.0);
    /* The debt is paid before anything else goes out: (1 - -12) / 8 s. */
    CHECK(sx_bucket_take(&b, 1.0, t0 + 0.125) == 1.625);
    CHECK(sx_bucket_take(&b, 1.0, t0 + 1.0) == 0.75);
    CHECK(sx_bucket_take(&b, 1.0, t0 + 1.75) == 0.0);

    /* Refund caps at the capacity. */
    sx_bucket r;
    sx_bucket_init(&r, 600, t0);
    CHECK(sx_bucket_take(&r, 3.0, t0) == 0.0);
    CHECK_NEAR(r.tokens, 7.0, EPS);
    sx_bucket_refund(&r, 2.0);
    CHECK_NEAR(r.tokens, 9.0, EPS);
    sx_bucket_refund(&r, 100.0);
    CHECK_NEAR(r.tokens, r.capacity, EPS);
    /* Refund after an oversized take restores, still capped. */
    CHECK(sx_bucket_take(&r, 30.0, t0) == 0.0);
    CHECK_NEAR(r.tokens, -20.0, EPS);
    sx_bucket_refund(&r, 30.0);
    CHECK_NEAR(r.tokens, 10.0, EPS);
}

/* ------------------------------------------------------------------ AIMD window */

static void test_window_aimd(void)
{
    sx_window w;
    sx_window_init(&w, 16);
    CHECK_NEAR(w.size, 16, EPS);
    CHECK(sx_window_limit(&w) == 16);

    /* Growth at the cap does nothing. */
    sx_window_success(&w);
    CHECK_NEAR(w.size, 16, EPS);

    /* Congestion from request #5 while 10 are admitted: cut to 8. */
    CHECK(sx_window_congestion(&w, 5, 10) == 1);
    CHECK_NEAR(w.size, 8, EPS);
    CHECK(sx_window_limit(&w) == 8);
    /* Another response from the same round (admitted before the cut): no second cut. */
    CHECK(sx_window_congestion(&w, 7, 12) == 0);
    CHECK(sx_window_congestion(&w, 10, 12) == 0);
    CHECK_NEAR(w.size, 8, EPS);
    /* A request admitted after the cut: a new round, cut again. */
    CHECK(sx_window_congestion(&w, 11, 20) == 1);
    CHECK_NEAR(w.size, 4, EPS);
    CHECK(sx_window_congestion(&w, 21, 30) == 1);
    CHECK(sx_window_congestion(&w, 31, 40) == 1);
    CHECK_NEAR(w.size, 1, EPS);
    /* The floor holds. */
    sx_window_congestion(&w, 41, 50);
    sx_window_congestion(&w, 51, 60);
    CHECK_NEAR(w.size, 1, EPS);
    CHECK(sx_window_limit(&w) == 1);

    /* Grows back on successes, monotonically, never above the cap, and reaches it. */
    double prev = w.size;
    int reached = 0;
    for (int i = 0; i < 10000; i++) {
        sx_window_success(&w);
        CHECK(w.size >= prev);
        CHECK(w.size <= w.cap);
        CHECK(sx_window_limit(&w) >= 1);
        prev = w.size;
        if (w.size == w.cap) {
            reached = 1;
            break;
        }
    }
    CHECK(reached);
    CHECK(sx_window_limit(&w) == 16);
    sx_window_success(&w);
    CHECK_NEAR(w.size, 16, EPS);

    /* Below ssthresh: +1 per success (slow start). */
    sx_window s;
    sx_window_init(&s, 100);
    s.size = 2;
    s.ssthresh = 50;
    sx_window_success(&s);
    CHECK_NEAR(s.size, 3, EPS);

    /* A cap below 1 becomes 1; the limit is never below 1. */
    sx_window tiny;
    sx_window_init(&tiny, 0);
    CHECK(sx_window_limit(&tiny) == 1);
    CHECK(sx_window_congestion(&tiny, 1, 1) == 1);
    CHECK(sx_window_limit(&tiny) == 1);
    sx_window frac = tiny;
    frac.size = 0.25;
    CHECK(sx_window_limit(&frac) == 1);
    frac.size = 3.99;
    CHECK(sx_window_limit(&frac) == 3);
}

/* ------------------------------------------------------------------ backoff / rng */

static void test_rng_uniform(void)
{
    sx_rng r;
    sx_rng_seed(&r, 0);    /* seed 0 must still give a working generator */
    CHECK(r.state != 0);
    enum { N = 200000, BINS = 10 };
    int hist[BINS] = {0};
    double sum = 0, lo = 1, hi = 0;
    for (int i = 0; i < N; i++) {
        double u = sx_rng_uniform(&r);
        CHECK(u >= 0.0 && u < 1.0);
        sum += u;
        if (u < lo)
            lo = u;
        if (u > hi)
            hi = u;
        int k = (int)(u * BINS);
        if (k >= 0 && k < BINS)
            hist[k]++;
    }
    CHECK_NEAR(sum / N, 0.5, 0.01);
    CHECK(lo < 0.001);
    CHECK(hi > 0.999);
    for (int k = 0; k < BINS; k++)
        CHECK(hist[k] > N / BINS * 9 / 10 && hist[k] < N / BINS * 11 / 10);

    sx_rng a, b;
    sx_rng_seed(&a, 42);
    sx_rng_seed(&b, 42);
    for (int i = 0; i < 100; i++)
        CHECK(sx_rng_uniform(&a) == sx_rng_uniform(&b));
}

static void test_backoff(void)
{
    sx_rng r;
    sx_rng_seed(&r, 12345);
    const double base = 0.5, cap = 8.0;
    for (int retry = 1; retry <= 12; retry++) {
        double ceiling = base * pow(2.0, retry - 1);
        if (ceiling > cap)
            ceiling = cap;
        double lo = 1e9, hi = -1, sum = 0;
        const int n = 5000;
        for (int i = 0; i < n; i++) {
            double d = sx_backoff(&r, retry, base, cap, -1, 1e9);
            CHECK(d >= 0.0 && d <= ceiling);
            if (d < lo)
                lo = d;
            if (d > hi)
                hi = d;
            sum += d;
        }
        /* Full jitter: spread over the whole range. */
        CHECK(lo < ceiling * 0.01);
        CHECK(hi > ceiling * 0.99);
        CHECK_NEAR(sum / n, ceiling / 2, ceiling * 0.05);
    }
    /* Never below the hint; the hint wins even above the cap (the server asked). */
    for (int i = 0; i < 2000; i++) {
        double d = sx_backoff(&r, 1, base, cap, 0.4, 1e9);
        CHECK(d >= 0.4 && d <= 0.5);
        d = sx_backoff(&r, 3, base, cap, 1.5, 1e9);
        CHECK(d >= 1.5 && d <= 2.0);
        d = sx_backoff(&r, 2, base, cap, 3.0, 1e9);
        CHECK(d == 3.0);
        d = sx_backoff(&r, 30, base, cap, 20.0, 1e9);
        CHECK(d == 20.0);
    }
    /* Huge retry counts stay capped (no overflow to inf/nan). */
    for (int i = 0; i < 1000; i++) {
        double d = sx_backoff(&r, 5000, base, cap, -1, 1e9);
        CHECK(d >= 0.0 && d <= cap);
    }
    /* retry < 1 is treated as the first retry. */
    for (int i = 0; i < 1000; i++) {
        double d = sx_backoff(&r, 0, base, cap, -1, 1e9);
        CHECK(d >= 0.0 && d <= base);
    }
}

/* ------------------------------------------------------------------ header hints */

#define MAXW SX_HINT_WAIT_DEFAULT

static void feed(sx_hints *h, const char *line, double wall_now)
{
    sx_hints_feed(h, line, strlen(line), wall_now);
}

static double dur(const char *s)
{
    return sx_parse_duration(s, strlen(s));
}

static void test_hints_retry_after(void)
{
    const double wall = 1700000000.0;   /* 2023-11-14T22:13:20Z */
    sx_hints h;

    sx_hints_reset(&h);
    CHECK(h.retry_after < 0 && h.reset_requests < 0 && h.reset_tokens < 0);
    CHECK(h.remaining_requests < 0 && h.remaining_tokens < 0);
    CHECK(sx_hints_retry_delay(&h, MAXW) < 0);
    CHECK(sx_hints_exhausted_delay(&h, 1, MAXW) < 0);

    feed(&h, "Retry-After: 7\r\n", wall);
    CHECK_NEAR(h.retry_after, 7.0, EPS);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 7.0, EPS);

    /* HTTP-date 30 s after wall_now. */
    char date[64], line[128];
    time_t when = (time_t)wall + 30;
    struct tm tm;
    gmtime_r(&when, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    snprintf(line, sizeof line, "Retry-After: %s\r\n", date);
    sx_hints_reset(&h);
    feed(&h, line, wall);
    CHECK_NEAR(h.retry_after, 30.0, 1e-6);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 30.0, 1e-6);
    /* A date in the past means now, not a negative delay. */
    sx_hints_reset(&h);
    feed(&h, line, wall + 100);
    CHECK_NEAR(h.retry_after, 0.0, EPS);

    /* retry-after-ms, and its precedence over Retry-After in either order. */
    sx_hints_reset(&h);
    feed(&h, "retry-after-ms: 250\r\n", wall);
    CHECK_NEAR(h.retry_after, 0.25, EPS);
    feed(&h, "Retry-After: 7\r\n", wall);
    CHECK_NEAR(h.retry_after, 0.25, EPS);
    sx_hints_reset(&h);
    feed(&h, "Retry-After: 7\r\n", wall);
    feed(&h, "retry-after-ms: 250\r\n", wall);
    CHECK_NEAR(h.retry_after, 0.25, EPS);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 0.25, EPS);

    /* Case-insensitive names, extra whitespace, bare LF or no line ending at all. */
    sx_hints_reset(&h);
    feed(&h, "RETRY-AFTER:   3  \r\n", wall);
    CHECK_NEAR(h.retry_after, 3.0, EPS);
    sx_hints_reset(&h);
    feed(&h, "rEtRy-AfTeR-Ms:\t1500\n", wall);
    CHECK_NEAR(h.retry_after, 1.5, EPS);
    sx_hints_reset(&h);
    feed(&h, "retry-after: 2", wall);
    CHECK_NEAR(h.retry_after, 2.0, EPS);

    /* The raw line need not be NUL-terminated: only `len` bytes are read. */
    char raw[] = "Retry-After: 4\r\nXXXXXXXX";
    sx_hints_reset(&h);
    sx_hints_feed(&h, raw, strlen("Retry-After: 4\r\n"), wall);
    CHECK_NEAR(h.retry_after, 4.0, EPS);

    /* Garbage does not set a hint; a similar header name is not the header. */
    sx_hints_reset(&h);
    feed(&h, "Retry-After: soon\r\n", wall);
    CHECK(h.retry_after < 0);
    feed(&h, "Retry-After-Seconds: 9\r\n", wall);
    CHECK(h.retry_after < 0);
    feed(&h, "X-Retry-After: 9\r\n", wall);
    CHECK(h.retry_after < 0);
    feed(&h, "Retry-After: -5\r\n", wall);
    CHECK(h.retry_after < 0);
    feed(&h, "no colon here\r\n", wall);
    feed(&h, "\r\n", wall);
    CHECK(h.retry_after < 0);

    /* A new status line resets everything: only the final response counts. */
    sx_hints_reset(&h);
    feed(&h, "Retry-After: 7\r\n", wall);
    feed(&h, "x-ratelimit-remaining-requests: 0\r\n", wall);
    feed(&h, "x-ratelimit-reset-requests: 1s\r\n", wall);
    CHECK(h.retry_after >= 0 && h.remaining_requests == 0 && h.reset_requests >= 0);
    feed(&h, "HTTP/1.1 200 OK\r\n", wall);
    CHECK(h.retry_after < 0);
    CHECK(h.remaining_requests < 0);
    CHECK(h.reset_requests < 0);
    CHECK(sx_hints_retry_delay(&h, MAXW) < 0);
    CHECK(sx_hints_exhausted_delay(&h, 1, MAXW) < 0);
    feed(&h, "Retry-After: 5\r\n", wall);
    feed(&h, "HTTP/2 429\r\n", wall);
    CHECK(h.retry_after < 0);
}

static double rfc(const char *s, double wall)
{
    return sx_parse_rfc3339_delay(s, strlen(s), wall);
}

static void test_hints_anthropic(void)
{
    const double wall = 1700000000.0;   /* 2023-11-14T22:13:20Z */
    CHECK_NEAR(rfc("2023-11-14T22:13:50Z", wall), 30.0, 1e-6);
    CHECK_NEAR(rfc("2023-11-14t22:13:50.250z", wall), 30.25, 1e-6);
    CHECK_NEAR(rfc("2023-11-14T23:13:50+01:00", wall), 30.0, 1e-6);
    CHECK_NEAR(rfc("2023-11-14T21:43:50-00:30", wall), 30.0, 1e-6);
    CHECK_NEAR(rfc("2023-11-14T22:13:00Z", wall), 0.0, 1e-9);   /* past: now */
    CHECK_NEAR(rfc("2024-02-29T00:00:00Z", 1709164800.0), 0.0, 1e-9);  /* a leap day */
    CHECK_NEAR(rfc("2023-11-14T22:13:60Z", wall), 40.0, 1e-6);  /* a leap second */
    const char *bad[] = {
        "2023-11-14 22:13:50Z", "2023-11-14T22:13:50", "2023-11-14T22:13:50+0100",
        "2023-11-14T22:13:50+01", "2023-13-14T22:13:50Z", "2023-02-29T00:00:00Z",
        "2023-11-31T00:00:00Z", "2023-11-14T24:00:00Z", "2023-11-14T22:60:00Z",
        "2023-11-14T22:13:61Z", "2023-11-14T22:13:50.Z", "2023-11-14T22:13:50Zjunk",
        "+2023-11-14T22:13:50Z", "2023-11-14T22:13:50+24:00", "2023-1-14T22:13:50Z",
        "23-11-14T22:13:50Z", "2023-11-14T22:13:5Z", "", "1s", "30",
        "2023-11-14T22:13:50 Z", "2023-11-14T22:13:50\x01Z",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK(rfc(bad[i], wall) < 0);

    sx_hints h;
    sx_hints_reset(&h);
    feed(&h, "anthropic-ratelimit-requests-limit: 50\r\n", wall);
    feed(&h, "anthropic-ratelimit-requests-remaining: 0\r\n", wall);
    feed(&h, "anthropic-ratelimit-requests-reset: 2023-11-14T22:13:32Z\r\n", wall);
    feed(&h, "Anthropic-RateLimit-Tokens-Remaining: 9000\r\n", wall);
    feed(&h, "anthropic-ratelimit-tokens-reset: 2023-11-14T22:13:21Z\r\n", wall);
    CHECK(h.limit_requests == 50 && h.remaining_requests == 0 && h.remaining_tokens == 9000);
    CHECK_NEAR(h.reset_requests, 12.0, 1e-6);
    CHECK_NEAR(h.reset_tokens, 1.0, 1e-6);
    /* the budget is back in 12 s; one request's share of 50 is 12 / 50 s */
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 1, MAXW), 12.0 / 50, 1e-6);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 12.0, 1e-6);
    CHECK(sx_hints_retry_delay(&h, 10.0) < 0);  /* above max_hint_wait: ignored */

    /* Separate input / output token budgets. */
    sx_hints_reset(&h);
    feed(&h, "anthropic-ratelimit-input-tokens-limit: 1000\r\n", wall);
    feed(&h, "anthropic-ratelimit-input-tokens-remaining: 0\r\n", wall);
    feed(&h, "anthropic-ratelimit-input-tokens-reset: 2023-11-14T22:13:30Z\r\n", wall);
    feed(&h, "anthropic-ratelimit-output-tokens-remaining: 5\r\n", wall);
    feed(&h, "anthropic-ratelimit-output-tokens-reset: 2023-11-14T22:14:20Z\r\n", wall);
    CHECK(h.limit_input_tokens == 1000 && h.remaining_input_tokens == 0);
    CHECK(h.remaining_output_tokens == 5);
    CHECK_NEAR(h.reset_output_tokens, 60.0, 1e-6);
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 100, MAXW), 10.0 * 100 / 1000, 1e-6);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 10.0, 1e-6);  /* only input is spent */

    /* Strict grammar: a bad value is no hint; unknown fields and budgets are ignored. */
    sx_hints_reset(&h);
    feed(&h, "anthropic-ratelimit-requests-reset: in 5 seconds\r\n", wall);
    feed(&h, "anthropic-ratelimit-requests-remaining: -1\r\n", wall);
    feed(&h, "anthropic-ratelimit-requests-remaining: 3x\r\n", wall);
    feed(&h, "anthropic-ratelimit-bananas-remaining: 0\r\n", wall);
    feed(&h, "anthropic-ratelimit-requests-resets: 2023-11-14T22:13:32Z\r\n", wall);
    feed(&h, "anthropic-ratelimit-requests: 0\r\n", wall);
    CHECK(h.reset_requests < 0 && h.remaining_requests < 0 && h.limit_requests < 0);
    CHECK(sx_hints_retry_delay(&h, MAXW) < 0);
    /* A hostile date far ahead is capped like any other hint. */
    feed(&h, "anthropic-ratelimit-requests-remaining: 0\r\n", wall);
    feed(&h, "anthropic-ratelimit-requests-reset: 9999-12-31T23:59:59Z\r\n", wall);
    CHECK(h.reset_requests > 1e9);
    CHECK(sx_hints_exhausted_delay(&h, 1, MAXW) < 0);
    CHECK(sx_hints_retry_delay(&h, MAXW) < 0);
    feed(&h, "HTTP/1.1 200 OK\r\n", wall);
    CHECK(h.reset_requests < 0 && h.remaining_input_tokens < 0 && h.reset_output_tokens < 0);
}

static void test_hints_retry_info_body(void)
{
    sx_hints h;
    const char *gemini = "{\"error\":{\"code\":429,\"status\":\"RESOURCE_EXHAUSTED\","
                         "\"details\":[{\"@type\":\"type.googleapis.com/google.rpc.RetryInfo\","
                         "\"retryDelay\": \"37s\"}]}}";
    sx_hints_reset(&h);
    sx_hints_feed_body(&h, gemini, strlen(gemini));
    CHECK_NEAR(h.retry_after, 37.0, EPS);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 37.0, EPS);
    CHECK(sx_hints_retry_delay(&h, 10.0) < 0);  /* capped like any hint */
    sx_hints_reset(&h);
    sx_hints_feed_body(&h, "{\"retryDelay\":\"0.25s\"}", 21);
    CHECK_NEAR(h.retry_after, 0.25, EPS);
    /* a header's hint wins; bad values are no hint */
    sx_hints_reset(&h);
    feed(&h, "Retry-After: 3\r\n", 0);
    sx_hints_feed_body(&h, gemini, strlen(gemini));
    CHECK_NEAR(h.retry_after, 3.0, EPS);
    const char *bad[] = {"{\"retryDelay\":\"37\"}", "{\"retryDelay\":\"-3s\"}",
                         "{\"retryDelay\":\"1e9s\"}", "{\"retryDelay\":\"s\"}",
                         "{\"retryDelay\":37}", "{\"retryDelay\":\"3m\"}", "{\"retryDelay\"",
                         "{\"retryDelay\":\"3s", "{\"xretryDelay\":\"3s\"}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        sx_hints_reset(&h);
        sx_hints_feed_body(&h, bad[i], strlen(bad[i]));
        CHECK(h.retry_after < 0);
    }
    /* only len bytes are read */
    sx_hints_reset(&h);
    sx_hints_feed_body(&h, "{\"retryDelay\":\"4s\"}", 15);
    CHECK(h.retry_after < 0);
}

static void test_hints_durations(void)
{
    CHECK_NEAR(dur("1s"), 1.0, EPS);
    CHECK_NEAR(dur("6m0s"), 360.0, EPS);
    CHECK_NEAR(dur("20ms"), 0.02, EPS);
    CHECK_NEAR(dur("1h2m3.5s"), 3723.5, 1e-9);
    CHECK_NEAR(dur("0.5s"), 0.5, EPS);
    CHECK_NEAR(dur("2"), 2.0, EPS);
    CHECK_NEAR(dur("1m"), 60.0, EPS);
    CHECK_NEAR(dur("1h"), 3600.0, EPS);
    CHECK_NEAR(dur("1.5s"), 1.5, EPS);
    CHECK_NEAR(dur("0s"), 0.0, EPS);
    CHECK(dur("") < 0);
    CHECK(dur("abc") < 0);
    CHECK(dur("1x") < 0);
    CHECK(dur("1m30") < 0);
    CHECK(dur("s") < 0);
    CHECK(dur("-1s") < 0);
    CHECK(dur("1s ") < 0);
    CHECK(dur(".") < 0);
    /* Only `len` bytes are read. */
    CHECK_NEAR(sx_parse_duration("6m0sGARBAGE", 4), 360.0, EPS);
    CHECK(sx_parse_duration("6m0s", 0) < 0);
    /* Absurdly long input is rejected, not overflowed. */
    char longbuf[512];
    memset(longbuf, '1', sizeof longbuf - 2);
    longbuf[sizeof longbuf - 2] = 's';
    longbuf[sizeof longbuf - 1] = '\0';
    CHECK(dur(longbuf) < 0);
}

/* Issue 14 §2b: hints a hostile or broken server sends. None may stall the engine, and a
 * value the header's grammar does not allow is no hint at all. */
static void test_hints_hostile(void)
{
    const double wall = 1700000000.0;
    sx_hints h;

    /* Absurd waits parse (the value is what it is) but are never usable. */
    const char *huge[] = {
        "Retry-After: Fri, 31 Dec 9999 23:59:59 GMT\r\n",
        "x-ratelimit-reset-requests: 99999999h\r\n",
        "retry-after-ms: 99999999999999\r\n",
        "Retry-After: 99999999999999999999\r\n",
        "Retry-After: 121\r\n",
    };
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        sx_hints_reset(&h);
        feed(&h, "x-ratelimit-remaining-requests: 0\r\n", wall);
        feed(&h, huge[i], wall);
        double asked = sx_hints_asked_delay(&h);
        CHECK(asked > MAXW || h.reset_requests < 0);
        CHECK(isfinite(asked));
        CHECK(sx_hints_retry_delay(&h, MAXW) < 0);
        CHECK(sx_hints_exhausted_delay(&h, 1, MAXW) < 0);
        CHECK(sx_hints_retry_delay(&h, 1e300) == asked);
    }
    /* The cap itself, at the edge. */
    CHECK(sx_hint_usable(120.0, 120.0) == 120.0);
    CHECK(sx_hint_usable(120.001, 120.0) < 0);
    CHECK(sx_hint_usable(0.0, 0.0) == 0.0);
    CHECK(sx_hint_usable(-1.0, 120.0) < 0);
    CHECK(sx_hint_usable(NAN, 120.0) < 0);
    CHECK(sx_hint_usable(INFINITY, 120.0) < 0);

    /* Strict grammar: each of these is ignored, not read as its valid prefix. */
    const char *bad[] = {
        "retry-after-ms: 2s\r\n",      /* milliseconds take no unit */
        "retry-after-ms: 1e3\r\n",
        "retry-after-ms: -0\r\n",
        "retry-after-ms: +5\r\n",
        "Retry-After: +5\r\n",
        "Retry-After: -0\r\n",
        "Retry-After: 5s\r\n",
        "Retry-After: 5 6\r\n",
        "Retry-After: 5.\r\n",
        "Retry-After: .5\r\n",
        "Retry-After: 1,5\r\n",
        "Retry-After: 12:00:00\r\n",   /* not an HTTP-date: no day name */
        "Retry-After: 2099\r\n"        /* a number, so read as seconds, capped below */
    };
    for (size_t i = 0; i + 1 < sizeof bad / sizeof bad[0]; i++) {
        sx_hints_reset(&h);
        feed(&h, bad[i], wall);
        CHECK(h.retry_after < 0);
        if (h.retry_after >= 0)
            fprintf(stderr, "  accepted: %s", bad[i]);
    }
    /* An embedded NUL: "5\0garbage" is not 5. */
    static const char nul[] = "Retry-After: 5\0garbage\r\n";
    sx_hints_reset(&h);
    sx_hints_feed(&h, nul, sizeof nul - 1, wall);
    CHECK(h.retry_after < 0);
    static const char nul_ms[] = "retry-after-ms: 5\0\r\n";
    sx_hints_reset(&h);
    sx_hints_feed(&h, nul_ms, sizeof nul_ms - 1, wall);
    CHECK(h.retry_after < 0);
    static const char nul_reset[] = "x-ratelimit-reset-requests: 1s\0\r\n";
    sx_hints_reset(&h);
    sx_hints_feed(&h, nul_reset, sizeof nul_reset - 1, wall);
    CHECK(h.reset_requests < 0);
    /* Counts: digits only. */
    const char *bad_counts[] = {
        "x-ratelimit-remaining-requests: -0\r\n",
        "x-ratelimit-remaining-requests: +0\r\n",
        "x-ratelimit-remaining-requests:  0x0\r\n",
        "x-ratelimit-remaining-requests: 0.0\r\n",
        "x-ratelimit-remaining-requests: 99999999999999999999999\r\n",
    };
    for (size_t i = 0; i < sizeof bad_counts / sizeof bad_counts[0]; i++) {
        sx_hints_reset(&h);
        feed(&h, bad_counts[i], wall);
        CHECK(h.remaining_requests < 0);
    }
    static const char nul_count[] = "x-ratelimit-remaining-requests: 0\0\r\n";
    sx_hints_reset(&h);
    sx_hints_feed(&h, nul_count, sizeof nul_count - 1, wall);
    CHECK(h.remaining_requests < 0);

    /* What the grammar does allow still works. */
    sx_hints_reset(&h);
    feed(&h, "retry-after-ms: 1500.5\r\n", wall);
    CHECK_NEAR(h.retry_after, 1.5005, 1e-9);
    sx_hints_reset(&h);
    feed(&h, "Retry-After: 0\r\n", wall);
    CHECK(h.retry_after == 0.0);
    sx_hints_reset(&h);
    feed(&h, "Retry-After: 1.5\r\n", wall);
    CHECK_NEAR(h.retry_after, 1.5, EPS);
    sx_hints_reset(&h);
    feed(&h, "x-ratelimit-remaining-requests: 0\r\n", wall);
    CHECK(h.remaining_requests == 0);
    sx_hints_reset(&h);
    feed(&h, "Retry-After: 2099\r\n", wall);
    CHECK(h.retry_after == 2099.0 && sx_hints_retry_delay(&h, MAXW) < 0);
}

/* sx_backoff never returns more than max(backoff_cap, max_hint): a hint above the cap is
 * ignored, one below is honoured. */
static void test_backoff_hint_cap(void)
{
    sx_rng r;
    sx_rng_seed(&r, 77);
    for (int i = 0; i < 2000; i++) {
        double d = sx_backoff(&r, 3, 0.5, 8.0, 3e11, MAXW);
        CHECK(d >= 0 && d <= 2.0);
        d = sx_backoff(&r, 40, 0.5, 8.0, 1e300, MAXW);
        CHECK(d >= 0 && d <= 8.0);
        d = sx_backoff(&r, 1, 0.5, 8.0, INFINITY, MAXW);
        CHECK(d >= 0 && d <= 0.5);
        d = sx_backoff(&r, 1, 0.5, 8.0, NAN, MAXW);
        CHECK(d >= 0 && d <= 0.5);
        d = sx_backoff(&r, 1, 0.5, 8.0, 100.0, MAXW);
        CHECK(d == 100.0);
    }
}

static void test_hints_ratelimit_headers(void)
{
    const double wall = 1700000000.0;
    sx_hints h;

    /* remaining-requests 0 with a reset: exhausted, and the retry delay follows it. */
    sx_hints_reset(&h);
    feed(&h, "HTTP/1.1 200 OK\r\n", wall);
    feed(&h, "X-RateLimit-Remaining-Requests: 0\r\n", wall);
    feed(&h, "X-RATELIMIT-RESET-REQUESTS: 6m0s\r\n", wall);
    CHECK(h.remaining_requests == 0);
    CHECK_NEAR(h.reset_requests, 360.0, EPS);
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 1, 3600), 360.0, EPS);
    CHECK_NEAR(sx_hints_retry_delay(&h, 3600), 360.0, EPS);
    /* Above max_hint_wait (the default is 2 minutes) the hint is ignored. */
    CHECK(sx_hints_exhausted_delay(&h, 1, MAXW) < 0);
    CHECK(sx_hints_retry_delay(&h, MAXW) < 0);

    /* remaining 5: not exhausted. */
    sx_hints_reset(&h);
    feed(&h, "x-ratelimit-remaining-requests: 5\r\n", wall);
    feed(&h, "x-ratelimit-reset-requests: 1s\r\n", wall);
    CHECK(h.remaining_requests == 5);
    CHECK(sx_hints_exhausted_delay(&h, 1, MAXW) < 0);
    CHECK(sx_hints_retry_delay(&h, MAXW) < 0);

    /* Tokens exhausted too: the later reset wins. */
    sx_hints_reset(&h);
    feed(&h, "x-ratelimit-remaining-requests: 0\r\n", wall);
    feed(&h, "x-ratelimit-reset-requests: 20ms\r\n", wall);
    feed(&h, "x-ratelimit-remaining-tokens: 0\r\n", wall);
    feed(&h, "x-ratelimit-reset-tokens: 1.5s\r\n", wall);
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 1, MAXW), 1.5, EPS);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 1.5, EPS);

    /* Only the tokens budget is used up. */
    sx_hints_reset(&h);
    feed(&h, "x-ratelimit-remaining-requests: 99\r\n", wall);
    feed(&h, "x-ratelimit-reset-requests: 9s\r\n", wall);
    feed(&h, "x-ratelimit-remaining-tokens: 0\r\n", wall);
    feed(&h, "x-ratelimit-reset-tokens: 20ms\r\n", wall);
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 1, MAXW), 0.02, EPS);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 0.02, EPS);

    /* With the budget's size known, only what the next request needs is waited for: the
     * reset is the time to a full budget, which refills continuously. */
    sx_hints_reset(&h);
    feed(&h, "x-ratelimit-limit-requests: 100\r\n", wall);
    feed(&h, "x-ratelimit-remaining-requests: 0\r\n", wall);
    feed(&h, "x-ratelimit-reset-requests: 1s\r\n", wall);
    CHECK(h.limit_requests == 100);
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 1, MAXW), 0.01, EPS);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 1.0, EPS);  /* a 429 still waits the whole reset */
    feed(&h, "x-ratelimit-limit-tokens: 10000\r\n", wall);
    feed(&h, "x-ratelimit-remaining-tokens: 0\r\n", wall);
    feed(&h, "x-ratelimit-reset-tokens: 6s\r\n", wall);
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 500, MAXW), 0.3, EPS);   /* 500 of 10,000 tokens */
    CHECK_NEAR(sx_hints_exhausted_delay(&h, 50000, MAXW), 6.0, EPS); /* never past the reset */

    /* Without a remaining count a reset is still a retry hint, but not "exhausted". */
    sx_hints_reset(&h);
    feed(&h, "x-ratelimit-reset-requests: 2s\r\n", wall);
    CHECK(sx_hints_exhausted_delay(&h, 1, MAXW) < 0);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 2.0, EPS);

    /* Retry-After beats the resets. */
    feed(&h, "Retry-After: 1\r\n", wall);
    CHECK_NEAR(sx_hints_retry_delay(&h, MAXW), 1.0, EPS);

    /* Non-numeric remaining counts are ignored. */
    sx_hints_reset(&h);
    feed(&h, "x-ratelimit-remaining-requests: lots\r\n", wall);
    CHECK(h.remaining_requests < 0);
    feed(&h, "x-ratelimit-remaining-requests: -3\r\n", wall);
    CHECK(h.remaining_requests < 0);
}

/* ------------------------------------------------------------------ classification */

static void classify(sx_attempt *a, int code, int status, const char *body)
{
    sx_classify(a, code, "", status, body, body ? strlen(body) : 0, 0);
}

static void test_classify(void)
{
    sx_attempt a;

    classify(&a, CURLE_OK, 200, "{}");
    CHECK(a.verdict == SX_V_OK && a.kind == SX_ERR_NONE && a.http_status == 200);
    CHECK(!a.congestion && !a.rate_limited && a.reason[0] == '\0');
    classify(&a, CURLE_OK, 204, NULL);
    CHECK(a.verdict == SX_V_OK);

    classify(&a, CURLE_OK, 401, "{\"error\":\"bad key\"}");
    CHECK(a.verdict == SX_V_ABORT_BATCH && a.kind == SX_ERR_AUTH && a.http_status == 401);
    CHECK(strstr(a.reason, "401") != NULL);
    classify(&a, CURLE_OK, 403, NULL);
    CHECK(a.verdict == SX_V_ABORT_BATCH && a.kind == SX_ERR_AUTH);

    classify(&a, CURLE_OK, 429,
             "{\"error\":{\"type\":\"insufficient_quota\",\"message\":\"no money\"}}");
    CHECK(a.verdict == SX_V_ABORT_BATCH && a.kind == SX_ERR_QUOTA);
    /* The quota marker at the very end of the body. */
    classify(&a, CURLE_OK, 429, "x insufficient_quota");
    CHECK(a.verdict == SX_V_ABORT_BATCH && a.kind == SX_ERR_QUOTA);
    /* Only the first body_len bytes count. */
    sx_classify(&a, CURLE_OK, "", 429, "insufficient_quota", 10, 0);
    CHECK(a.verdict == SX_V_RETRY);

    /* Gemini's wrong key: 400 INVALID_ARGUMENT "API key not valid" stops the batch; other
     * 400s do not. */
    classify(&a, CURLE_OK, 400, "{\"error\":{\"code\":400,\"message\":\"API key not valid. "
             "Please pass a valid API key.\",\"status\":\"INVALID_ARGUMENT\"}}");
    CHECK(a.verdict == SX_V_ABORT_BATCH && a.kind == SX_ERR_AUTH);
    classify(&a, CURLE_OK, 400, "{\"details\":[{\"reason\":\"API_KEY_INVALID\"}]}");
    CHECK(a.verdict == SX_V_ABORT_BATCH && a.kind == SX_ERR_AUTH);
    classify(&a, CURLE_OK, 400, "{\"error\":{\"message\":\"max_tokens: Field required\"}}");
    CHECK(a.verdict == SX_V_FAIL && a.kind == SX_ERR_HTTP);
    classify(&a, CURLE_OK, 429, "API key not valid");
    CHECK(a.verdict == SX_V_RETRY && a.rate_limited);
    /* Anthropic's 529 overloaded_error: retried, and a congestion signal. */
    classify(&a, CURLE_OK, 529, "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}");
    CHECK(a.verdict == SX_V_RETRY && a.congestion && !a.rate_limited);

    classify(&a, CURLE_OK, 429, "{\"error\":\"slow down\"}");
    CHECK(a.verdict == SX_V_RETRY && a.kind == SX_ERR_HTTP);
    CHECK(a.rate_limited == 1 && a.congestion == 1 && a.http_status == 429);
    classify(&a, CURLE_OK, 429, NULL);
    CHECK(a.verdict == SX_V_RETRY && a.rate_limited && a.congestion);

    const int retry_statuses[] = {408, 409, 500, 502, 503, 504};
    for (size_t i = 0; i < sizeof retry_statuses / sizeof *retry_statuses; i++) {
        classify(&a, CURLE_OK, retry_statuses[i], "oops");
        CHECK(a.verdict == SX_V_RETRY && a.kind == SX_ERR_HTTP);
        CHECK(!a.rate_limited && !a.congestion);
        CHECK(a.http_status == retry_statuses[i]);
    }
    const int fail_statuses[] = {400, 404, 422};
    for (size_t i = 0; i < sizeof fail_statuses / sizeof *fail_statuses; i++) {
        classify(&a, CURLE_OK, fail_statuses[i], "bad");
        CHECK(a.verdict == SX_V_FAIL && a.kind == SX_ERR_HTTP);
        CHECK(!a.rate_limited && !a.congestion);
    }

    classify(&a, CURLE_OPERATION_TIMEDOUT, 0, NULL);
    CHECK(a.verdict == SX_V_RETRY && a.kind == SX_ERR_TIMEOUT && a.congestion == 1);
    CHECK(!a.rate_limited);
    sx_classify(&a, CURLE_OPERATION_TIMEDOUT, "Operation timed out after 10 ms", 0, NULL, 0, 0);
    CHECK(strstr(a.reason, "Operation timed out after 10 ms") != NULL);

    const int conn_codes[] = {CURLE_COULDNT_CONNECT, CURLE_PARTIAL_FILE, CURLE_GOT_NOTHING,
                              CURLE_SEND_ERROR, CURLE_RECV_ERROR};
    for (size_t i = 0; i < sizeof conn_codes / sizeof *conn_codes; i++) {
        classify(&a, conn_codes[i], 0, NULL);
        CHECK(a.verdict == SX_V_RETRY && a.kind == SX_ERR_CONNECTION);
        CHECK(!a.congestion && !a.rate_limited);
    }
    /* A transport error wins over whatever status was seen. */
    classify(&a, CURLE_PARTIAL_FILE, 200, "trunc");
    CHECK(a.verdict == SX_V_RETRY && a.kind == SX_ERR_CONNECTION);

    classify(&a, CURLE_URL_MALFORMAT, 0, NULL);
    CHECK(a.verdict == SX_V_FAIL && a.kind == SX_ERR_TRANSPORT);
    CHECK(a.reason[0] != '\0');

    /* Body cap: by the overflow flag (write callback refused) or by libcurl's own check. */
    sx_classify(&a, CURLE_WRITE_ERROR, "", 200, "xxxx", 4, 1);
    CHECK(a.verdict == SX_V_FAIL && a.kind == SX_ERR_BODY_CAP);
    sx_classify(&a, CURLE_OK, "", 200, "xxxx", 4, 1);
    CHECK(a.verdict == SX_V_FAIL && a.kind == SX_ERR_BODY_CAP);
    classify(&a, CURLE_FILESIZE_EXCEEDED, 200, NULL);
    CHECK(a.verdict == SX_V_FAIL && a.kind == SX_ERR_BODY_CAP);
}

/* ------------------------------------------------------------------ scheduler (fake clock) */

#define T0 1024.0   /* binary-exact, so T0 + 0.5 etc. are exact */

static sx_request_opts req_opts(void)
{
    sx_request_opts o;
    memset(&o, 0, sizeof o);
    o.timeout = 10;
    o.connect_timeout = 5;
    o.max_retries = 3;
    o.max_body = 1 << 20;
    o.verify_tls = 1;
    o.backoff_base = 0.5;
    o.backoff_cap = 10;
    o.max_hint_wait = SX_HINT_WAIT_DEFAULT;
    o.notify_each = 0;
    o.max_in_flight = 0;
    return o;
}

static sx_sched_opts sched_opts(int max_in_flight)
{
    sx_sched_opts o;
    memset(&o, 0, sizeof o);
    o.max_in_flight = max_in_flight;
    o.rpm = 0;
    o.tpm = 0;
    o.adaptive = 0;
    o.queue_limit = 100000;
    return o;
}

/* A batch of n bodies "<tag><i>" for the scheduler tests (never sent anywhere). */
static sx_batch *mk_batch(const char *tag, size_t n, const double *tokens,
                          const sx_request_opts *o)
{
    char **bodies = calloc(n ? n : 1, sizeof *bodies);
    size_t *lens = calloc(n ? n : 1, sizeof *lens);
    if (!bodies || !lens) {
        free(bodies);
        free(lens);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        char buf[64];
        int len = snprintf(buf, sizeof buf, "%s%zu", tag, i);
        bodies[i] = strdup(buf);
        lens[i] = (size_t)len;
    }
    sx_batch *b = sx_batch_new("http://127.0.0.1:9/", NULL, 0, (const char *const *)bodies,
                               lens, tokens, n, o);
    for (size_t i = 0; i < n; i++)
        free(bodies[i]);
    free(bodies);
    free(lens);
    return b;
}

static void mk_attempt(sx_attempt *a, int code, int status, const char *const *headers)
{
    sx_classify(a, code, "", status, NULL, 0, 0);
    sx_hints_reset(&a->hints);
    for (size_t i = 0; headers && headers[i]; i++)
        sx_hints_feed(&a->hints, headers[i], strlen(headers[i]), 1700000000.0);
}

/* Report a 200 for a slot at a worker and finish it, as the engine does. */
static void finish_ok(sx_sched *s, sx_slot *slot, sx_rng *rng, double now)
{
    sx_attempt a;
    mk_attempt(&a, CURLE_OK, 200, NULL);
    sx_verdict v = sx_sched_outcome(s, slot, &a, rng, now);
    CHECK(v == SX_V_OK);
    sx_batch_finish_slot(slot, SX_OK, SX_ERR_NONE, 200, NULL, 0, NULL, now);
}

/* Report a retryable 503 for a slot at a worker; returns the verdict. */
static sx_verdict report_503(sx_sched *s, sx_slot *slot, sx_rng *rng, double now,
                             sx_attempt *out)
{
    sx_attempt a;
    mk_attempt(&a, CURLE_OK, 503, NULL);
    sx_verdict v = sx_sched_outcome(s, slot, &a, rng, now);
    if (out)
        *out = a;
    return v;
}

/* The retry heap is a valid min-heap whose positions are recorded in the slots. */
static int heap_ok(const sx_sched *s)
{
    for (size_t i = 0; i < s->heap_len; i++) {
        if (s->heap[i]->heap_pos != i || s->heap[i]->where != SX_AT_RETRY)
            return 0;
        if (i > 0 && s->heap[(i - 1) / 2]->due > s->heap[i]->due)
            return 0;
    }
    return 1;
}

static void test_sched_max_in_flight(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(4);
    sx_sched_init(&s, &so, T0);
    sx_request_opts ro = req_opts();
    sx_rng rng;
    sx_rng_seed(&rng, 1);
    sx_batch *b = mk_batch("a", 10, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    CHECK(s.queued == 10);
    for (size_t i = 0; i < 10; i++)
        CHECK(b->slots[i].where == SX_AT_QUEUE);

    sx_slot *out[32];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 32, T0, &wake);
    CHECK(n == 4);
    for (size_t i = 0; i < n; i++) {
        CHECK(out[i] == &b->slots[i]);
        CHECK(out[i]->where == SX_AT_WORKER);
        CHECK(out[i]->attempts == 1);
        CHECK(out[i]->first_sent == T0);
        CHECK(out[i]->admit_seq == i + 1);
    }
    CHECK(wake == -1);   /* the window is not a time limit */
    CHECK(s.in_flight == 4 && b->in_flight == 4);
    CHECK(s.queued == 6);
    CHECK(s.stats.admitted == 4);

    n = sx_sched_take(&s, out, 32, T0 + 1, &wake);
    CHECK(n == 0);

    finish_ok(&s, &b->slots[0], &rng, T0 + 1);
    CHECK(s.in_flight == 3 && b->in_flight == 3);
    n = sx_sched_take(&s, out, 32, T0 + 1, &wake);
    CHECK(n == 1 && out[0] == &b->slots[4]);

    /* `max` is honoured too. */
    finish_ok(&s, &b->slots[1], &rng, T0 + 2);
    finish_ok(&s, &b->slots[2], &rng, T0 + 2);
    n = sx_sched_take(&s, out, 1, T0 + 2, &wake);
    CHECK(n == 1 && out[0] == &b->slots[5]);
    CHECK(s.in_flight == 3);

    /* max_in_flight < 1 is treated as 1. */
    sx_sched s1;
    sx_sched_opts so1 = sched_opts(0);
    sx_sched_init(&s1, &so1, T0);
    CHECK(sx_sched_window(&s1) == 1);
    sx_sched_destroy(&s1);

    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_batch_cap_and_fifo(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(6);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 2);
    sx_request_opts capped = req_opts();
    capped.max_in_flight = 2;
    sx_request_opts plain = req_opts();
    sx_batch *a = mk_batch("a", 5, NULL, &capped);
    sx_batch *b = mk_batch("b", 5, NULL, &plain);
    REQUIRE(a && b);
    REQUIRE(sx_sched_push_batch(&s, a) == 0);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    CHECK(s.q_head == a && s.q_tail == b);

    sx_slot *out[16];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 16, T0, &wake);
    REQUIRE(n == 6);
    /* a is capped at 2; b behind it still sends, in slot order. */
    CHECK(out[0] == &a->slots[0] && out[1] == &a->slots[1]);
    for (size_t i = 0; i < 4; i++)
        CHECK(out[2 + i] == &b->slots[i]);
    CHECK(a->in_flight == 2 && b->in_flight == 4);
    CHECK(a->next_unsent == 2 && b->next_unsent == 4);
    CHECK(s.queued == 4);

    /* When a drops below its cap, the older batch goes first again. */
    finish_ok(&s, &a->slots[0], &rng, T0);
    n = sx_sched_take(&s, out, 16, T0, &wake);
    CHECK(n == 1 && out[0] == &a->slots[2]);
    /* When b finishes one, a is still at its cap: b sends. */
    finish_ok(&s, &b->slots[0], &rng, T0);
    n = sx_sched_take(&s, out, 16, T0, &wake);
    CHECK(n == 1 && out[0] == &b->slots[4]);
    CHECK(b->in_queue == 0);   /* fully sent: left the queue */
    CHECK(s.q_head == a && s.q_tail == a);
    sx_sched_destroy(&s);

    /* Plain FIFO: two uncapped batches come out oldest batch first, slots in order. */
    sx_sched f;
    sx_sched_opts fo = sched_opts(100);
    sx_sched_init(&f, &fo, T0);
    sx_batch *c = mk_batch("c", 3, NULL, &plain);
    sx_batch *d = mk_batch("d", 4, NULL, &plain);
    REQUIRE(c && d);
    REQUIRE(sx_sched_push_batch(&f, c) == 0);
    REQUIRE(sx_sched_push_batch(&f, d) == 0);
    n = sx_sched_take(&f, out, 16, T0, &wake);
    CHECK(n == 7);
    for (size_t i = 0; i < 3; i++)
        CHECK(out[i] == &c->slots[i]);
    for (size_t i = 0; i < 4; i++)
        CHECK(out[3 + i] == &d->slots[i]);
    CHECK(f.q_head == NULL && f.q_tail == NULL && f.queued == 0);
    CHECK(!c->in_queue && !d->in_queue);
    /* Admission numbers increase in admission order. */
    for (size_t i = 1; i < n; i++)
        CHECK(out[i]->admit_seq == out[i - 1]->admit_seq + 1);
    sx_sched_destroy(&f);

    sx_batch_free(a);
    sx_batch_free(b);
    sx_batch_free(c);
    sx_batch_free(d);
}

/* Windows of one call share its cap: two batches, one cap of 3, never more than 3 out. */
static void test_sched_shared_cap(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 3);
    sx_request_opts capped = req_opts();
    capped.max_in_flight = 3;
    sx_batch *w1 = mk_batch("w1", 2, NULL, &capped);
    sx_batch *w2 = mk_batch("w2", 5, NULL, &capped);
    REQUIRE(w1 && w2);
    sx_batch_share_cap(w2, w1);
    CHECK(w1->cap && w1->cap == w2->cap);
    REQUIRE(sx_sched_push_batch(&s, w1) == 0);
    REQUIRE(sx_sched_push_batch(&s, w2) == 0);
    sx_slot *out[16];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 16, T0, &wake);
    CHECK(n == 3 && w1->cap->in_flight == 3);
    CHECK(out[0] == &w1->slots[0] && out[1] == &w1->slots[1] && out[2] == &w2->slots[0]);
    CHECK(sx_sched_take(&s, out, 16, T0, &wake) == 0);
    /* a completion in either window frees room for the call */
    finish_ok(&s, &w1->slots[0], &rng, T0);
    n = sx_sched_take(&s, out, 16, T0, &wake);
    CHECK(n == 1 && out[0] == &w2->slots[1]);
    CHECK(w1->cap->in_flight == 3);
    sx_sched_destroy(&s);
    /* the cap outlives whichever window is freed first */
    sx_batch_free(w1);
    CHECK(w2->cap->max == 3);
    sx_batch_free(w2);
}

static void test_sched_rpm(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    so.rpm = 600;
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 3);
    sx_request_opts ro = req_opts();
    sx_batch *b = mk_batch("r", 40, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);

    sx_slot *out[64];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 64, T0, &wake);
    CHECK(n == 1);                      /* a tenth of the burst at first (sched.h) */
    CHECK_NEAR(wake, T0 + 0.1, 1e-6);
    wake = -1;
    n = sx_sched_take(&s, out, 64, T0, &wake);
    CHECK(n == 0);
    CHECK_NEAR(wake, T0 + 0.1, 1e-6);
    wake = -1;
    n = sx_sched_take(&s, out, 64, T0 + 0.05, &wake);
    CHECK(n == 0);
    CHECK_NEAR(wake, T0 + 0.1, 1e-6);
    /* wake_at is only lowered, never raised. */
    wake = T0 + 0.01;
    n = sx_sched_take(&s, out, 64, T0 + 0.05, &wake);
    CHECK(n == 0 && wake == T0 + 0.01);
    wake = -1;
    /* (a hair after 0.1 s: 1024.1 - 1024 rounds to just under 0.1) */
    n = sx_sched_take(&s, out, 64, T0 + 0.1 + 1e-6, &wake);
    CHECK(n == 1 && out[0] == &b->slots[1]);
    CHECK_NEAR(wake, T0 + 0.2, 1e-5);
    /* After a long idle the bucket holds one burst, no more. */
    wake = -1;
    n = sx_sched_take(&s, out, 64, T0 + 60, &wake);
    CHECK(n == 10);
    CHECK(s.stats.admitted == 12);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_tpm(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    so.tpm = 7680;   /* 128 tokens/s, burst 128 (binary-exact arithmetic) */
    so.rpm = 480;    /* 8/s, burst 8: must be refunded when tpm blocks */
    sx_sched_init(&s, &so, T0);
    s.rpm.tokens = s.rpm.capacity;   /* as after an idle second (it starts a tenth full) */
    sx_request_opts ro = req_opts();
    const double tokens[] = {64, 64, 64, 16, 300, 1};
    sx_batch *b = mk_batch("t", 6, tokens, &ro);
    REQUIRE(b != NULL);
    CHECK(b->slots[0].tokens == 64 && b->slots[4].tokens == 300);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);

    sx_slot *out[16];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 16, T0, &wake);
    CHECK(n == 2 && out[0] == &b->slots[0] && out[1] == &b->slots[1]);
    CHECK(wake == T0 + 0.5);           /* bucket empty, slot 2 needs 64 */
    CHECK(s.rpm.tokens == 6.0);        /* the refused one took no request token */
    CHECK(s.tpm.tokens == 0.0);

    wake = -1;
    n = sx_sched_take(&s, out, 16, T0 + 0.25, &wake);
    CHECK(n == 0 && wake == T0 + 0.5);

    wake = -1;
    n = sx_sched_take(&s, out, 16, T0 + 0.5, &wake);
    CHECK(n == 1 && out[0] == &b->slots[2]);
    CHECK(wake == T0 + 0.625);         /* slot 3 needs 16 */

    wake = -1;
    n = sx_sched_take(&s, out, 16, T0 + 0.625, &wake);
    CHECK(n == 1 && out[0] == &b->slots[3]);
    /* Slot 4 costs 300 > capacity 128: waits for a full bucket, then goes, leaving debt. */
    CHECK(wake == T0 + 1.625);
    wake = -1;
    n = sx_sched_take(&s, out, 16, T0 + 1.625, &wake);
    CHECK(n == 1 && out[0] == &b->slots[4]);
    CHECK(s.tpm.tokens == -172.0);
    CHECK(wake == T0 + 1.625 + 173.0 / 128.0);
    wake = -1;
    n = sx_sched_take(&s, out, 16, T0 + 1.625 + 173.0 / 128.0, &wake);
    CHECK(n == 1 && out[0] == &b->slots[5]);
    CHECK(s.queued == 0 && s.stats.admitted == 6);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

/* A 200 whose answer was read and says it used `total` tokens (0: no usage). */
static void mk_ok_usage(sx_attempt *a, int64_t total, const char *const *headers)
{
    mk_attempt(a, CURLE_OK, 200, headers);
    a->chat.parsed = SX_CHAT_PARSED;
    a->chat.prompt_tokens = total / 2;
    a->chat.completion_tokens = total - total / 2;
    a->chat.total_tokens = total;
}

static void test_sched_tpm_settle(void)
{
    /* Reservations are settled against the answer's usage: the unused part comes back at
     * once (the next request goes without waiting for the refill), an overrun is charged
     * (a debt), an answer without usage or left to Python keeps its estimate, and with
     * settle_tokens off nothing changes. */
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    so.tpm = 7680;   /* 128 tokens/s, burst 128 */
    so.settle_tokens = 1;
    sx_sched_init(&s, &so, T0);
    sx_request_opts ro = req_opts();
    const double tokens[] = {100, 100, 100, 100};
    sx_batch *b = mk_batch("s", 4, tokens, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_rng rng;
    sx_rng_seed(&rng, 1);
    sx_slot *out[8];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 8, T0, &wake);
    CHECK(n == 1 && out[0] == &b->slots[0]);
    CHECK(s.tpm.tokens == 28.0 && s.tokens_in_flight == 100.0);
    CHECK(wake == T0 + 72.0 / 128.0);

    sx_attempt a;
    mk_ok_usage(&a, 20, NULL);
    CHECK(sx_sched_outcome(&s, &b->slots[0], &a, &rng, T0) == SX_V_OK);
    CHECK(s.tpm.tokens == 108.0);       /* 80 unused tokens back */
    CHECK(s.tokens_in_flight == 0.0);
    CHECK(s.stats.settled == 1 && s.stats.tokens_refunded == 80.0);
    wake = -1;
    n = sx_sched_take(&s, out, 8, T0, &wake);
    CHECK(n == 1 && out[0] == &b->slots[1]);   /* at once, not 0.56 s later */
    CHECK(s.tpm.tokens == 8.0);

    /* an overrun: 150 used of 100 reserved -> a debt of 42 */
    mk_ok_usage(&a, 150, NULL);
    CHECK(sx_sched_outcome(&s, &b->slots[1], &a, &rng, T0) == SX_V_OK);
    CHECK(s.tpm.tokens == -42.0 && s.stats.tokens_overrun == 50.0);
    wake = -1;
    n = sx_sched_take(&s, out, 8, T0, &wake);
    CHECK(n == 0 && wake == T0 + 142.0 / 128.0);   /* 100 needed from -42 */

    /* no usage in the answer, or an answer the worker did not read: the estimate stands */
    n = sx_sched_take(&s, out, 8, T0 + 142.0 / 128.0, &wake);
    CHECK(n == 1 && out[0] == &b->slots[2]);
    double level = s.tpm.tokens;
    mk_ok_usage(&a, 0, NULL);
    CHECK(sx_sched_outcome(&s, &b->slots[2], &a, &rng, T0 + 142.0 / 128.0) == SX_V_OK);
    CHECK(s.tpm.tokens == level && s.stats.settled == 2);
    /* ... until Python has read the answer and settles it late, once: 30 of 100 used */
    b->slots[2].state = SX_OK;  /* as sx_batch_finish_slot leaves it */
    b->slots[0].state = SX_OK;
    CHECK(sx_sched_settle_late(&s, &b->slots[2], 30, T0 + 142.0 / 128.0) == 1);
    CHECK(s.tpm.tokens == level + 70.0 && s.stats.settled == 3);
    CHECK(sx_sched_settle_late(&s, &b->slots[2], 30, T0 + 142.0 / 128.0) == 0);
    CHECK(sx_sched_settle_late(&s, &b->slots[0], 30, T0 + 142.0 / 128.0) == 0);  /* done */
    CHECK(s.tpm.tokens == level + 70.0 && s.stats.settled == 3);
    level = s.tpm.tokens;
    /* a failure settles nothing either (its tokens were spent on an attempt) */
    n = sx_sched_take(&s, out, 8, T0 + 10, &wake);
    CHECK(n == 1 && out[0] == &b->slots[3]);
    level = s.tpm.tokens;
    mk_attempt(&a, CURLE_OK, 500, NULL);
    a.chat.parsed = SX_CHAT_PARSED;
    a.chat.total_tokens = 1;
    CHECK(sx_sched_outcome(&s, &b->slots[3], &a, &rng, T0 + 10) == SX_V_RETRY);
    CHECK(s.tpm.tokens == level && s.stats.settled == 3);
    CHECK(sx_sched_settle_late(&s, &b->slots[3], 1, T0 + 10) == 0);  /* not a success */
    sx_sched_destroy(&s);
    sx_batch_free(b);

    /* settle_tokens off: the reservation is the charge */
    so.settle_tokens = 0;
    sx_sched_init(&s, &so, T0);
    b = mk_batch("o", 1, tokens, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    n = sx_sched_take(&s, out, 8, T0, &wake);
    CHECK(n == 1);
    static const char *const rem[] = {"x-ratelimit-remaining-tokens: 5", NULL};
    mk_ok_usage(&a, 20, rem);
    CHECK(sx_sched_outcome(&s, &b->slots[0], &a, &rng, T0) == SX_V_OK);
    CHECK(s.tpm.tokens == 28.0 && s.stats.settled == 0 && !s.tpm_seeded);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_tpm_seed_from_remaining(void)
{
    /* The first x-ratelimit-remaining-tokens sets the level to it less what is still in
     * flight (reserved), lowering it too; later ones do not; the in-flight request's
     * settlement then brings the two views together. */
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    so.tpm = 60000;  /* 1000/s, burst 1000 */
    so.settle_tokens = 1;
    sx_sched_init(&s, &so, T0);
    sx_request_opts ro = req_opts();
    const double tokens[] = {300, 300, 300};
    sx_batch *b = mk_batch("r", 3, tokens, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_rng rng;
    sx_rng_seed(&rng, 1);
    sx_slot *out[8];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 2, T0, &wake);
    CHECK(n == 2 && s.tpm.tokens == 400.0 && s.tokens_in_flight == 600.0);
    static const char *const rem[] = {"x-ratelimit-remaining-tokens: 500", NULL};
    sx_attempt a;
    mk_ok_usage(&a, 100, rem);
    CHECK(sx_sched_outcome(&s, &b->slots[0], &a, &rng, T0) == SX_V_OK);
    /* the server has 500 left; slot 1 still holds 300 of ours */
    CHECK(s.tpm_seeded && s.tpm.tokens == 200.0);
    static const char *const more[] = {"x-ratelimit-remaining-tokens: 999", NULL};
    mk_ok_usage(&a, 100, more);
    CHECK(sx_sched_outcome(&s, &b->slots[1], &a, &rng, T0) == SX_V_OK);
    CHECK(s.tpm.tokens == 400.0);       /* settled (+200), not re-seeded */
    /* a remaining above the burst fills the bucket, no more */
    sx_sched s2;
    sx_sched_init(&s2, &so, T0);
    sx_batch *c = mk_batch("q", 1, tokens, &ro);
    REQUIRE(c != NULL);
    REQUIRE(sx_sched_push_batch(&s2, c) == 0);
    n = sx_sched_take(&s2, out, 8, T0, &wake);
    CHECK(n == 1);
    static const char *const lots[] = {"x-ratelimit-remaining-tokens: 149000", NULL};
    mk_ok_usage(&a, 100, lots);
    CHECK(sx_sched_outcome(&s2, &c->slots[0], &a, &rng, T0) == SX_V_OK);
    CHECK(s2.tpm.tokens == 1000.0);
    sx_sched_destroy(&s2);
    sx_batch_free(c);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_lease_settle(void)
{
    /* With a token lease, a settlement gives the unused tokens back to the lease too, and
     * the owner's accounting (used_tokens) counts what was used. */
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    so.lease = 1;
    so.lease_tokens = 1;
    so.tpm = 60000;
    so.settle_tokens = 1;
    sx_sched_init(&s, &so, T0);
    sx_request_opts ro = req_opts();
    const double tokens[] = {400};
    sx_batch *b = mk_batch("l", 1, tokens, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_sched_grant(&s, 1, 500);
    sx_slot *out[2];
    double wake = -1;
    CHECK(sx_sched_take(&s, out, 2, T0, &wake) == 1);
    CHECK(s.lease.tokens == 100 && s.lease.used_tokens == 400);
    sx_rng rng;
    sx_rng_seed(&rng, 1);
    sx_attempt a;
    mk_ok_usage(&a, 50, NULL);
    CHECK(sx_sched_outcome(&s, &b->slots[0], &a, &rng, T0) == SX_V_OK);
    CHECK(s.lease.tokens == 450 && s.lease.used_tokens == 50);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_lease(void)
{
    /* A budget granted from outside: nothing goes out before a grant, each attempt spends
     * one whole request (and its tokens with lease_tokens), a positive token balance admits
     * a request whole and runs into debt, and the next grant pays the debt first. */
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    so.lease = 1;
    so.lease_tokens = 1;
    sx_sched_init(&s, &so, T0);
    sx_request_opts ro = req_opts();
    const double tokens[] = {10, 10, 50, 10, 10};
    sx_batch *b = mk_batch("l", 5, tokens, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);

    sx_slot *out[8];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 8, T0, &wake);
    CHECK(n == 0 && wake == -1);       /* no timer: only a grant can release them */
    CHECK(s.stats.lease_waits == 1);

    sx_sched_grant(&s, 2, 1000);
    n = sx_sched_take(&s, out, 8, T0, &wake);
    CHECK(n == 2 && out[0] == &b->slots[0] && out[1] == &b->slots[1]);
    CHECK(s.lease.requests == 0 && s.lease.tokens == 980);
    CHECK(s.lease.used_requests == 2 && s.lease.used_tokens == 20);

    sx_sched_grant(&s, 5, 0);          /* 5 requests for the 3 slots left; tokens suffice */
    n = sx_sched_take(&s, out, 8, T0, &wake);
    CHECK(n == 3);
    CHECK(s.lease.tokens == 980 - 70 && s.lease.requests == 2);

    /* a balance of 5 tokens still admits the next request whole: a debt of 5 */
    sx_sched s2;
    sx_sched_init(&s2, &so, T0);
    sx_batch *c = mk_batch("m", 2, tokens + 2, &ro);   /* 50 and 10 tokens */
    REQUIRE(c != NULL);
    REQUIRE(sx_sched_push_batch(&s2, c) == 0);
    sx_sched_grant(&s2, 10, 45);
    n = sx_sched_take(&s2, out, 8, T0, &wake);
    CHECK(n == 1 && s2.lease.tokens == -5);
    sx_sched_grant(&s2, 0, 5);         /* pays the debt: still nothing to spend */
    n = sx_sched_take(&s2, out, 8, T0, &wake);
    CHECK(n == 0 && s2.lease.tokens == 0);
    sx_sched_grant(&s2, 0, 1);
    n = sx_sched_take(&s2, out, 8, T0, &wake);
    CHECK(n == 1);
    /* fractions of requests add up, and never round up into an extra request */
    sx_sched s3;
    sx_sched_init(&s3, &so, T0);
    sx_batch *d = mk_batch("f", 3, tokens, &ro);
    REQUIRE(d != NULL);
    REQUIRE(sx_sched_push_batch(&s3, d) == 0);
    sx_sched_grant(&s3, 0.5, 100);
    n = sx_sched_take(&s3, out, 8, T0, &wake);
    CHECK(n == 0);
    sx_sched_grant(&s3, 0.75, 0);
    n = sx_sched_take(&s3, out, 8, T0, &wake);
    CHECK(n == 1 && s3.lease.requests == 0.25);
    sx_sched_destroy(&s3);
    sx_batch_free(d);
    sx_sched_destroy(&s2);
    sx_batch_free(c);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_429_retry_and_cooldown(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(10);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 4);
    sx_request_opts ro = req_opts();
    ro.max_retries = 3;
    ro.backoff_base = 0.5;
    ro.backoff_cap = 10;
    sx_batch *a = mk_batch("a", 2, NULL, &ro);
    REQUIRE(a != NULL);
    REQUIRE(sx_sched_push_batch(&s, a) == 0);
    sx_slot *out[16];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 16, T0, &wake) == 2);

    sx_slot *slot = &a->slots[0];
    const char *hdrs[] = {"HTTP/1.1 429 Too Many Requests\r\n", "Retry-After: 2\r\n", NULL};
    sx_attempt at;
    mk_attempt(&at, CURLE_OK, 429, hdrs);
    CHECK(at.rate_limited && at.congestion);
    const double t1 = T0 + 0.5;
    sx_verdict v = sx_sched_outcome(&s, slot, &at, &rng, t1);
    CHECK(v == SX_V_RETRY);
    CHECK(slot->where == SX_AT_RETRY);
    CHECK(slot->due >= t1 + 2.0 - EPS);
    CHECK(slot->due <= t1 + 2.0 + EPS);   /* first-retry jitter (<= 0.5) is below the hint */
    CHECK(s.heap_len == 1 && s.heap[0] == slot && heap_ok(&s));
    CHECK(s.stats.http_429 == 1 && a->http_429 == 1);
    CHECK(s.stats.retries == 1 && a->retries == 1);
    CHECK(s.stats.cooldowns == 1);
    CHECK(s.cooldown_until >= t1 + 2.0 - EPS);
    CHECK(s.in_flight == 1 && a->in_flight == 1);

    /* The cool-down blocks new first attempts of any batch, and says when to come back. */
    sx_batch *b = mk_batch("b", 3, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    wake = -1;
    CHECK(sx_sched_take(&s, out, 16, T0 + 1.0, &wake) == 0);
    CHECK_NEAR(wake, s.cooldown_until, EPS);
    wake = -1;
    CHECK(sx_sched_take(&s, out, 16, s.cooldown_until - 0.001, &wake) == 0);
    CHECK_NEAR(wake, s.cooldown_until, EPS);

    /* Once it passes: the due retry goes first, then the new batch. */
    wake = -1;
    size_t n = sx_sched_take(&s, out, 16, slot->due, &wake);
    CHECK(n == 4);
    CHECK(out[0] == slot && slot->attempts == 2 && slot->where == SX_AT_WORKER);
    CHECK(out[1] == &b->slots[0] && out[2] == &b->slots[1] && out[3] == &b->slots[2]);
    CHECK(s.heap_len == 0);
    /* A retry keeps its first send time. */
    CHECK(slot->first_sent == T0);

    /* A 429 without any hint is one episode for everything already in flight: a short
     * cool-down (one request's time at the learned rate) and a paced bucket from then on;
     * the second 429 of the same round adds nothing. */
    const double t2 = T0 + 10;
    CHECK(s.pace.level == 0 && !s.pace.active);
    finish_ok(&s, &a->slots[1], &rng, t2);
    sx_attempt plain;
    mk_attempt(&plain, CURLE_OK, 429, NULL);
    v = sx_sched_outcome(&s, &b->slots[0], &plain, &rng, t2);
    CHECK(v == SX_V_RETRY);
    CHECK(s.pace.active && s.pace.level == 1 && s.stats.bare_episodes == 1);
    CHECK(s.rpm.rate == s.pace.rate && s.pace.rate > 0);
    CHECK_NEAR(s.cooldown_until, t2 + 1.0 / s.pace.rate, EPS);
    CHECK(b->slots[0].due >= s.cooldown_until - EPS);
    double until = s.cooldown_until;
    mk_attempt(&plain, CURLE_OK, 429, NULL);
    v = sx_sched_outcome(&s, &b->slots[1], &plain, &rng, t2);
    CHECK(v == SX_V_RETRY);
    CHECK(s.cooldown_until == until && s.stats.bare_episodes == 1 && s.pace.level == 1);
    CHECK(s.stats.http_429 == 3 && b->http_429 == 2);
    CHECK(heap_ok(&s));
    finish_ok(&s, &b->slots[2], &rng, t2);
    CHECK(s.pace.level == 1);   /* admitted before the episode: not a probe */

    /* An exhausted budget on a 200 starts a cool-down too. */
    sx_sched e;
    sx_sched_opts eo = sched_opts(10);
    sx_sched_init(&e, &eo, T0);
    sx_batch *c = mk_batch("c", 3, NULL, &ro);
    REQUIRE(c != NULL);
    REQUIRE(sx_sched_push_batch(&e, c) == 0);
    REQUIRE(sx_sched_take(&e, out, 1, T0, &wake) == 1);
    const char *ex[] = {"x-ratelimit-remaining-requests: 0\r\n",
                        "x-ratelimit-reset-requests: 1.5s\r\n", NULL};
    mk_attempt(&at, CURLE_OK, 200, ex);
    CHECK(sx_sched_outcome(&e, &c->slots[0], &at, &rng, T0) == SX_V_OK);
    sx_batch_finish_slot(&c->slots[0], SX_OK, SX_ERR_NONE, 200, NULL, 0, NULL, T0);
    CHECK_NEAR(e.cooldown_until, T0 + 1.5, EPS);
    wake = -1;
    CHECK(sx_sched_take(&e, out, 16, T0 + 1.0, &wake) == 0);
    CHECK_NEAR(wake, T0 + 1.5, EPS);
    CHECK(sx_sched_take(&e, out, 16, T0 + 1.5, &wake) == 2);
    sx_sched_destroy(&e);

    sx_sched_destroy(&s);
    sx_batch_free(a);
    sx_batch_free(b);
    sx_batch_free(c);
}

/* Issue 14 §2b end to end in the scheduler: a 200 saying the budget is gone for 11,000 years
 * starts no cool-down; a 429 asking for years retries on our own backoff and, when retries
 * run out, says the hint was ignored. */
static void test_sched_hostile_hints(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(10);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 14);
    sx_request_opts ro = req_opts();
    ro.max_retries = 1;
    ro.backoff_base = 0.5;
    ro.backoff_cap = 2;
    sx_batch *b = mk_batch("h", 3, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[8];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 8, T0, &wake) == 3);

    const char *gone[] = {"HTTP/1.1 200 OK\r\n", "x-ratelimit-remaining-requests: 0\r\n",
                          "x-ratelimit-reset-requests: 99999999h\r\n", NULL};
    sx_attempt at;
    mk_attempt(&at, CURLE_OK, 200, gone);
    CHECK(sx_sched_outcome(&s, &b->slots[0], &at, &rng, T0) == SX_V_OK);
    sx_batch_finish_slot(&b->slots[0], SX_OK, SX_ERR_NONE, 200, NULL, 0, NULL, T0);
    CHECK(s.cooldown_until <= T0);
    CHECK(s.stats.cooldowns == 0);

    const char *years[] = {"HTTP/1.1 429 Too Many Requests\r\n",
                           "Retry-After: Fri, 31 Dec 9999 23:59:59 GMT\r\n", NULL};
    mk_attempt(&at, CURLE_OK, 429, years);
    CHECK(sx_sched_outcome(&s, &b->slots[1], &at, &rng, T0) == SX_V_RETRY);
    CHECK(b->slots[1].due <= T0 + ro.backoff_cap);
    CHECK(s.cooldown_until <= T0 + ro.backoff_cap);
    const char *ms[] = {"HTTP/1.1 429 Too Many Requests\r\n",
                        "retry-after-ms: 99999999999\r\n", NULL};
    mk_attempt(&at, CURLE_OK, 429, ms);
    CHECK(sx_sched_outcome(&s, &b->slots[2], &at, &rng, T0) == SX_V_RETRY);
    CHECK(b->slots[2].due <= T0 + ro.backoff_cap);
    CHECK(s.cooldown_until <= T0 + ro.backoff_cap);

    /* The retry is refused the same way: retries are used up, and the error says why the
     * server's wait was not honoured. */
    wake = -1;
    size_t n = sx_sched_take(&s, out, 8, T0 + ro.backoff_cap, &wake);
    CHECK(n == 2);
    mk_attempt(&at, CURLE_OK, 429, ms);
    CHECK(sx_sched_outcome(&s, &b->slots[2], &at, &rng, T0 + 3) == SX_V_FAIL);
    CHECK(strstr(at.reason, "max_hint_wait=120 s") != NULL);
    CHECK(strstr(at.reason, "ignored") != NULL);
    sx_batch_finish_slot(&b->slots[2], SX_FAILED, at.kind, 429, NULL, 0, at.reason, T0 + 3);
    finish_ok(&s, &b->slots[1], &rng, T0 + 3);
    CHECK(b->done == 3);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_retry_before_first_attempts(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(2);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 5);
    sx_request_opts ro = req_opts();
    ro.backoff_base = 0.5;
    ro.backoff_cap = 0.5;
    sx_batch *a = mk_batch("a", 5, NULL, &ro);
    REQUIRE(a != NULL);
    REQUIRE(sx_sched_push_batch(&s, a) == 0);
    sx_slot *out[8];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 8, T0, &wake) == 2);

    /* A 503 with Retry-After: 1 (above the 0.5 s jitter ceiling): due exactly 1 s later. */
    const char *one[] = {"Retry-After: 1\r\n", NULL};
    sx_attempt at;
    mk_attempt(&at, CURLE_OK, 503, one);
    CHECK(sx_sched_outcome(&s, &a->slots[0], &at, &rng, T0) == SX_V_RETRY);
    CHECK(a->slots[0].due == T0 + 1.0);
    CHECK(s.cooldown_until < T0);   /* a 503 does not cool everyone down */
    finish_ok(&s, &a->slots[1], &rng, T0);

    /* Before the retry is due, first attempts go. */
    wake = -1;
    size_t n = sx_sched_take(&s, out, 1, T0 + 0.5, &wake);
    CHECK(n == 1 && out[0] == &a->slots[2]);
    finish_ok(&s, &a->slots[2], &rng, T0 + 0.5);
    /* Once due, the retry goes before the queued first attempts of the same batch. */
    n = sx_sched_take(&s, out, 1, T0 + 1.0, &wake);
    CHECK(n == 1 && out[0] == &a->slots[0]);
    CHECK(a->slots[0].attempts == 2 && s.stats.retries == 1);
    n = sx_sched_take(&s, out, 1, T0 + 1.0, &wake);
    CHECK(n == 1 && out[0] == &a->slots[3]);
    finish_ok(&s, &a->slots[0], &rng, T0 + 1.0);
    finish_ok(&s, &a->slots[3], &rng, T0 + 1.0);
    n = sx_sched_take(&s, out, 8, T0 + 2, &wake);
    CHECK(n == 1 && out[0] == &a->slots[4]);
    finish_ok(&s, &a->slots[4], &rng, T0 + 2);
    CHECK(a->done == 5 && a->ok == 5);
    CHECK(s.queued == 0 && s.heap_len == 0 && s.in_flight == 0);

    /* A due retry goes before the first attempts of a batch waiting in the queue. */
    sx_batch *old = mk_batch("old", 3, NULL, &ro);
    sx_batch *young = mk_batch("young", 1, NULL, &ro);
    REQUIRE(old && young);
    REQUIRE(sx_sched_push_batch(&s, young) == 0);
    REQUIRE(sx_sched_take(&s, out, 8, T0 + 3, &wake) == 1);
    mk_attempt(&at, CURLE_OK, 503, one);
    CHECK(sx_sched_outcome(&s, &young->slots[0], &at, &rng, T0 + 3) == SX_V_RETRY);
    REQUIRE(sx_sched_push_batch(&s, old) == 0);
    n = sx_sched_take(&s, out, 1, T0 + 4, &wake);
    CHECK(n == 1 && out[0] == &young->slots[0]);
    n = sx_sched_take(&s, out, 8, T0 + 4, &wake);
    CHECK(n == 1 && out[0] == &old->slots[0]);
    finish_ok(&s, &young->slots[0], &rng, T0 + 4);
    finish_ok(&s, &old->slots[0], &rng, T0 + 4);
    n = sx_sched_take(&s, out, 8, T0 + 4, &wake);
    CHECK(n == 2);
    finish_ok(&s, &old->slots[1], &rng, T0 + 4);
    finish_ok(&s, &old->slots[2], &rng, T0 + 4);

    /* A not-yet-due retry with nothing else to send reports its due time. */
    sx_request_opts once = req_opts();
    once.max_retries = 1;
    sx_batch *b = mk_batch("b", 1, NULL, &once);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    REQUIRE(sx_sched_take(&s, out, 8, T0 + 5, &wake) == 1);
    const char *three[] = {"Retry-After: 3\r\n", NULL};
    mk_attempt(&at, CURLE_OK, 503, three);
    CHECK(sx_sched_outcome(&s, &b->slots[0], &at, &rng, T0 + 5) == SX_V_RETRY);
    CHECK(b->slots[0].due == T0 + 8);
    wake = -1;
    CHECK(sx_sched_take(&s, out, 8, T0 + 6, &wake) == 0);
    CHECK(wake == T0 + 8);

    /* Retries run out: max_retries = 1 means two attempts in all. */
    REQUIRE(sx_sched_take(&s, out, 8, T0 + 8, &wake) == 1);
    CHECK(b->slots[0].attempts == 2);
    sx_attempt last;
    sx_verdict v = report_503(&s, &b->slots[0], &rng, T0 + 8, &last);
    CHECK(v == SX_V_FAIL);
    CHECK(strstr(last.reason, "gave up after 2 attempts") != NULL);
    CHECK(strstr(last.reason, "HTTP 503") != NULL);
    CHECK(b->slots[0].where == SX_AT_WORKER);   /* the caller finishes it */
    CHECK(s.heap_len == 0 && s.in_flight == 0);
    sx_batch_finish_slot(&b->slots[0], SX_FAILED, last.kind, last.http_status, NULL, 0,
                         last.reason, T0 + 8);
    CHECK(b->slots[0].state == SX_FAILED && b->slots[0].error_kind == SX_ERR_HTTP);
    CHECK(b->slots[0].http_status == 503);
    CHECK(b->slots[0].error && strstr(b->slots[0].error, "gave up after") != NULL);
    CHECK(b->slots[0].latency == 3.0);
    CHECK(b->done == 1 && b->failed == 1);

    sx_sched_destroy(&s);
    sx_batch_free(a);
    sx_batch_free(old);
    sx_batch_free(young);
    sx_batch_free(b);
}

static void test_sched_retries_exhausted(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(4);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 6);
    sx_request_opts ro = req_opts();
    ro.max_retries = 2;
    ro.backoff_base = 0.1;
    ro.backoff_cap = 0.1;
    sx_batch *b = mk_batch("x", 1, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *slot = &b->slots[0];
    sx_slot *out[4];
    double now = T0, wake;
    sx_attempt a;
    for (int attempt = 1; attempt <= 3; attempt++) {
        wake = -1;
        REQUIRE(sx_sched_take(&s, out, 4, now, &wake) == 1);
        CHECK(out[0] == slot && slot->attempts == attempt);
        /* a timeout: retried, counted, and its kind says so if it is the last */
        mk_attempt(&a, CURLE_OPERATION_TIMEDOUT, 0, NULL);
        sx_verdict v = sx_sched_outcome(&s, slot, &a, &rng, now);
        if (attempt < 3) {
            CHECK(v == SX_V_RETRY);
            CHECK(slot->due >= now && slot->due <= now + 0.1 + EPS);
            now = slot->due;
        } else {
            CHECK(v == SX_V_FAIL);
            CHECK(a.kind == SX_ERR_TIMEOUT);
            CHECK(strstr(a.reason, "gave up after 3 attempts") != NULL);
        }
    }
    CHECK(s.stats.timeouts == 3);
    CHECK(s.stats.retries == 2 && b->retries == 2);
    sx_batch_finish_slot(slot, SX_FAILED, a.kind, a.http_status, NULL, 0, a.reason, now);
    CHECK(slot->state == SX_FAILED && slot->error_kind == SX_ERR_TIMEOUT);
    CHECK(slot->latency >= 0);

    /* max_retries = 0: the first retryable failure is final. */
    sx_request_opts none = req_opts();
    none.max_retries = 0;
    sx_batch *c = mk_batch("y", 1, NULL, &none);
    REQUIRE(c != NULL);
    REQUIRE(sx_sched_push_batch(&s, c) == 0);
    REQUIRE(sx_sched_take(&s, out, 4, now, &wake) == 1);
    CHECK(report_503(&s, &c->slots[0], &rng, now, &a) == SX_V_FAIL);
    CHECK(strstr(a.reason, "gave up after 1 attempts") != NULL);
    sx_batch_finish_slot(&c->slots[0], SX_FAILED, a.kind, a.http_status, NULL, 0, a.reason,
                         now);

    /* Final verdicts pass through untouched. */
    sx_batch *d = mk_batch("z", 2, NULL, &ro);
    REQUIRE(d != NULL);
    REQUIRE(sx_sched_push_batch(&s, d) == 0);
    REQUIRE(sx_sched_take(&s, out, 4, now, &wake) == 2);
    mk_attempt(&a, CURLE_OK, 404, NULL);
    CHECK(sx_sched_outcome(&s, &d->slots[0], &a, &rng, now) == SX_V_FAIL);
    mk_attempt(&a, CURLE_OK, 401, NULL);
    CHECK(sx_sched_outcome(&s, &d->slots[1], &a, &rng, now) == SX_V_ABORT_BATCH);
    CHECK(s.in_flight == 0 && s.heap_len == 0);

    sx_sched_destroy(&s);
    sx_batch_free(b);
    sx_batch_free(c);
    sx_batch_free(d);
}

static void test_sched_adaptive_window(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(8);
    so.adaptive = 1;
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 7);
    sx_request_opts ro = req_opts();
    sx_batch *b = mk_batch("w", 20, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[32];
    double wake = -1;
    CHECK(sx_sched_window(&s) == 8);
    REQUIRE(sx_sched_take(&s, out, 32, T0, &wake) == 8);

    sx_attempt a;
    mk_attempt(&a, CURLE_OPERATION_TIMEDOUT, 0, NULL);
    CHECK(sx_sched_outcome(&s, out[0], &a, &rng, T0) == SX_V_RETRY);
    CHECK(sx_sched_window(&s) == 4 && s.stats.window_cuts == 1);
    mk_attempt(&a, CURLE_OPERATION_TIMEDOUT, 0, NULL);
    CHECK(sx_sched_outcome(&s, out[1], &a, &rng, T0) == SX_V_RETRY);
    CHECK(sx_sched_window(&s) == 4 && s.stats.window_cuts == 1);   /* same round */
    /* 6 in flight > window 4: nothing more goes. */
    CHECK(sx_sched_take(&s, out + 8, 16, T0 + 100, &wake) == 0);
    for (int i = 2; i < 5; i++)
        finish_ok(&s, out[i], &rng, T0);
    CHECK(s.in_flight == 3);
    CHECK(sx_sched_take(&s, out + 8, 16, T0 + 100, &wake) == 1);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

struct removed {
    int calls[64];
    size_t total;
    const sx_batch *want;
    int wrong_batch;
};

static void on_removed(sx_slot *slot, void *arg)
{
    struct removed *r = arg;
    r->total++;
    if (slot->batch != r->want) {
        r->wrong_batch++;
        return;
    }
    if (slot->index < 64)
        r->calls[slot->index]++;
    sx_batch_finish_slot(slot, SX_CANCELLED, SX_ERR_CANCELLED, 0, NULL, 0, "cancelled", T0);
}

static void test_sched_remove_batch(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(11);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 8);
    sx_request_opts capped = req_opts();
    capped.max_in_flight = 5;
    capped.backoff_base = 2;
    capped.backoff_cap = 2;
    sx_request_opts plain = capped;
    plain.max_in_flight = 0;
    sx_batch *a = mk_batch("a", 8, NULL, &capped);
    sx_batch *b = mk_batch("b", 8, NULL, &plain);
    REQUIRE(a && b);
    REQUIRE(sx_sched_push_batch(&s, a) == 0);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[32];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 32, T0, &wake);
    REQUIRE(n == 11);   /* a0..a4 (a's cap), b0..b5 */
    for (int i = 0; i < 4; i++) {
        CHECK(report_503(&s, &a->slots[i], &rng, T0, NULL) == SX_V_RETRY);
        CHECK(report_503(&s, &b->slots[i], &rng, T0, NULL) == SX_V_RETRY);
    }
    finish_ok(&s, &a->slots[4], &rng, T0);
    finish_ok(&s, &b->slots[4], &rng, T0);
    finish_ok(&s, &b->slots[5], &rng, T0);
    CHECK(s.heap_len == 8 && heap_ok(&s));
    CHECK(s.queued == 5);   /* a5..a7, b6, b7 */
    CHECK(s.in_flight == 0);

    struct removed r;
    memset(&r, 0, sizeof r);
    r.want = a;
    sx_sched_remove_batch(&s, a, on_removed, &r);
    CHECK(r.wrong_batch == 0);
    CHECK(r.total == 7);   /* 3 queued + 4 waiting to retry */
    for (int i = 0; i < 8; i++)
        CHECK(r.calls[i] == (i == 4 ? 0 : 1));
    CHECK(a->done == 8 && a->cancelled == 7 && a->ok == 1);
    CHECK(!a->in_queue);

    /* b is untouched. */
    CHECK(s.queued == 2);
    CHECK(s.heap_len == 4 && heap_ok(&s));
    for (size_t i = 0; i < s.heap_len; i++)
        CHECK(s.heap[i]->batch == b);
    CHECK(s.q_head == b && s.q_tail == b && b->in_queue);
    for (int i = 0; i < 4; i++)
        CHECK(b->slots[i].where == SX_AT_RETRY);
    CHECK(b->slots[6].where == SX_AT_QUEUE && b->slots[7].where == SX_AT_QUEUE);
    CHECK(b->done == 2);

    /* Removing again finds nothing. */
    memset(&r, 0, sizeof r);
    r.want = a;
    sx_sched_remove_batch(&s, a, on_removed, &r);
    CHECK(r.total == 0);

    /* What is left still comes out: retries in due order, then b6, b7. */
    wake = -1;
    n = sx_sched_take(&s, out, 32, T0 + 100, &wake);
    CHECK(n == 6);
    if (n == 6) {
        for (int i = 0; i < 4; i++) {
            CHECK(out[i]->batch == b && out[i]->index < 4 && out[i]->attempts == 2);
            if (i > 0)
                CHECK(out[i - 1]->due <= out[i]->due);
        }
        CHECK(out[4] == &b->slots[6] && out[5] == &b->slots[7]);
    }
    CHECK(s.queued == 0 && s.heap_len == 0 && s.q_head == NULL && s.q_tail == NULL);

    /* Removing a batch in the middle of the queue keeps the queue linked. */
    sx_sched q;
    sx_sched_opts qo = sched_opts(1);
    sx_sched_init(&q, &qo, T0);
    sx_batch *x = mk_batch("x", 2, NULL, &plain);
    sx_batch *y = mk_batch("y", 2, NULL, &plain);
    sx_batch *z = mk_batch("z", 2, NULL, &plain);
    REQUIRE(x && y && z);
    REQUIRE(sx_sched_push_batch(&q, x) == 0);
    REQUIRE(sx_sched_push_batch(&q, y) == 0);
    REQUIRE(sx_sched_push_batch(&q, z) == 0);
    memset(&r, 0, sizeof r);
    r.want = y;
    sx_sched_remove_batch(&q, y, on_removed, &r);
    CHECK(r.total == 2 && r.calls[0] == 1 && r.calls[1] == 1);
    CHECK(q.queued == 4 && q.q_head == x && x->q_next == z && q.q_tail == z);
    memset(&r, 0, sizeof r);
    r.want = z;
    sx_sched_remove_batch(&q, z, on_removed, &r);
    CHECK(r.total == 2 && q.q_tail == x && x->q_next == NULL && q.queued == 2);
    sx_sched_destroy(&q);

    sx_sched_destroy(&s);
    sx_batch_free(a);
    sx_batch_free(b);
    sx_batch_free(x);
    sx_batch_free(y);
    sx_batch_free(z);
}

/* ---- bare 429s: the scheduler against a simulated gateway (fake clock, 1 ms steps) ----
 * The gateway is nginx limit_req with burst=B nodelay: a bucket of B refilled at R/s; a
 * request that finds it empty is refused at once with a bare 429, one that passes is
 * answered 200 after `latency`. Nothing but the scheduler and this loop. */
typedef struct {
    sx_slot *slot;
    double due;
    int status;
} sim_reply;

typedef struct {
    double achieved;     /* 200s per second over the run */
    double allowed;      /* what the gateway allowed over the same time */
    uint64_t refused;    /* bare 429s */
    uint64_t sent;
    uint64_t episodes;
    int done;            /* every row answered 200 */
} sim_result;

static sim_result sim_gateway(size_t n, int c, double user_rpm, double rate, double burst,
                              double halve_from, double halve_to, uint64_t seed)
{
    sim_result res;
    memset(&res, 0, sizeof res);
    sx_sched s;
    sx_sched_opts so = sched_opts(c);
    so.rpm = user_rpm;
    so.adaptive = 1;
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, seed);
    sx_request_opts ro = req_opts();
    ro.max_retries = 20;
    ro.backoff_base = 0.5;
    ro.backoff_cap = 10;
    sx_batch *b = mk_batch("g", n, NULL, &ro);
    sim_reply *pending = calloc((size_t)c + 1, sizeof *pending);
    sx_slot **out = calloc((size_t)c + 1, sizeof *out);
    if (!b || !pending || !out || sx_sched_push_batch(&s, b) != 0) {
        CHECK(0);
        goto done;
    }
    size_t npending = 0;
    double tokens = burst, last = T0, now = T0;
    const double latency = 0.020, step = 0.001;
    double end = T0;
    for (long tick = 0; b->done < n && tick < 600000; tick++) {
        now = T0 + tick * step;
        /* replies that are due */
        for (size_t i = 0; i < npending;) {
            if (pending[i].due > now) {
                i++;
                continue;
            }
            sim_reply r = pending[i];
            pending[i] = pending[--npending];
            sx_attempt a;
            mk_attempt(&a, CURLE_OK, r.status, NULL);
            sx_verdict v = sx_sched_outcome(&s, r.slot, &a, &rng, now);
            if (v == SX_V_OK)
                sx_batch_finish_slot(r.slot, SX_OK, SX_ERR_NONE, 200, NULL, 0, NULL, now);
            else if (v != SX_V_RETRY)
                sx_batch_finish_slot(r.slot, SX_FAILED, a.kind, r.status, NULL, 0, a.reason,
                                     now);
        }
        double wake = -1;
        size_t k = sx_sched_take(&s, out, (size_t)c, now, &wake);
        double t = now - T0;
        double r_now = (t >= halve_from && t < halve_to) ? rate / 2 : rate;
        tokens += (now - last) * r_now;
        if (tokens > burst)
            tokens = burst;
        last = now;
        for (size_t i = 0; i < k; i++) {
            res.sent++;
            int ok = tokens >= 1.0;
            if (ok)
                tokens -= 1.0;
            else
                res.refused++;
            pending[npending].slot = out[i];
            pending[npending].due = now + (ok ? latency : 0.0005);
            pending[npending].status = ok ? 200 : 429;
            npending++;
        }
        end = now;
    }
    double wall = end - T0;
    res.done = b->done == n && b->ok == n;
    res.achieved = (double)b->ok / wall;
    double allowed = rate * wall + burst;
    if (halve_to > halve_from) {
        double lo = halve_from, hi = halve_to < wall ? halve_to : wall;
        if (hi > lo)
            allowed -= rate / 2 * (hi - lo);
    }
    res.allowed = allowed / wall;
    res.episodes = s.stats.bare_episodes;
done:
    sx_sched_destroy(&s);
    if (b)
        sx_batch_free(b);
    free(pending);
    free(out);
    return res;
}

static void report_sim(const char *what, const sim_result *r)
{
    fprintf(stderr, "  %-34s %.1f of %.1f req/s allowed (%.1f%%), %llu of %llu refused "
            "(%.2f%%), %llu episodes\n", what, r->achieved, r->allowed,
            100 * r->achieved / r->allowed, (unsigned long long)r->refused,
            (unsigned long long)r->sent, 100.0 * (double)r->refused / (double)r->sent,
            (unsigned long long)r->episodes);
}

/* Issue 14 §1: the targets of benchmarks/bench_bare429.py, on a fake clock. */
static void test_sched_bare_429_converges(void)
{
    sim_result r = sim_gateway(4000, 200, 12000, 200, 20, 0, 0, 1);
    report_sim("rpm given, C=200", &r);
    CHECK(r.done);
    CHECK(r.achieved >= 0.95 * r.allowed);
    CHECK(r.refused <= r.sent / 50);

    r = sim_gateway(4000, 1000, 12000, 200, 20, 0, 0, 2);
    report_sim("rpm given, C=1000", &r);
    CHECK(r.done);
    CHECK(r.achieved >= 0.95 * r.allowed);
    CHECK(r.refused <= r.sent / 50);

    /* A gateway burst below the tenth of a second the bucket starts with: learned. */
    r = sim_gateway(4000, 200, 12000, 200, 5, 0, 0, 7);
    report_sim("rpm given, burst 5", &r);
    CHECK(r.done);
    CHECK(r.achieved >= 0.95 * r.allowed);
    CHECK(r.refused <= r.sent / 50);

    /* No rpm: the first clump (C requests) is refused, then the limit is found. */
    r = sim_gateway(4000, 200, 0, 200, 20, 0, 0, 3);
    report_sim("no rpm, C=200", &r);
    CHECK(r.done);
    CHECK(r.achieved >= 0.90 * r.allowed);
    CHECK(r.refused <= 200 + r.sent / 50);

    r = sim_gateway(4000, 1000, 0, 200, 20, 0, 0, 4);
    report_sim("no rpm, C=1000", &r);
    CHECK(r.done);
    CHECK(r.achieved >= 0.90 * r.allowed);
    CHECK(r.refused <= 1000 + r.sent / 50);

    /* The limit halves for 10 s, then comes back. */
    r = sim_gateway(6000, 200, 0, 200, 20, 10, 20, 5);
    report_sim("no rpm, halved 10-20 s", &r);
    CHECK(r.done);
    CHECK(r.achieved >= 0.90 * r.allowed);
    CHECK(r.refused <= 200 + r.sent / 50);

    /* A limit above the user's rpm: never exceed the rpm, never refused after the start. */
    r = sim_gateway(1000, 200, 6000, 200, 20, 0, 0, 6);
    report_sim("rpm below the gateway", &r);
    CHECK(r.done && r.refused == 0 && r.achieved <= 100.0 * 1.01);
}

static void drop_slot(sx_slot *slot, void *arg)
{
    (void)slot;
    (void)arg;
}

/* One clump refused together is one episode, not one per 429; escalation happens once per
 * episode in a row with nothing getting through, and a probe's success ends it. */
static void test_sched_bare_429_episodes(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(100);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 9);
    sx_request_opts ro = req_opts();
    ro.max_retries = 10;
    sx_batch *b = mk_batch("e", 100, NULL, &ro);
    REQUIRE(b && sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[128];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 128, T0, &wake) == 100);
    sx_attempt a;
    for (int i = 0; i < 80; i++) {
        mk_attempt(&a, CURLE_OK, 429, NULL);
        CHECK(sx_sched_outcome(&s, out[i], &a, &rng, T0 + 0.001) == SX_V_RETRY);
    }
    CHECK(s.stats.bare_episodes == 1 && s.pace.level == 1);
    CHECK(s.stats.http_429 == 80);
    double first_pause = s.cooldown_until - (T0 + 0.001);
    CHECK(first_pause > 0 && first_pause <= ro.backoff_base);
    for (int i = 80; i < 100; i++)
        finish_ok(&s, out[i], &rng, T0 + 0.02);
    CHECK(s.pace.level == 1);          /* those were sent before the episode */

    /* The probes after it are refused too: a second episode, a doubled pause. */
    double t = s.cooldown_until > T0 + 0.6 ? s.cooldown_until : T0 + 0.6;
    wake = -1;
    size_t n = sx_sched_take(&s, out, 128, t, &wake);
    REQUIRE(n >= 1);
    mk_attempt(&a, CURLE_OK, 429, NULL);
    CHECK(sx_sched_outcome(&s, out[0], &a, &rng, t) == SX_V_RETRY);
    CHECK(s.stats.bare_episodes == 2 && s.pace.level == 2);
    CHECK(s.cooldown_until - t >= 2 * (1.0 / s.pace.rate < ro.backoff_base ? 1.0 / s.pace.rate
                                                                             : ro.backoff_base)
                                     - EPS);
    for (size_t i = 1; i < n; i++) {
        mk_attempt(&a, CURLE_OK, 429, NULL);
        sx_sched_outcome(&s, out[i], &a, &rng, t);
    }
    CHECK(s.stats.bare_episodes == 2);
    /* A request sent after that episode gets through: the streak ends. */
    double t2 = s.cooldown_until + 1.0;
    wake = -1;
    n = sx_sched_take(&s, out, 1, t2, &wake);
    REQUIRE(n == 1);
    finish_ok(&s, out[0], &rng, t2 + 0.02);
    CHECK(s.pace.level == 0);
    /* A 429 that carries a hint is not bare: the hint decides, the pace is untouched. */
    double rate = s.pace.rate;
    n = sx_sched_take(&s, out, 1, t2 + 1, &wake);
    REQUIRE(n == 1);
    const char *hinted[] = {"Retry-After: 2\r\n", NULL};
    mk_attempt(&a, CURLE_OK, 429, hinted);
    CHECK(sx_sched_outcome(&s, out[0], &a, &rng, t2 + 1) == SX_V_RETRY);
    CHECK(s.stats.bare_episodes == 2 && s.pace.rate == rate);
    CHECK_NEAR(s.cooldown_until, t2 + 3, EPS);
    sx_sched_remove_batch(&s, b, drop_slot, NULL);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_queue_limit(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(4);
    so.queue_limit = 10;
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 9);
    sx_request_opts ro = req_opts();
    sx_batch *a = mk_batch("a", 6, NULL, &ro);
    sx_batch *b = mk_batch("b", 5, NULL, &ro);
    sx_batch *c = mk_batch("c", 4, NULL, &ro);
    sx_batch *d = mk_batch("d", 1, NULL, &ro);
    REQUIRE(a && b && c && d);
    CHECK(sx_sched_push_batch(&s, a) == 0);
    CHECK(sx_sched_push_batch(&s, b) == -1);
    CHECK(!b->in_queue && s.queued == 6 && s.q_tail == a);
    CHECK(sx_sched_push_batch(&s, c) == 0);
    CHECK(s.queued == 10);
    CHECK(sx_sched_push_batch(&s, d) == -1);

    /* Retries waiting count against the limit too; in-flight ones do not. */
    sx_slot *out[4];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 1, T0, &wake) == 1);
    CHECK(s.queued == 9);
    CHECK(report_503(&s, out[0], &rng, T0, NULL) == SX_V_RETRY);
    CHECK(s.heap_len == 1);
    CHECK(sx_sched_push_batch(&s, d) == -1);
    REQUIRE(sx_sched_take(&s, out, 2, T0 + 100, &wake) == 2);   /* the retry + a1 */
    CHECK(s.queued + s.heap_len == 8);
    CHECK(sx_sched_push_batch(&s, d) == 0);

    sx_sched_destroy(&s);
    sx_batch_free(a);
    sx_batch_free(b);
    sx_batch_free(c);
    sx_batch_free(d);
}

static void test_batch_results(void)
{
    sx_request_opts ro = req_opts();
    const char *bodies[] = {"one", NULL, "three"};
    const size_t lens[] = {3, 0, 5};
    const char *hdrs[] = {"Content-Type: application/json", "X-Test: 1"};
    sx_batch *b = sx_batch_new("http://h/", hdrs, 2, bodies, lens, NULL, 3, &ro);
    REQUIRE(b != NULL);
    CHECK(b->refs == 1 && b->n == 3 && b->efd == -1);
    CHECK(b->slots[0].body_len == 3 && memcmp(b->slots[0].body, "one", 3) == 0);
    CHECK(b->slots[1].body == NULL);   /* GET */
    CHECK(b->slots[2].body_len == 5 && memcmp(b->slots[2].body, "three", 5) == 0);
    CHECK(b->slots[0].tokens == 1.0);
    /* "Expect:" first, then the caller's headers. */
    int nh = 0;
    for (struct curl_slist *l = b->headers; l; l = l->next)
        nh++;
    CHECK(nh == 3);
    CHECK(b->headers && strcmp(b->headers->data, "Expect:") == 0);

    char *resp = malloc(2);
    REQUIRE(resp != NULL);
    memcpy(resp, "ok", 2);
    b->slots[0].attempts = 1;
    b->slots[0].first_sent = 5.0;
    CHECK(sx_batch_finish_slot(&b->slots[0], SX_OK, SX_ERR_NONE, 200, resp, 2, NULL, 7.5) == 0);
    CHECK(b->slots[0].latency == 2.5 && b->slots[0].response == resp);
    CHECK(sx_batch_finish_slot(&b->slots[1], SX_FAILED, SX_ERR_HTTP, 404, NULL, 0, "nope", 8) == 0);
    CHECK(b->slots[1].error && strcmp(b->slots[1].error, "nope") == 0);
    CHECK(b->slots[1].latency == 0.0);   /* never sent */

    /* eventfd: made on demand, readable once done, coalesced, cleared. */
    int fd = sx_batch_fileno(b);
    CHECK(fd >= 0 && sx_batch_fileno(b) == fd);
    CHECK(!b->notify_pending);
    CHECK(sx_batch_finish_slot(&b->slots[2], SX_CANCELLED, SX_ERR_CANCELLED, 0, NULL, 0,
                               "cancelled", 9) == 1);
    sx_batch_notify(b);
    sx_batch_notify(b);
    CHECK(b->notify_pending);
    uint64_t v = 0;
    CHECK(read(fd, &v, sizeof v) == (ssize_t)sizeof v && v == 1);
    b->notify_pending = 1;
    sx_batch_clear_notify(b);
    CHECK(!b->notify_pending);
    CHECK(b->done == 3 && b->ok == 1 && b->failed == 1 && b->cancelled == 1);
    sx_batch_free(b);

    /* An empty batch is done from the start; its fd starts readable. */
    sx_batch *e = sx_batch_new("http://h/", NULL, 0, NULL, NULL, NULL, 0, &ro);
    REQUIRE(e != NULL);
    fd = sx_batch_fileno(e);
    CHECK(fd >= 0 && e->notify_pending);
    sx_batch_free(e);
}

/* ------------------------------------------------------------------ tiny HTTP/1.1 server
 *
 * One thread per connection, keep-alive, Content-Length bodies only. It answers 200 with the
 * request body echoed, except: a body starting "FAIL" gets a 503 the first time that exact
 * body is seen; "RATE" likewise gets a 429 with "Retry-After-Ms: 300"; "AUTH" gets a 401;
 * "SLOW" sleeps 2 s first (cut short at shutdown). */

#define AUTH_BODY "{\"error\":\"invalid key\"}"

typedef struct srv_conn {
    int fd;               /* -1 once the connection thread closed it [srv.mu] */
    pthread_t thr;
    struct srv *srv;
    struct srv_conn *next;
} srv_conn;

typedef struct srv {
    int lfd;
    int port;
    pthread_t thr;
    pthread_mutex_t mu;
    pthread_cond_t cv;        /* wakes SLOW sleepers at shutdown */
    int stopping;
    srv_conn *conns;
    char **failed;            /* FAIL bodies already answered with 503 once */
    size_t nfailed, capfailed;
    unsigned long requests;
    unsigned long connections;
} srv;

static int send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int respond_with(int fd, int status, const char *reason, const char *extra_headers,
                        const char *body, size_t len)
{
    char head[512];
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "%s\r\n",
                     status, reason, len, extra_headers ? extra_headers : "");
    char *msg = malloc((size_t)h + len);
    if (!msg)
        return -1;
    memcpy(msg, head, (size_t)h);
    if (len)
        memcpy(msg + h, body, len);
    int rc = send_all(fd, msg, (size_t)h + len);
    free(msg);
    return rc;
}

static int respond(int fd, int status, const char *reason, const char *body, size_t len)
{
    return respond_with(fd, status, reason, NULL, body, len);
}

/* 200 text/event-stream with `body` as the stream, sent in 7-byte pieces with a pause
 * between them, so the client reads events split across many reads. */
static int respond_stream(int fd, const char *body, size_t len)
{
    char head[256];
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                     "Content-Length: %zu\r\n\r\n", len);
    if (send_all(fd, head, (size_t)h) != 0)
        return -1;
    for (size_t off = 0; off < len; off += 7) {
        if (send_all(fd, body + off, len - off < 7 ? len - off : 7) != 0)
            return -1;
        sleep_s(0.0005);
    }
    return 0;
}

/* 1 the first time this FAIL body is seen, 0 after. */
static int srv_first_failure(srv *s, const char *body, size_t len)
{
    int first = 1;
    pthread_mutex_lock(&s->mu);
    for (size_t i = 0; i < s->nfailed; i++)
        if (strlen(s->failed[i]) == len && memcmp(s->failed[i], body, len) == 0)
            first = 0;
    if (first) {
        if (s->nfailed == s->capfailed) {
            size_t cap = s->capfailed ? s->capfailed * 2 : 16;
            char **grown = realloc(s->failed, cap * sizeof *grown);
            if (grown) {
                s->failed = grown;
                s->capfailed = cap;
            }
        }
        if (s->nfailed < s->capfailed) {
            char *copy = strndup(body, len);
            if (copy)
                s->failed[s->nfailed++] = copy;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return first;
}

static void srv_sleep(srv *s, double seconds)
{
    struct timespec ts;
    double until = mono_now() + seconds;
    ts.tv_sec = (time_t)until;
    ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
    pthread_mutex_lock(&s->mu);
    while (!s->stopping) {
        if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&s->mu);
}

static size_t content_length(const char *head, size_t len)
{
    const char *p = head;
    const char *end = head + len;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            break;
        if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0)
            return (size_t)strtoul(p + 15, NULL, 10);
        p = eol + 1;
    }
    return 0;
}

static void *srv_conn_main(void *arg)
{
    srv_conn *c = arg;
    srv *s = c->srv;
    size_t cap = 16384, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        goto out;
    for (;;) {
        char *hend;
        size_t need = 0;
        for (;;) {
            hend = len >= 4 ? memmem(buf, len, "\r\n\r\n", 4) : NULL;
            if (hend) {
                size_t hlen = (size_t)(hend - buf) + 4;
                need = hlen + content_length(buf, hlen);
                if (len >= need)
                    break;
            }
            size_t want = need > cap ? need : (len == cap ? cap * 2 : cap);
            if (want > cap) {
                char *grown = realloc(buf, want);
                if (!grown)
                    goto out;
                buf = grown;
                cap = want;
            }
            ssize_t r = recv(c->fd, buf + len, cap - len, 0);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                goto out;
            len += (size_t)r;
        }
        size_t hlen = (size_t)(hend - buf) + 4;
        const char *body = buf + hlen;
        size_t blen = need - hlen;
        pthread_mutex_lock(&s->mu);
        s->requests++;
        pthread_mutex_unlock(&s->mu);

        int rc;
        if (blen >= 4 && memcmp(body, "FAIL", 4) == 0 && srv_first_failure(s, body, blen)) {
            rc = respond(c->fd, 503, "Service Unavailable", "try again", 9);
        } else if (blen >= 4 && memcmp(body, "RATE", 4) == 0 &&
                   srv_first_failure(s, body, blen)) {
            rc = respond_with(c->fd, 429, "Too Many Requests",
                              "x-ratelimit-remaining-requests: 3\r\nRetry-After-Ms: 300\r\n",
                              "slow down", 9);
        } else if (blen >= 3 && memcmp(body, "SSE", 3) == 0) {
            rc = respond_stream(c->fd, body + 3, blen - 3);
        } else if (blen >= 4 && memcmp(body, "AUTH", 4) == 0) {
            rc = respond(c->fd, 401, "Unauthorized", AUTH_BODY, strlen(AUTH_BODY));
        } else {
            if (blen >= 4 && memcmp(body, "SLOW", 4) == 0)
                srv_sleep(s, 2.0);
            rc = respond(c->fd, 200, "OK", body, blen);
        }
        if (rc != 0)
            goto out;
        memmove(buf, buf + need, len - need);
        len -= need;
    }
out:
    free(buf);
    pthread_mutex_lock(&s->mu);
    close(c->fd);
    c->fd = -1;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void *srv_accept_main(void *arg)
{
    srv *s = arg;
    for (;;) {
        int fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
        pthread_mutex_lock(&s->mu);
        int stopping = s->stopping;
        pthread_mutex_unlock(&s->mu);
        if (fd < 0) {
            if (stopping)
                break;
            if (errno != EINTR)
                sleep_s(0.001);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        srv_conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->srv = s;
        pthread_mutex_lock(&s->mu);
        if (s->stopping || pthread_create(&c->thr, NULL, srv_conn_main, c) != 0) {
            pthread_mutex_unlock(&s->mu);
            close(fd);
            free(c);
            if (stopping)
                break;
            continue;
        }
        c->next = s->conns;
        s->conns = c;
        s->connections++;
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

static int srv_start(srv *s)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &attr);
    pthread_condattr_destroy(&attr);
    s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s->lfd < 0)
        return -1;
    int one = 1;
    setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t alen = sizeof addr;
    if (bind(s->lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(s->lfd, 512) != 0 ||
        getsockname(s->lfd, (struct sockaddr *)&addr, &alen) != 0) {
        close(s->lfd);
        return -1;
    }
    s->port = ntohs(addr.sin_port);
    if (pthread_create(&s->thr, NULL, srv_accept_main, s) != 0) {
        close(s->lfd);
        return -1;
    }
    return 0;
}

static void srv_stop(srv *s)
{
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_broadcast(&s->cv);
    for (srv_conn *c = s->conns; c; c = c->next)
        if (c->fd >= 0)
            shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_unlock(&s->mu);
    shutdown(s->lfd, SHUT_RDWR);   /* wakes accept() */
    pthread_join(s->thr, NULL);
    /* No new connections now; join the rest. */
    srv_conn *c = s->conns;
    while (c) {
        srv_conn *next = c->next;
        pthread_join(c->thr, NULL);
        free(c);
        c = next;
    }
    s->conns = NULL;
    close(s->lfd);
    for (size_t i = 0; i < s->nfailed; i++)
        free(s->failed[i]);
    free(s->failed);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
}

/* ------------------------------------------------------------------ engine end to end */

/* SX_TEST_OWN_HTTP1=1: every engine of these tests carries plain http:// on the workers' own
 * HTTP/1.1 (h1.h) instead of libcurl; `make tsan` runs the tests both ways. */
static int own_http1(void)
{
    const char *v = getenv("SX_TEST_OWN_HTTP1");
    return v && strcmp(v, "1") == 0;
}

static srv g_srv;
static int g_srv_ok;
static char g_url[64];

static sx_engine *mk_engine(int workers, int max_in_flight)
{
    sx_engine_opts eo;
    memset(&eo, 0, sizeof eo);
    eo.own_http1 = own_http1();
    eo.workers = workers;
    eo.sched.max_in_flight = max_in_flight;
    eo.sched.adaptive = 1;
    eo.sched.queue_limit = 100000;
    eo.http2 = 0;
    eo.max_connections = 0;
    char err[256] = "";
    sx_engine *e = sx_engine_new(&eo, err, sizeof err);
    if (!e)
        fprintf(stderr, "sx_engine_new failed: %s\n", err);
    return e;
}

static sx_request_opts e2e_opts(void)
{
    sx_request_opts o = req_opts();
    o.timeout = 10;
    o.connect_timeout = 5;
    o.max_retries = 3;
    o.backoff_base = 0.01;
    o.backoff_cap = 0.05;
    return o;
}

/* Bodies "<prefix>-<i>-xxx..." of varying length. */
static sx_batch *mk_http_batch(const char *prefix, size_t n, char ***bodies_out)
{
    char **bodies = calloc(n ? n : 1, sizeof *bodies);
    size_t *lens = calloc(n ? n : 1, sizeof *lens);
    if (!bodies || !lens) {
        free(bodies);
        free(lens);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        size_t pad = (i * 37) % 300;
        char head[64];
        int h = snprintf(head, sizeof head, "%s-%zu-", prefix, i);
        bodies[i] = malloc((size_t)h + pad + 1);
        if (!bodies[i])
            continue;
        memcpy(bodies[i], head, (size_t)h);
        memset(bodies[i] + h, 'a' + (int)(i % 26), pad);
        bodies[i][h + pad] = '\0';
        lens[i] = (size_t)h + pad;
    }
    const char *hdrs[] = {"Content-Type: text/plain"};
    sx_request_opts o = e2e_opts();
    sx_batch *b = sx_batch_new(g_url, hdrs, 1, (const char *const *)bodies, lens, NULL, n, &o);
    free(lens);
    if (bodies_out) {
        *bodies_out = bodies;
    } else {
        for (size_t i = 0; i < n; i++)
            free(bodies[i]);
        free(bodies);
    }
    return b;
}

static void free_bodies(char **bodies, size_t n)
{
    if (!bodies)
        return;
    for (size_t i = 0; i < n; i++)
        free(bodies[i]);
    free(bodies);
}

static void test_engine_echo_500(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 64);
    REQUIRE(e != NULL);
    CHECK(sx_engine_owned(e));
    enum { N = 500 };
    char **bodies = NULL;
    sx_batch *b = mk_http_batch("echo", N, &bodies);
    REQUIRE(b != NULL && bodies != NULL);
    double t = mono_now();
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 30.0) == 1);
    double elapsed = mono_now() - t;

    sx_engine_lock(e);
    CHECK(b->done == N && b->ok == N && b->failed == 0 && b->cancelled == 0);
    int bad = 0;
    for (size_t i = 0; i < N; i++) {
        sx_slot *s = &b->slots[i];
        int good = s->state == SX_OK && s->error_kind == SX_ERR_NONE && s->http_status == 200 &&
                   s->attempts == 1 && s->where == SX_AT_DONE && s->error == NULL &&
                   s->response_len == strlen(bodies[i]) &&
                   (s->response_len == 0 ||
                    (s->response && memcmp(s->response, bodies[i], s->response_len) == 0)) &&
                   s->latency >= 0 && s->latency <= elapsed + 0.01;
        if (!good && bad++ < 5)
            fprintf(stderr, "  slot %zu: state %d kind %d status %d attempts %d len %zu err %s\n",
                    i, s->state, s->error_kind, s->http_status, s->attempts, s->response_len,
                    s->error ? s->error : "-");
        CHECK(good);
    }
    CHECK(e->sched.in_flight == 0 && e->sched.queued == 0 && e->sched.heap_len == 0);
    CHECK(e->sched.stats.admitted == N);
    /* The engine dropped its reference; only ours is left. */
    CHECK(b->refs == 1);
    sx_engine_unlock(e);

    /* Waiting on a finished batch returns at once. */
    CHECK(sx_engine_wait(e, b, 0) == 1);

    /* An empty batch completes at once. */
    sx_request_opts o = e2e_opts();
    sx_batch *empty = sx_batch_new(g_url, NULL, 0, NULL, NULL, NULL, 0, &o);
    REQUIRE(empty != NULL);
    CHECK(sx_engine_submit(e, empty) == 0);
    CHECK(sx_engine_wait(e, empty, 0) == 1);
    sx_engine_release_batch(e, empty);

    /* A GET (no body) works too and echoes nothing. */
    const char *nobody[] = {NULL};
    const size_t nolen[] = {0};
    sx_batch *get = sx_batch_new(g_url, NULL, 0, nobody, nolen, NULL, 1, &o);
    REQUIRE(get != NULL);
    CHECK(sx_engine_submit(e, get) == 0);
    CHECK(sx_engine_wait(e, get, 10.0) == 1);
    sx_engine_lock(e);
    CHECK(get->slots[0].state == SX_OK && get->slots[0].http_status == 200);
    CHECK(get->slots[0].response_len == 0);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, get);

    sx_engine_release_batch(e, b);
    sx_engine_free(e);
    free_bodies(bodies, N);
}

static void test_engine_retry_503(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 64);
    REQUIRE(e != NULL);
    const char *bodies[] = {"ok-one", "FAIL-once-retry-test", "ok-two", "FAIL-second-body"};
    const size_t lens[] = {6, strlen(bodies[1]), 6, strlen(bodies[3])};
    sx_request_opts o = e2e_opts();
    sx_batch *b = sx_batch_new(g_url, NULL, 0, bodies, lens, NULL, 4, &o);
    REQUIRE(b != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 10.0) == 1);
    sx_engine_lock(e);
    CHECK(b->ok == 4 && b->failed == 0);
    for (size_t i = 0; i < 4; i++) {
        sx_slot *s = &b->slots[i];
        CHECK(s->state == SX_OK && s->http_status == 200);
        CHECK(s->response_len == lens[i] && s->response &&
              memcmp(s->response, bodies[i], lens[i]) == 0);
        int want_attempts = (i == 1 || i == 3) ? 2 : 1;
        CHECK(s->attempts == want_attempts);
    }
    CHECK(b->retries == 2);
    CHECK(e->sched.stats.retries == 2 && e->sched.stats.http_429 == 0);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, b);

    /* With no retries allowed, the 503 is final and its body is kept. */
    o.max_retries = 0;
    const char *fb[] = {"FAIL-no-retries"};
    const size_t fl[] = {strlen(fb[0])};
    sx_batch *f = sx_batch_new(g_url, NULL, 0, fb, fl, NULL, 1, &o);
    REQUIRE(f != NULL);
    CHECK(sx_engine_submit(e, f) == 0);
    CHECK(sx_engine_wait(e, f, 10.0) == 1);
    sx_engine_lock(e);
    sx_slot *s = &f->slots[0];
    CHECK(s->state == SX_FAILED && s->error_kind == SX_ERR_HTTP && s->http_status == 503);
    CHECK(s->attempts == 1);
    CHECK(s->error && strstr(s->error, "gave up after 1 attempts") != NULL);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, f);

    /* A connection refused is retried, then fails as a connection error. */
    int port;
    {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t al = sizeof a;
        bind(fd, (struct sockaddr *)&a, sizeof a);
        getsockname(fd, (struct sockaddr *)&a, &al);
        port = ntohs(a.sin_port);
        close(fd);   /* nobody listens there now */
    }
    char dead[64];
    snprintf(dead, sizeof dead, "http://127.0.0.1:%d/", port);
    o.max_retries = 1;
    sx_batch *c = sx_batch_new(dead, NULL, 0, fb, fl, NULL, 1, &o);
    REQUIRE(c != NULL);
    CHECK(sx_engine_submit(e, c) == 0);
    CHECK(sx_engine_wait(e, c, 10.0) == 1);
    sx_engine_lock(e);
    CHECK(c->slots[0].state == SX_FAILED && c->slots[0].error_kind == SX_ERR_CONNECTION);
    CHECK(c->slots[0].attempts == 2);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, c);

    /* However many retries are allowed, a refused connection is tried 3 times at most. */
    o.max_retries = 6;
    c = sx_batch_new(dead, NULL, 0, fb, fl, NULL, 1, &o);
    REQUIRE(c != NULL);
    CHECK(sx_engine_submit(e, c) == 0);
    CHECK(sx_engine_wait(e, c, 10.0) == 1);
    sx_engine_lock(e);
    CHECK(c->slots[0].state == SX_FAILED && c->slots[0].error_kind == SX_ERR_CONNECTION);
    CHECK(c->slots[0].attempts == 3);
    CHECK(c->slots[0].error && strstr(c->slots[0].error, "gave up after 3 attempts") != NULL);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, c);

    sx_engine_free(e);
}

static int all_cancelled(sx_engine *e, sx_batch *b, const char *why)
{
    int ok = 1;
    sx_engine_lock(e);
    if (b->done != b->n || b->cancelled != b->n)
        ok = 0;
    for (size_t i = 0; i < b->n; i++) {
        sx_slot *s = &b->slots[i];
        if (s->state != SX_CANCELLED || s->error_kind != SX_ERR_CANCELLED ||
            s->where != SX_AT_DONE || !s->error || !strstr(s->error, why)) {
            if (ok)
                fprintf(stderr, "  slot %zu: state %d kind %d where %d err %s\n", i, s->state,
                        s->error_kind, s->where, s->error ? s->error : "-");
            ok = 0;
        }
    }
    sx_engine_unlock(e);
    return ok;
}

static void test_engine_cancel(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 64);
    REQUIRE(e != NULL);
    /* 100 > 64: some slots are at workers, the rest still queued. */
    sx_batch *b = mk_http_batch("SLOW", 100, NULL);
    REQUIRE(b != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    sleep_s(0.1);
    CHECK(sx_engine_wait(e, b, 0.0) == 0);
    sx_engine_lock(e);
    CHECK(b->done == 0);
    CHECK(b->in_flight > 0);
    sx_engine_unlock(e);

    double t = mono_now();
    sx_engine_cancel(e, b);
    int done = sx_engine_wait(e, b, 1.0);
    double took = mono_now() - t;
    CHECK(done == 1);
    CHECK(took < 1.0);
    CHECK(all_cancelled(e, b, "cancelled"));
    sx_engine_lock(e);
    CHECK(e->sched.in_flight == 0 && e->sched.queued == 0 && e->sched.heap_len == 0);
    CHECK(b->in_flight == 0);
    sx_engine_unlock(e);
    /* Cancelling again is harmless. */
    sx_engine_cancel(e, b);
    CHECK(all_cancelled(e, b, "cancelled"));

    /* Cancelling a batch whose slots wait in the retry heap ends them too. */
    sx_request_opts ro = e2e_opts();
    ro.backoff_base = 5;
    ro.backoff_cap = 5;
    enum { NR = 20 };
    char rbodies[NR][32];
    const char *rb[NR];
    size_t rl[NR];
    for (size_t i = 0; i < NR; i++) {
        snprintf(rbodies[i], sizeof rbodies[i], "FAIL-cancel-%zu", i);
        rb[i] = rbodies[i];
        rl[i] = strlen(rbodies[i]);
    }
    sx_batch *r = sx_batch_new(g_url, NULL, 0, rb, rl, NULL, NR, &ro);
    REQUIRE(r != NULL);
    CHECK(sx_engine_submit(e, r) == 0);
    size_t waiting = 0;
    for (int spin = 0; spin < 200 && waiting < NR / 2; spin++) {
        sleep_s(0.01);
        sx_engine_lock(e);
        waiting = e->sched.heap_len;
        sx_engine_unlock(e);
    }
    CHECK(waiting >= NR / 2);   /* 503'd once, now waiting up to 5 s to retry */
    t = mono_now();
    sx_engine_cancel(e, r);
    CHECK(sx_engine_wait(e, r, 1.0) == 1);
    CHECK(mono_now() - t < 1.0);
    sx_engine_lock(e);
    CHECK(e->sched.heap_len == 0);
    size_t cancelled = 0;
    for (size_t i = 0; i < NR; i++) {
        sx_slot *s = &r->slots[i];
        if (s->state == SX_CANCELLED && s->error_kind == SX_ERR_CANCELLED)
            cancelled++;
        else
            CHECK(s->state == SX_OK && s->attempts == 2);   /* its retry came up early */
    }
    CHECK(cancelled >= NR / 2 && r->done == NR);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, r);

    /* The engine still works after a cancellation. */
    sx_batch *ok = mk_http_batch("after-cancel", 20, NULL);
    REQUIRE(ok != NULL);
    CHECK(sx_engine_submit(e, ok) == 0);
    CHECK(sx_engine_wait(e, ok, 10.0) == 1);
    sx_engine_lock(e);
    CHECK(ok->ok == 20);
    sx_engine_unlock(e);

    sx_engine_release_batch(e, ok);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
}

static void test_engine_close_running(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 64);
    REQUIRE(e != NULL);
    /* A finished batch still referenced by the caller, and a running one. */
    sx_batch *fin = mk_http_batch("finished", 5, NULL);
    REQUIRE(fin != NULL);
    CHECK(sx_engine_submit(e, fin) == 0);
    CHECK(sx_engine_wait(e, fin, 10.0) == 1);

    sx_batch *b = mk_http_batch("SLOW", 100, NULL);
    REQUIRE(b != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    sleep_s(0.1);
    double t = mono_now();
    sx_engine_close(e);
    double took = mono_now() - t;
    CHECK(took < 1.0);
    CHECK(sx_engine_wait(e, b, 0.0) == 1);
    CHECK(all_cancelled(e, b, "engine was closed"));
    sx_engine_lock(e);
    CHECK(fin->ok == 5 && fin->cancelled == 0);   /* finished work is left alone */
    CHECK(e->stopping);
    sx_engine_unlock(e);

    /* Closed: no new work, close again is a no-op. */
    sx_batch *late = mk_http_batch("late", 3, NULL);
    REQUIRE(late != NULL);
    CHECK(sx_engine_submit(e, late) == -2);
    sx_batch_free(late);   /* never submitted: ours alone */
    sx_engine_close(e);

    sx_engine_release_batch(e, fin);
    sx_engine_release_batch(e, b);
    sx_engine_lock(e);
    CHECK(e->batches == NULL);
    sx_engine_unlock(e);
    sx_engine_free(e);
}

static void test_engine_release_running(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 64);
    REQUIRE(e != NULL);
    sx_batch *b = mk_http_batch("SLOW", 100, NULL);
    REQUIRE(b != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    sleep_s(0.1);
    double t = mono_now();
    sx_engine_release_batch(e, b);   /* b may be freed by a worker from here on */
    b = NULL;
    /* The workers finish the transfers they hold and the engine lets go of the batch. */
    int gone = 0;
    while (mono_now() - t < 1.0) {
        sx_engine_lock(e);
        gone = e->batches == NULL && e->sched.in_flight == 0 && e->sched.queued == 0;
        sx_engine_unlock(e);
        if (gone)
            break;
        sleep_s(0.005);
    }
    CHECK(gone);

    /* A batch released before it was ever waited on, while another keeps running. */
    sx_batch *keep = mk_http_batch("keep", 50, NULL);
    sx_batch *drop = mk_http_batch("SLOW", 10, NULL);
    REQUIRE(keep && drop);
    CHECK(sx_engine_submit(e, drop) == 0);
    CHECK(sx_engine_submit(e, keep) == 0);
    sx_engine_release_batch(e, drop);
    CHECK(sx_engine_wait(e, keep, 10.0) == 1);
    sx_engine_lock(e);
    CHECK(keep->ok == 50);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, keep);
    sx_engine_free(e);
}

static void test_engine_body_cap_and_timeout(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 64);
    REQUIRE(e != NULL);

    /* max_body: exactly at the cap is fine, one byte over fails (not retried). */
    sx_request_opts o = e2e_opts();
    o.max_body = 10;
    const char *bodies[] = {"0123456789", "0123456789A"};
    const size_t lens[] = {10, 11};
    sx_batch *b = sx_batch_new(g_url, NULL, 0, bodies, lens, NULL, 2, &o);
    REQUIRE(b != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 10.0) == 1);
    sx_engine_lock(e);
    CHECK(b->slots[0].state == SX_OK && b->slots[0].response_len == 10);
    CHECK(b->slots[1].state == SX_FAILED && b->slots[1].error_kind == SX_ERR_BODY_CAP);
    CHECK(b->slots[1].attempts == 1);
    CHECK(b->slots[1].error && strstr(b->slots[1].error, "max_body") != NULL);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, b);

    /* A per-attempt timeout: fails as TIMEOUT and cuts the adaptive window once. */
    o = e2e_opts();
    o.timeout = 0.3;
    o.max_retries = 0;
    const char *slow[] = {"SLOW-timeout"};
    const size_t slow_len[] = {12};
    sx_batch *t = sx_batch_new(g_url, NULL, 0, slow, slow_len, NULL, 1, &o);
    REQUIRE(t != NULL);
    double t0 = mono_now();
    CHECK(sx_engine_submit(e, t) == 0);
    CHECK(sx_engine_wait(e, t, 5.0) == 1);
    double took = mono_now() - t0;
    CHECK(took >= 0.25 && took < 1.5);
    sx_engine_lock(e);
    CHECK(t->slots[0].state == SX_FAILED && t->slots[0].error_kind == SX_ERR_TIMEOUT);
    CHECK(e->sched.stats.timeouts == 1 && e->sched.stats.window_cuts == 1);
    CHECK(sx_sched_window(&e->sched) == 32);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, t);
    sx_engine_free(e);
}

static void test_engine_abort_on_401(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 64);
    REQUIRE(e != NULL);
    /* Request 0 gets a 401 at once; the others are in flight (SLOW) or still queued. */
    enum { N = 80 };
    char text[N][32];
    const char *all[N];
    size_t lens[N];
    for (size_t i = 0; i < N; i++) {
        snprintf(text[i], sizeof text[i], i == 0 ? "AUTH-please" : "SLOW-abort-%zu", i);
        all[i] = text[i];
        lens[i] = strlen(text[i]);
    }
    sx_request_opts o = e2e_opts();
    sx_batch *a = sx_batch_new(g_url, NULL, 0, all, lens, NULL, N, &o);
    REQUIRE(a != NULL);
    double t0 = mono_now();
    CHECK(sx_engine_submit(e, a) == 0);
    CHECK(sx_engine_wait(e, a, 1.5) == 1);
    CHECK(mono_now() - t0 < 1.5);   /* well before the 2 s SLOW answers */
    sx_engine_lock(e);
    sx_slot *s0 = &a->slots[0];
    CHECK(s0->state == SX_FAILED && s0->error_kind == SX_ERR_AUTH && s0->http_status == 401);
    CHECK(s0->attempts == 1);
    CHECK(s0->response_len == strlen(AUTH_BODY) && s0->response &&
          memcmp(s0->response, AUTH_BODY, strlen(AUTH_BODY)) == 0);
    size_t aborted = 0;
    for (size_t i = 1; i < N; i++) {
        sx_slot *s = &a->slots[i];
        if (s->state == SX_FAILED && s->error_kind == SX_ERR_ABORTED && s->error &&
            strstr(s->error, "request 0 of this batch failed"))
            aborted++;
    }
    CHECK(aborted == N - 1);
    CHECK(a->failed == N && a->ok == 0);
    CHECK(e->sched.in_flight == 0 && e->sched.queued == 0);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, a);
    sx_engine_free(e);
}

static void test_engine_eventfd(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(1, 8);
    REQUIRE(e != NULL);
    sx_batch *b = mk_http_batch("efd", 30, NULL);
    REQUIRE(b != NULL);
    sx_engine_lock(e);
    int fd = sx_batch_fileno(b);
    sx_engine_unlock(e);
    REQUIRE(fd >= 0);
    CHECK(sx_engine_submit(e, b) == 0);
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int ready = 0;
    double t0 = mono_now();
    while (mono_now() - t0 < 10.0) {
        if (poll(&pfd, 1, 100) == 1) {
            sx_engine_lock(e);
            int done = b->done == b->n;
            sx_batch_clear_notify(b);
            sx_engine_unlock(e);
            if (done) {
                ready = 1;
                break;
            }
        }
    }
    CHECK(ready);
    CHECK(poll(&pfd, 1, 0) == 0);   /* cleared */
    CHECK(sx_engine_wait(e, b, 0) == 1);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
}

static void test_engine_429_cooldown(void)
{
    REQUIRE(g_srv_ok);
    /* One request at a time, so the order of events is fixed. */
    sx_engine *e = mk_engine(1, 1);
    REQUIRE(e != NULL);
    const char *bodies[] = {"RATE-limited-once", "after-1", "after-2"};
    const size_t lens[] = {strlen(bodies[0]), 7, 7};
    sx_request_opts o = e2e_opts();
    sx_batch *b = sx_batch_new(g_url, NULL, 0, bodies, lens, NULL, 3, &o);
    REQUIRE(b != NULL);
    double t0 = mono_now();
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 10.0) == 1);
    double took = mono_now() - t0;
    CHECK(took >= 0.3 && took < 3.0);
    sx_engine_lock(e);
    CHECK(b->ok == 3);
    sx_slot *r = &b->slots[0];
    CHECK(r->attempts == 2 && r->http_status == 200);
    CHECK(r->response_len == lens[0] && memcmp(r->response, bodies[0], lens[0]) == 0);
    /* The 429's Retry-After-Ms (parsed from the real response headers) held everyone back. */
    CHECK(b->slots[1].first_sent - r->first_sent >= 0.3);
    CHECK(r->latency >= 0.3);
    CHECK(b->http_429 == 1 && b->retries == 1);
    CHECK(e->sched.stats.http_429 == 1 && e->sched.stats.cooldowns >= 1);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
}

static void test_engine_rpm_paced(void)
{
    REQUIRE(g_srv_ok);
    sx_engine_opts eo;
    memset(&eo, 0, sizeof eo);
    eo.own_http1 = own_http1();
    eo.workers = 2;
    eo.sched.max_in_flight = 64;
    eo.sched.rpm = 6000;    /* 100/s, burst 100 */
    eo.sched.adaptive = 1;
    eo.sched.queue_limit = 1000;
    char err[256] = "";
    sx_engine *e = sx_engine_new(&eo, err, sizeof err);
    REQUIRE(e != NULL);
    sx_batch *b = mk_http_batch("paced", 150, NULL);
    REQUIRE(b != NULL);
    double t0 = mono_now();
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 10.0) == 1);
    double took = mono_now() - t0;
    /* 100 at once, then 50 more at 100/s: about half a second, driven by wake_at alone. */
    CHECK(took >= 0.45 && took < 3.0);
    sx_engine_lock(e);
    CHECK(b->ok == 150);
    double last = 0;
    for (size_t i = 0; i < 150; i++)
        if (b->slots[i].first_sent - t0 > last)
            last = b->slots[i].first_sent - t0;
    CHECK(last >= 0.45);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
}

/* The module's default is http2=1; over plain http:// that must still be fast HTTP/1.1. */
static void test_engine_http2_option_on_plain_http(void)
{
    REQUIRE(g_srv_ok);
    sx_engine_opts eo;
    memset(&eo, 0, sizeof eo);
    eo.own_http1 = own_http1();
    eo.workers = 2;
    eo.sched.max_in_flight = 32;
    eo.sched.adaptive = 1;
    eo.sched.queue_limit = 1000;
    eo.http2 = 1;
    char err[256] = "";
    sx_engine *e = sx_engine_new(&eo, err, sizeof err);
    REQUIRE(e != NULL);
    char **bodies = NULL;
    sx_batch *b = mk_http_batch("h2opt", 200, &bodies);
    REQUIRE(b != NULL && bodies != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 20.0) == 1);
    sx_engine_lock(e);
    CHECK(b->ok == 200);
    for (size_t i = 0; i < 200; i++)
        CHECK(b->slots[i].response_len == strlen(bodies[i]) &&
              memcmp(b->slots[i].response, bodies[i], b->slots[i].response_len) == 0);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
    free_bodies(bodies, 200);
}

/* Regression: sx_engine_new once started each worker before counting it in e->nworkers, so
 * a worker could divide by nworkers == 0 in admit() (SIGFPE) and TSan saw a data race
 * (fixed in bb120fb: threads start only after all workers exist). */
static void test_engine_new_free_churn(void)
{
    for (int i = 0; i < 200; i++) {
        sx_engine_opts eo;
        memset(&eo, 0, sizeof eo);
    eo.own_http1 = own_http1();
        eo.workers = 4;
        eo.sched.max_in_flight = 64;
        eo.sched.queue_limit = 100;
        char err[256] = "";
        sx_engine *e = sx_engine_new(&eo, err, sizeof err);
        REQUIRE(e != NULL);
        if (i % 2) {
            /* and once in a while with an empty batch, the cheapest round trip */
            sx_request_opts o = req_opts();
            sx_batch *b = sx_batch_new("http://127.0.0.1:9/", NULL, 0, NULL, NULL, NULL, 0, &o);
            REQUIRE(b != NULL);
            CHECK(sx_engine_submit(e, b) == 0);
            CHECK(sx_engine_wait(e, b, 0) == 1);
            sx_engine_release_batch(e, b);
        }
        sx_engine_free(e);
    }
}

/* ------------------------------------------------------------------ regressions
 *
 * Each of these failed (or crashed, hung) against an earlier csrc/; they found the bugs
 * and now keep them fixed: a retry stuck behind a capped batch at the heap top, a worker
 * spinning on it, a non-numeric Retry-After ("inf") stalling a batch forever, and a lost
 * wake-up that made sx_engine_close hang. Crashing and hanging cases run in a forked
 * child, so they are reported as failures rather than stopping the run. */

/* Run fn in a child process with a time limit; returns the wait status. */
static int run_in_child(void (*fn)(void), unsigned seconds)
{
#if defined(__SANITIZE_THREAD__)
    /* TSan cannot start threads after a multi-threaded fork: run in-process; the watchdog
     * still turns a hang into a failure. */
    (void)seconds;
    unsigned long before = g_failures;
    fn();
    return g_failures == before ? 0 : (1 << 8);
#else
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        g_failures = 0;   /* count the child's own failures only */
        alarm(seconds);
        fn();
        _exit(g_failures ? 1 : 0);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    return status;
#endif
}

static void describe_status(const char *what, int status)
{
    if (WIFSIGNALED(status))
        fprintf(stderr, "  %s: child killed by signal %d (%s)\n", what, WTERMSIG(status),
                strsignal(WTERMSIG(status)));
    else if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
        fprintf(stderr, "  %s: child exited with %d\n", what, WEXITSTATUS(status));
}

/* sched.c:163-170 (sx_sched_take): only the heap top is considered. When the top retry is due but its batch
 * is at its own max_in_flight, a due retry of another batch behind it is not handed out, and
 * *wake_at is set to the top's due time, which is already in the past. */
static void test_bug_sched_retry_head_of_line(void)
{
    sx_sched s;
    sx_sched_opts so = sched_opts(10);
    sx_sched_init(&s, &so, T0);
    sx_rng rng;
    sx_rng_seed(&rng, 11);
    sx_request_opts capped = req_opts();
    capped.max_in_flight = 1;
    capped.backoff_base = 0.5;
    capped.backoff_cap = 0.5;
    sx_request_opts plain = capped;
    plain.max_in_flight = 0;
    sx_batch *a = mk_batch("a", 2, NULL, &capped);
    sx_batch *b = mk_batch("b", 1, NULL, &plain);
    REQUIRE(a && b);
    REQUIRE(sx_sched_push_batch(&s, a) == 0);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[8];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 8, T0, &wake) == 2);   /* a0, b0 */
    const char *one[] = {"Retry-After: 1\r\n", NULL};
    const char *two[] = {"Retry-After: 2\r\n", NULL};
    sx_attempt at;
    mk_attempt(&at, CURLE_OK, 503, one);
    REQUIRE(sx_sched_outcome(&s, &a->slots[0], &at, &rng, T0) == SX_V_RETRY);
    mk_attempt(&at, CURLE_OK, 503, two);
    REQUIRE(sx_sched_outcome(&s, &b->slots[0], &at, &rng, T0) == SX_V_RETRY);
    REQUIRE(sx_sched_take(&s, out, 8, T0 + 0.5, &wake) == 1);   /* a1: a is at its cap */
    REQUIRE(out[0] == &a->slots[1]);

    /* At T0+3 both retries are due; a's must wait for a1, b's may go. */
    wake = -1;
    size_t n = sx_sched_take(&s, out, 8, T0 + 3, &wake);
    CHECK(n == 1 && out[0] == &b->slots[0]);
    CHECK(wake < 0 || wake > T0 + 3);   /* never "wake me at a time already past" */
    if (wake >= 0 && wake <= T0 + 3)
        fprintf(stderr, "  take returned %zu, wake_at = now %+.3f s\n", n, wake - (T0 + 3));
    sx_sched_destroy(&s);
    sx_batch_free(a);
    sx_batch_free(b);
}

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The same head-of-line case end to end: the wake_at in the past makes the worker's
 * epoll_wait timeout 0 (worker.c:425-432), so it spins on a core until the capped batch's
 * slow request returns. */
static void test_bug_worker_spins_on_capped_retry(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(1, 8);
    REQUIRE(e != NULL);
    sx_request_opts o = e2e_opts();
    o.max_in_flight = 1;
    o.backoff_base = 0.2;
    o.backoff_cap = 0.2;
    const char *bodies[] = {"FAIL-hol-spin", "SLOW-hol-spin"};
    const size_t lens[] = {13, 13};
    sx_batch *b = sx_batch_new(g_url, NULL, 0, bodies, lens, NULL, 2, &o);
    REQUIRE(b != NULL);
    double cpu0 = cpu_seconds(), t0 = mono_now();
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 10.0) == 1);
    double cpu = cpu_seconds() - cpu0, wall = mono_now() - t0;
    fprintf(stderr, "  2 requests, 1 retry: %.2f s wall, %.2f s CPU\n", wall, cpu);
    CHECK(cpu < 0.25 * wall);
    sx_engine_lock(e);
    CHECK(b->ok == 2);
    sx_engine_unlock(e);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
}

/* hints.c:96-98 (parse_retry_after; and sx_parse_duration, hints.c:36): strtod accepts "inf", "1e999",
 * "0x10"; RFC 9110 delay-seconds is 1*DIGIT. "Retry-After: inf" becomes an infinite delay:
 * with a 429 the cool-down and the slot's due time become +inf and the batch never ends. */
static void test_bug_retry_after_not_digits(void)
{
    sx_hints h;
    sx_hints_reset(&h);
    sx_hints_feed(&h, "Retry-After: inf\r\n", 18, 1700000000.0);
    CHECK(h.retry_after < 0 || isfinite(h.retry_after));
    sx_hints_reset(&h);
    sx_hints_feed(&h, "Retry-After: 1e999\r\n", 20, 1700000000.0);
    CHECK(h.retry_after < 0 || isfinite(h.retry_after));
    CHECK(isfinite(sx_parse_duration("1e999s", 6)));
    sx_hints_reset(&h);
    sx_hints_feed(&h, "Retry-After: 0x10\r\n", 19, 1700000000.0);
    CHECK(h.retry_after < 0);
}

/* worker.c:398-404: drain_wakefd clears wake_pending *before* reading the eventfd (and
 * sx_worker_wake, worker.c:558-565, skips its write while wake_pending is set). A
 * sx_worker_wake() landing between the two sets wake_pending = 1 and writes the eventfd; the
 * read then swallows that write. From then on wake_pending stays 1 with the eventfd empty,
 * so every later sx_worker_wake() is a no-op: the worker sleeps in epoll_wait(-1) when idle
 * and never sees new batches, cancellations or shutdown (sx_engine_close hangs in join).
 * Each worker wakes the others after every reap while work is queued, so the window is hit
 * under load. */
static volatile sig_atomic_t g_churn_iter;

static void on_churn_alarm(int sig)
{
    (void)sig;
    char msg[96];
    int n = snprintf(msg, sizeof msg, "  hung after %d engines closed cleanly\n",
                     (int)g_churn_iter);
    if (n > 0) {
        ssize_t w = write(2, msg, (size_t)n);
        (void)w;
    }
    _exit(5);
}

static void churn_wakeups(void)
{
    signal(SIGALRM, on_churn_alarm);
    double t0 = mono_now();
    int iter = 0;
    while (mono_now() - t0 < 10.0) {
        sx_engine *e = mk_engine(3, 3);
        if (!e)
            _exit(3);
        sx_batch *b = mk_http_batch("wake", 300, NULL);
        if (!b || sx_engine_submit(e, b) != 0)
            _exit(3);
        if (sx_engine_wait(e, b, 20.0) != 1) {
            fprintf(stderr, "  iteration %d: batch did not finish\n", iter);
            _exit(4);
        }
        sx_engine_release_batch(e, b);
        sx_engine_free(e);   /* hangs when a worker lost its wake-up */
        iter++;
        g_churn_iter = iter;
    }
    fprintf(stderr, "  %d engines closed cleanly\n", iter);
}

static void test_bug_lost_wakeup(void)
{
    REQUIRE(g_srv_ok);
    int status = run_in_child(churn_wakeups, 20);
    describe_status("engine churn with cross-worker wake-ups", status);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 5)
        fprintf(stderr, "  (the child hung: a worker never woke for sx_engine_close)\n");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* ------------------------------------------------------------------ main */

/* Watchdog: a hang (say, a worker that never wakes for sx_engine_close) must fail the run
 * with the test's name rather than stall CI. SX_TEST_TIMEOUT=<seconds> (default 120). */
static _Atomic(const char *) g_current_test;
static pthread_mutex_t g_dog_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_dog_cv;
static int g_dog_done;

static void *watchdog_main(void *arg)
{
    double limit = *(const double *)arg;
    struct timespec ts;
    double until = mono_now() + limit;
    ts.tv_sec = (time_t)until;
    ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
    pthread_mutex_lock(&g_dog_mu);
    int rc = 0;
    while (!g_dog_done && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&g_dog_cv, &g_dog_mu, &ts);
    int done = g_dog_done;
    pthread_mutex_unlock(&g_dog_mu);
    if (!done) {
        const char *name = atomic_load(&g_current_test);
        fprintf(stderr, "TIMEOUT: still running %s after %.1f s (hung?)\n",
                name ? name : "(setup)", limit);
        fflush(stderr);
        _exit(3);
    }
    return NULL;
}

typedef struct test_case {
    const char *name;
    void (*fn)(void);
} test_case;

/* ---------------------------------------------------------------- native answer readers */

static int native_parse_str(int dialect, const char *json, sx_chat *c, char *copy, size_t cap)
{
    size_t n = strlen(json);
    if (n >= cap)
        return -1;
    memcpy(copy, json, n + 1);
    return sx_answer_parse(dialect, copy, n, c);
}

#define CONTENT_IS(c, buf, lit) \
    ((c).content_len == sizeof(lit) - 1 && memcmp((buf) + (c).content_off, lit, sizeof(lit) - 1) == 0)
#define FINISH_IS(c, buf, lit) \
    ((c).finish_len == sizeof(lit) - 1 && memcmp((buf) + (c).finish_off, lit, sizeof(lit) - 1) == 0)

static void test_native_readers(void)
{
    char buf[1024];
    sx_chat c;
    const int A = SX_DIALECT_ANTHROPIC, G = SX_DIALECT_GEMINI;

    /* Anthropic: text blocks joined, thinking skipped, usage with cache tokens. */
    CHECK(native_parse_str(A, "{\"id\":\"m\",\"content\":[{\"type\":\"thinking\",\"thinking\":"
          "\"hm\"},{\"text\":\"a\\u00e9\",\"type\":\"text\"},{\"type\":\"text\",\"text\":"
          "\"\\nb\"}],\"stop_reason\":\"end_turn\",\"usage\":{\"input_tokens\":3,"
          "\"cache_creation_input_tokens\":4,\"cache_read_input_tokens\":5,\"output_tokens\":"
          "7}}", &c, buf, sizeof buf) == SX_CHAT_PARSED);
    CHECK(CONTENT_IS(c, buf, "a\xc3\xa9\nb") && FINISH_IS(c, buf, "end_turn"));
    CHECK(c.prompt_tokens == 12 && c.completion_tokens == 7 && c.total_tokens == 19);
    /* A forced tool: its input as raw JSON, whatever text surrounds it. */
    CHECK(native_parse_str(A, "{\"content\":[{\"type\":\"text\",\"text\":\"x\"},{\"type\":"
          "\"tool_use\",\"name\":\"t\",\"input\": {\"a\": [1, \"\\u00e9\"]} },{\"type\":"
          "\"tool_use\",\"input\":{}}],\"stop_reason\":\"tool_use\"}", &c, buf, sizeof buf)
          == SX_CHAT_PARSED);
    CHECK(CONTENT_IS(c, buf, "{\"a\": [1, \"\\u00e9\"]}") && FINISH_IS(c, buf, "tool_use"));
    CHECK(c.total_tokens == 0);
    /* No text at all: null content (a refusal). */
    CHECK(native_parse_str(A, "{\"content\":[],\"stop_reason\":\"refusal\",\"usage\":null}", &c,
                           buf, sizeof buf) == SX_CHAT_PARSED);
    CHECK(c.content_null && FINISH_IS(c, buf, "refusal"));

    /* Gemini: parts joined, thoughts left out, usage mapped. */
    CHECK(native_parse_str(G, "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"t\","
          "\"thought\":true},{\"text\":\"he\"},{\"thought\":false,\"text\":\"llo\"},{"
          "\"functionCall\":{}}],\"role\":\"model\"},\"finishReason\":\"STOP\"},{\"x\":1}],"
          "\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":2,"
          "\"thoughtsTokenCount\":3,\"totalTokenCount\":10}}", &c, buf, sizeof buf)
          == SX_CHAT_PARSED);
    CHECK(CONTENT_IS(c, buf, "hello") && FINISH_IS(c, buf, "STOP"));
    CHECK(c.prompt_tokens == 5 && c.completion_tokens == 5 && c.total_tokens == 10);
    /* A blocked candidate: no content, its finish reason. */
    CHECK(native_parse_str(G, "{\"candidates\":[{\"finishReason\":\"SAFETY\",\"safetyRatings\""
          ":[]}]}", &c, buf, sizeof buf) == SX_CHAT_PARSED);
    CHECK(c.content_null && FINISH_IS(c, buf, "SAFETY"));

    /* Fallbacks: left to Python's reader, buffer untouched. */
    const char *fallbacks_a[] = {
        "{\"stop_reason\":\"end_turn\"}",                          /* no content */
        "{\"content\":null}",
        "{\"content\":[{\"text\":\"x\"}]}",                      /* a block without a type */
        "{\"content\":[{\"type\":\"text\"}]}",                   /* a text block, no text */
        "{\"content\":[{\"type\":\"text\",\"text\":5}]}",
        "{\"content\":[{\"type\":\"te\\u0078t\",\"text\":\"x\"}]}",  /* escaped type */
        "{\"content\":[],\"content\":[]}",                         /* duplicate key */
        "{\"content\":[{\"type\":\"text\",\"text\":\"a\",\"text\":\"b\"}]}",
        "{\"content\":[\"x\"]}",
        "{\"content\":[],\"usage\":{\"input_tokens\":1.5}}",
        "{\"content\":[],\"usage\":{\"output_tokens\":-1}}",
        "{\"content\":[]} x",
        "[]",
    };
    for (size_t i = 0; i < sizeof fallbacks_a / sizeof fallbacks_a[0]; i++) {
        CHECK(native_parse_str(A, fallbacks_a[i], &c, buf, sizeof buf) == SX_CHAT_FALLBACK);
        CHECK(strcmp(buf, fallbacks_a[i]) == 0 && c.parsed == SX_CHAT_FALLBACK);
    }
    const char *fallbacks_g[] = {
        "{\"promptFeedback\":{\"blockReason\":\"SAFETY\"}}",     /* no candidate */
        "{\"candidates\":[]}",
        "{\"candidates\":[{\"content\":null}]}",
        "{\"candidates\":[{\"content\":{\"parts\":{}}}]}",
        "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":1}]}}]}",
        "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\",\"thought\":1}]}}]}",
        "{\"candidates\":[{\"finishReason\":5}]}",
        "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"\\ud800\"}]}}]}",
    };
    for (size_t i = 0; i < sizeof fallbacks_g / sizeof fallbacks_g[0]; i++) {
        CHECK(native_parse_str(G, fallbacks_g[i], &c, buf, sizeof buf) == SX_CHAT_FALLBACK);
        CHECK(strcmp(buf, fallbacks_g[i]) == 0);
    }
    /* More pieces than SX_NATIVE_MAX_PARTS fall back; exactly that many are joined. */
    for (int n = SX_NATIVE_MAX_PARTS; n <= SX_NATIVE_MAX_PARTS + 1; n++) {
        size_t len = (size_t)snprintf(buf, sizeof buf, "{\"candidates\":[{\"content\":{\"parts\":[");
        for (int i = 0; i < n; i++)
            len += (size_t)snprintf(buf + len, sizeof buf - len, "%s{\"text\":\"\\u0041\"}",
                                    i ? "," : "");
        len += (size_t)snprintf(buf + len, sizeof buf - len, "]}}]}");
        int rc = sx_answer_parse(G, buf, len, &c);
        CHECK(rc == (n == SX_NATIVE_MAX_PARTS ? SX_CHAT_PARSED : SX_CHAT_FALLBACK));
        if (rc == SX_CHAT_PARSED)
            CHECK(c.content_len == (uint32_t)n && buf[c.content_off] == 'A' &&
                  buf[c.content_off + n - 1] == 'A');
    }
    /* Unknown dialects are never read. */
    CHECK(native_parse_str(0, "{\"content\":[]}", &c, buf, sizeof buf) == SX_CHAT_FALLBACK);
    CHECK(native_parse_str(9, "{\"content\":[]}", &c, buf, sizeof buf) == SX_CHAT_FALLBACK);
}

/* ---------------------------------------------------------------- chat answer reader */

static int chat_parse_str(const char *json, sx_chat *c, char *copy, size_t cap)
{
    size_t n = strlen(json);
    if (n >= cap)
        return -1;
    memcpy(copy, json, n + 1);
    return sx_chat_parse(copy, n, c);
}

static void test_chat_reader(void)
{
    char buf[512];
    sx_chat c;
    const char *good = "{\"id\":\"x\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                       "\"content\":\"a\\\"b\\\\c\\n\\u00e9\\ud83d\\ude00\"},\"finish_reason\":"
                       "\"stop\"}],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,"
                       "\"total_tokens\":15}}";
    CHECK(chat_parse_str(good, &c, buf, sizeof buf) == SX_CHAT_PARSED);
    CHECK(c.parsed == SX_CHAT_PARSED && !c.content_null && !c.finish_null);
    CHECK(c.content_len == 12 && memcmp(buf + c.content_off, "a\"b\\c\n\xc3\xa9\xf0\x9f\x98\x80", 12) == 0);
    CHECK(c.finish_len == 4 && memcmp(buf + c.finish_off, "stop", 4) == 0);
    CHECK(c.prompt_tokens == 12 && c.completion_tokens == 3 && c.total_tokens == 15);

    CHECK(chat_parse_str("{\"choices\":[{\"message\":{\"content\":null}}]}", &c, buf,
                         sizeof buf) == SX_CHAT_PARSED);
    CHECK(c.content_null && c.finish_null && c.total_tokens == 0);

    /* left to json.loads; the buffer must come back untouched */
    const char *fallbacks[] = {
        "", "   ", "[]", "{}", "{\"choices\":[]}", "{\"choices\":{}}",
        "{\"choices\":[{\"message\":{}}]}",
        "{\"choices\":[{\"message\":{\"content\":1}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"\\ud800\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\\q\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\tb\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"\xed\xa0\x80\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"\xc0\xaf\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\\u00e\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"choices\":[]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"usage\":{\"total_tokens\":-1}}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"usage\":{\"total_tokens\":1.0}}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"x\":NaN}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"x\":01}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"x\":1.}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"x\":[1,]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}]} x",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}]}{}",
        "{\"ch\\u006fices\":[{\"message\":{\"content\":\"a\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"x\":tru}",
    };
    for (size_t i = 0; i < sizeof fallbacks / sizeof *fallbacks; i++) {
        int rc = chat_parse_str(fallbacks[i], &c, buf, sizeof buf);
        CHECK(rc == SX_CHAT_FALLBACK && !c.parsed);
        CHECK(strcmp(buf, fallbacks[i]) == 0);
        if (rc != SX_CHAT_FALLBACK)
            fprintf(stderr, "    parsed what should fall back: %s\n", fallbacks[i]);
    }

    /* deep nesting falls back instead of recursing without bound */
    char deep[400];
    size_t k = 0;
    k += (size_t)snprintf(deep, sizeof deep, "{\"choices\":[{\"message\":{\"content\":\"a\"}}],\"d\":");
    for (int d = 0; d < 100; d++)
        deep[k++] = '[';
    for (int d = 0; d < 100; d++)
        deep[k++] = ']';
    deep[k++] = '}';
    deep[k] = '\0';
    CHECK(chat_parse_str(deep, &c, buf, sizeof buf) == SX_CHAT_FALLBACK);

    /* every strict prefix of a good answer falls back, reading nothing past its end (the
     * copy is exactly as long as the prefix, so ASan catches an overread) */
    size_t n = strlen(good);
    for (size_t len = 0; len < n; len++) {
        char *copy = malloc(len ? len : 1);
        memcpy(copy, good, len);
        CHECK(sx_chat_parse(copy, len, &c) == SX_CHAT_FALLBACK);
        free(copy);
    }

    /* random mutations: never crash, never read out of bounds, and a parse that succeeds
     * yields spans inside the buffer */
    sx_rng rng;
    sx_rng_seed(&rng, 7);
    for (int round = 0; round < 20000; round++) {
        char *copy = malloc(n);
        memcpy(copy, good, n);
        int edits = 1 + (int)(sx_rng_uniform(&rng) * 4);
        for (int e = 0; e < edits; e++)
            copy[(size_t)(sx_rng_uniform(&rng) * (double)n)] = (char)(int)(sx_rng_uniform(&rng) * 256);
        size_t len = n - (size_t)(sx_rng_uniform(&rng) * 3);
        if (sx_chat_parse(copy, len, &c) == SX_CHAT_PARSED) {
            CHECK(c.content_null || (size_t)c.content_off + c.content_len <= len);
            CHECK(c.finish_null || (size_t)c.finish_off + c.finish_len <= len);
        }
        free(copy);
    }
}


/* ------------------------------------------------------------------ event streams (sse.h) */


/* ------------------------------------------------------------------ several deployments */

static sx_sched_opts deploy_sched_opts(int max_in_flight, const sx_deploy_opts *d, size_t n)
{
    sx_sched_opts o = sched_opts(max_in_flight);
    o.deploys = d;
    o.ndeploys = n;
    return o;
}

/* Admit what the scheduler gives at each step of 1/64 s for `seconds`, every attempt
 * answered OK at once; count the admissions per deployment. */
static void run_deploys(sx_sched *s, sx_batch *b, double t0, double seconds, size_t *count)
{
    sx_rng rng;
    sx_rng_seed(&rng, 11);
    sx_slot *out[256];
    for (double t = t0; t < t0 + seconds; t += 1.0 / 64) {
        double wake = -1;
        size_t n = sx_sched_take(s, out, 256, t, &wake);
        for (size_t i = 0; i < n; i++) {
            count[out[i]->deploy]++;
            finish_ok(s, out[i], &rng, t);
        }
        if (b->next_unsent == b->n)
            break;
    }
}

static void test_sched_deploy_tpm_settle(void)
{
    /* With deployments, a settlement refunds the deployment's tpm bucket as well as the
     * scheduler's (both were charged), and a remaining-tokens header seeds the bucket of the
     * deployment that sent it, less what is in flight there. */
    sx_deploy_opts d[2] = {{.tpm = 60000, .weight = 1}, {.tpm = 60000, .weight = 1}};
    sx_sched_opts so = deploy_sched_opts(64, d, 2);
    so.tpm = 120000;   /* 2000/s for the sum */
    so.settle_tokens = 1;
    sx_sched s;
    REQUIRE(sx_sched_init(&s, &so, T0) == 0);
    sx_request_opts ro = req_opts();
    const double tokens[] = {400, 400, 400};
    sx_batch *b = mk_batch("d", 3, tokens, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[4];
    double wake = -1;
    size_t n = sx_sched_take(&s, out, 3, T0, &wake);
    REQUIRE(n == 3);
    sx_slot *first = out[0];
    int k = first->deploy;
    sx_deploy *dk = &s.deploy[k];
    double held = dk->tokens_in_flight;            /* 400 or 800: the others sent there */
    CHECK(held >= 400 && s.tokens_in_flight == 1200);
    double level_s = s.tpm.tokens, level_d = dk->tpm.tokens;
    sx_rng rng;
    sx_rng_seed(&rng, 1);
    sx_attempt a;
    mk_ok_usage(&a, 100, NULL);
    CHECK(sx_sched_outcome(&s, first, &a, &rng, T0) == SX_V_OK);
    CHECK(s.tpm.tokens == level_s + 300 && dk->tpm.tokens == level_d + 300);
    CHECK(dk->tokens_in_flight == held - 400 && s.tokens_in_flight == 800);
    /* the next answer from that deployment (if any) or the other seeds its own bucket */
    sx_slot *second = out[1];
    sx_deploy *d2 = &s.deploy[second->deploy];
    static const char *const rem[] = {"x-ratelimit-remaining-tokens: 700", NULL};
    mk_ok_usage(&a, 100, rem);
    double s_before = s.tpm.tokens;
    CHECK(sx_sched_outcome(&s, second, &a, &rng, T0) == SX_V_OK);
    CHECK(d2->tpm_seeded && !s.tpm_seeded);
    CHECK(d2->tpm.tokens == 700 - d2->tokens_in_flight);
    CHECK(s.tpm.tokens == s_before + 300);         /* the sum's bucket is only settled */
    finish_ok(&s, out[2], &rng, T0);
    CHECK(s.tokens_in_flight == 0 && s.deploy[0].tokens_in_flight == 0 &&
          s.deploy[1].tokens_in_flight == 0);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_deploy_split_by_limits(void)
{
    /* Both limited (10/s and 20/s), more work than they take: each gets its own rate. */
    sx_deploy_opts d[2] = {{.rpm = 600, .weight = 600}, {.rpm = 1200, .weight = 1200}};
    sx_sched_opts so = deploy_sched_opts(64, d, 2);
    sx_sched s;
    REQUIRE(sx_sched_init(&s, &so, T0) == 0);
    CHECK(s.ndeploy == 2 && s.opts.deploys == NULL);
    sx_request_opts ro = req_opts();
    sx_batch *b = mk_batch("d", 100000, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    size_t count[2] = {0, 0};
    run_deploys(&s, b, T0, 20.0, count);
    /* 20 s at 10/s and 20/s, plus what the buckets held at first */
    CHECK(count[0] >= 195 && count[0] <= 212);
    CHECK(count[1] >= 395 && count[1] <= 422);
    CHECK(s.deploy[0].stats.admitted == count[0] && s.deploy[1].stats.ok == count[1]);
    CHECK(s.in_flight == 0 && s.deploy[0].in_flight == 0 && s.deploy[1].in_flight == 0);
    sx_sched_destroy(&s);
    sx_batch_free(b);

    /* Nothing binds (no limits, answers at once): the traffic splits by weight. */
    sx_deploy_opts w[3] = {{.weight = 1}, {.weight = 3}, {.weight = 0 /* -> 1 */}};
    so = deploy_sched_opts(10, w, 3);
    REQUIRE(sx_sched_init(&s, &so, T0) == 0);
    CHECK(s.deploy[2].opts.weight == 1.0 && s.deploy[0].opts.max_in_flight == 10);
    b = mk_batch("w", 5000, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    /* Slots stay in flight one step, so loads differ; the window is the engine's cap. */
    sx_rng rng;
    sx_rng_seed(&rng, 12);
    size_t c3[3] = {0, 0, 0};
    sx_slot *held[64];
    size_t nheld = 0;
    for (int step = 0; step < 2000 && b->done < b->n; step++) {
        double t = T0 + step / 64.0;
        for (size_t i = 0; i < nheld; i++) {
            finish_ok(&s, held[i], &rng, t);
        }
        double wake = -1;
        nheld = sx_sched_take(&s, held, 64, t, &wake);
        CHECK(nheld <= 10);
        for (size_t i = 0; i < nheld; i++)
            c3[held[i]->deploy]++;
    }
    CHECK(b->done == b->n);
    double total = (double)(c3[0] + c3[1] + c3[2]);
    CHECK_NEAR(c3[1] / total, 0.6, 0.05);
    CHECK_NEAR(c3[0] / total, 0.2, 0.05);
    CHECK_NEAR(c3[2] / total, 0.2, 0.05);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_deploy_429_drains_to_others(void)
{
    sx_deploy_opts d[2] = {{.weight = 1}, {.weight = 1}};
    sx_sched_opts so = deploy_sched_opts(8, d, 2);
    sx_sched s;
    REQUIRE(sx_sched_init(&s, &so, T0) == 0);
    sx_rng rng;
    sx_rng_seed(&rng, 13);
    sx_request_opts ro = req_opts();
    sx_batch *b = mk_batch("q", 40, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[16];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 2, T0, &wake) == 2);
    CHECK(out[0]->deploy != out[1]->deploy);   /* ties go round */
    sx_slot *on0 = out[0]->deploy == 0 ? out[0] : out[1];
    sx_slot *on1 = on0 == out[0] ? out[1] : out[0];

    /* Deployment 0 says: wait 5 s. Only it waits. */
    const char *hdrs[] = {"HTTP/1.1 429 Too Many Requests\r\n", "Retry-After: 5\r\n", NULL};
    sx_attempt at;
    mk_attempt(&at, CURLE_OK, 429, hdrs);
    CHECK(sx_sched_outcome(&s, on0, &at, &rng, T0 + 0.1) == SX_V_RETRY);
    CHECK(s.deploy[0].cooldown_until >= T0 + 5.1 - EPS && s.cooldown_until <= T0);
    CHECK(s.deploy[0].stats.http_429 == 1 && s.deploy[0].stats.failed == 0);
    CHECK(on0->due <= T0 + 0.1 + ro.backoff_base + EPS);  /* not the 5 s: it may go elsewhere */
    finish_ok(&s, on1, &rng, T0 + 0.1);

    /* Everything, the retry first, goes to deployment 1 while 0 cools down. */
    size_t n = sx_sched_take(&s, out, 16, T0 + 1.0, &wake);
    CHECK(n == 8);
    CHECK(out[0] == on0);
    for (size_t i = 0; i < n; i++)
        CHECK(out[i]->deploy == 1);
    for (size_t i = 0; i < n; i++)
        finish_ok(&s, out[i], &rng, T0 + 1.0);
    CHECK(on0->state == SX_OK && on0->attempts == 2);
    /* After the cool-down both take work again. */
    n = sx_sched_take(&s, out, 16, T0 + 6.0, &wake);
    size_t to0 = 0;
    for (size_t i = 0; i < n; i++)
        to0 += out[i]->deploy == 0;
    CHECK(n == 8 && to0 == 4);
    for (size_t i = 0; i < n; i++)
        finish_ok(&s, out[i], &rng, T0 + 6.0);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_deploy_trips_and_recovers(void)
{
    sx_deploy_opts d[2] = {{.weight = 1}, {.weight = 1}};
    sx_sched_opts so = deploy_sched_opts(8, d, 2);
    sx_sched s;
    REQUIRE(sx_sched_init(&s, &so, T0) == 0);
    sx_rng rng;
    sx_rng_seed(&rng, 14);
    sx_request_opts ro = req_opts();
    ro.max_retries = 5;
    sx_batch *b = mk_batch("t", 200, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[16];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 16, T0, &wake) == 8);
    /* Deployment 0 refuses connections: its four fail, the others succeed. */
    sx_attempt refused;
    int dead = 0;
    for (size_t i = 0; i < 8; i++) {
        if (out[i]->deploy == 0) {
            mk_attempt(&refused, CURLE_COULDNT_CONNECT, 0, NULL);
            CHECK(sx_sched_outcome(&s, out[i], &refused, &rng, T0 + 0.01) == SX_V_RETRY);
            dead++;
        } else {
            finish_ok(&s, out[i], &rng, T0 + 0.01);
        }
    }
    CHECK(dead == 4);
    CHECK(!sx_deploy_in_service(&s.deploy[0], T0 + 0.01) && s.deploy[0].stats.trips == 1);
    CHECK_NEAR(s.deploy[0].down_until, T0 + 0.01 + 1.0, 1e-9);
    CHECK(sx_deploy_in_service(&s.deploy[1], T0 + 0.01));

    /* While it is out, everything goes to deployment 1, retries included, and they do not
     * fail for the refused-connection rule (three attempts) however often it comes. */
    for (int round = 0; round < 6; round++) {
        double t = T0 + 0.02 + round * 0.15;
        size_t n = sx_sched_take(&s, out, 16, t, &wake);
        CHECK(n > 0);
        for (size_t i = 0; i < n; i++) {
            CHECK(out[i]->deploy == 1);
            finish_ok(&s, out[i], &rng, t);
        }
    }
    /* Out of service for 1 s, then one probe at a time: it fails, out for 2 s. */
    size_t n = sx_sched_take(&s, out, 16, T0 + 1.02, &wake);
    size_t probes = 0;
    sx_slot *probe = NULL;
    for (size_t i = 0; i < n; i++) {
        if (out[i]->deploy == 0) {
            probes++;
            probe = out[i];
        }
    }
    CHECK(probes == 1);
    REQUIRE(probe != NULL);
    for (size_t i = 0; i < n; i++)
        if (out[i] != probe)
            finish_ok(&s, out[i], &rng, T0 + 1.02);
    mk_attempt(&refused, CURLE_COULDNT_CONNECT, 0, NULL);
    CHECK(sx_sched_outcome(&s, probe, &refused, &rng, T0 + 1.03) == SX_V_RETRY);
    CHECK(s.deploy[0].stats.trips == 2);
    CHECK_NEAR(s.deploy[0].down_until, T0 + 1.03 + 2.0, 1e-9);
    /* The next probe succeeds: back in service, its window full again. */
    n = sx_sched_take(&s, out, 16, T0 + 3.1, &wake);
    probe = NULL;
    for (size_t i = 0; i < n; i++) {
        if (out[i]->deploy == 0)
            probe = out[i];
        else
            finish_ok(&s, out[i], &rng, T0 + 3.1);
    }
    REQUIRE(probe != NULL);
    finish_ok(&s, probe, &rng, T0 + 3.11);
    CHECK(sx_deploy_in_service(&s.deploy[0], T0 + 3.11) && s.deploy[0].trips_in_row == 0);
    n = sx_sched_take(&s, out, 16, T0 + 3.2, &wake);
    size_t to0 = 0;
    for (size_t i = 0; i < n; i++)
        to0 += out[i]->deploy == 0;
    CHECK(n == 8 && to0 == 4);
    for (size_t i = 0; i < n; i++)
        finish_ok(&s, out[i], &rng, T0 + 3.2);
    for (size_t i = 0; i < b->n; i++)
        CHECK(b->slots[i].state != SX_FAILED);

    /* When every deployment refuses, the three-attempt rule holds again. */
    sx_deploy_opts two[2] = {{.weight = 1}, {.weight = 1}};
    sx_sched s2;
    so = deploy_sched_opts(4, two, 2);
    REQUIRE(sx_sched_init(&s2, &so, T0) == 0);
    sx_batch *c = mk_batch("x", 4, NULL, &ro);
    REQUIRE(c != NULL);
    REQUIRE(sx_sched_push_batch(&s2, c) == 0);
    sx_verdict last = SX_V_RETRY;
    for (int round = 0; round < 40 && last != SX_V_FAIL; round++) {
        double t = T0 + round * 4.0;
        size_t k = sx_sched_take(&s2, out, 16, t, &wake);
        for (size_t i = 0; i < k; i++) {
            mk_attempt(&refused, CURLE_COULDNT_CONNECT, 0, NULL);
            sx_verdict v = sx_sched_outcome(&s2, out[i], &refused, &rng, t + 0.01);
            if (v == SX_V_FAIL) {
                CHECK(out[i]->attempts <= 4);
                last = v;
            }
        }
    }
    CHECK(last == SX_V_FAIL);
    sx_sched_destroy(&s2);
    sx_batch_free(c);
    sx_sched_destroy(&s);
    sx_batch_free(b);
}

static void test_sched_deploy_bad_key_disables_it(void)
{
    sx_deploy_opts d[2] = {{.weight = 1}, {.weight = 1}};
    sx_sched_opts so = deploy_sched_opts(4, d, 2);
    sx_sched s;
    REQUIRE(sx_sched_init(&s, &so, T0) == 0);
    sx_rng rng;
    sx_rng_seed(&rng, 15);
    sx_request_opts ro = req_opts();
    sx_batch *b = mk_batch("k", 20, NULL, &ro);
    REQUIRE(b != NULL);
    REQUIRE(sx_sched_push_batch(&s, b) == 0);
    sx_slot *out[16];
    double wake = -1;
    REQUIRE(sx_sched_take(&s, out, 2, T0, &wake) == 2);
    sx_slot *on0 = out[0]->deploy == 0 ? out[0] : out[1];
    sx_slot *on1 = on0 == out[0] ? out[1] : out[0];
    /* Deployment 0 refuses its key: it is disabled, the request is retried elsewhere. */
    sx_attempt at;
    mk_attempt(&at, CURLE_OK, 401, NULL);
    CHECK(at.verdict == SX_V_ABORT_BATCH);
    CHECK(sx_sched_outcome(&s, on0, &at, &rng, T0 + 0.01) == SX_V_RETRY);
    CHECK(s.deploy[0].disabled && s.deploy[0].stats.disabled_kind == SX_ERR_AUTH);
    CHECK(!sx_deploy_in_service(&s.deploy[0], T0 + 100));
    finish_ok(&s, on1, &rng, T0 + 0.01);
    for (int round = 0; round < 8 && b->done < b->n; round++) {
        double t = T0 + 1.0 + round;
        size_t n = sx_sched_take(&s, out, 16, t, &wake);
        for (size_t i = 0; i < n; i++) {
            CHECK(out[i]->deploy == 1);
            finish_ok(&s, out[i], &rng, t);
        }
    }
    CHECK(b->done == b->n && on0->state == SX_OK && on0->attempts == 2);
    /* The last one refuses too: nothing left to go to, so the batch stops as it would. */
    sx_batch *c = mk_batch("l", 2, NULL, &ro);
    REQUIRE(c != NULL);
    REQUIRE(sx_sched_push_batch(&s, c) == 0);
    REQUIRE(sx_sched_take(&s, out, 16, T0 + 20, &wake) == 2);
    mk_attempt(&at, CURLE_OK, 401, NULL);
    CHECK(sx_sched_outcome(&s, out[0], &at, &rng, T0 + 20.01) == SX_V_ABORT_BATCH);
    CHECK(s.deploy[1].disabled);
    sx_sched_release(&s, out[1]);
    sx_sched_destroy(&s);
    sx_batch_free(b);
    sx_batch_free(c);
}

static sx_engine *mk_deploy_engine(int workers, int max_in_flight, const sx_deploy_opts *d,
                                   size_t n)
{
    sx_engine_opts eo;
    memset(&eo, 0, sizeof eo);
    eo.own_http1 = own_http1();
    eo.workers = workers;
    eo.sched.max_in_flight = max_in_flight;
    eo.sched.adaptive = 1;
    eo.sched.queue_limit = 100000;
    eo.sched.deploys = d;
    eo.sched.ndeploys = n;
    char err[256] = "";
    sx_engine *e = sx_engine_new(&eo, err, sizeof err);
    if (!e)
        fprintf(stderr, "sx_engine_new failed: %s\n", err);
    return e;
}

/* Two servers, one engine with a deployment on each; the first server dies mid-run: the
 * other takes its load and nothing is lost. */
static void test_engine_deployments_one_dies(void)
{
    REQUIRE(g_srv_ok);
    srv second;
    REQUIRE(srv_start(&second) == 0);
    char url2[64];
    snprintf(url2, sizeof url2, "http://127.0.0.1:%d/echo", second.port);
    sx_deploy_opts d[2] = {{.weight = 1}, {.weight = 1}};
    sx_engine *e = mk_deploy_engine(2, 32, d, 2);
    REQUIRE(e != NULL);

    /* A batch without one target per deployment is refused. */
    sx_batch *bad = mk_http_batch("bad", 2, NULL);
    REQUIRE(bad != NULL);
    CHECK(sx_engine_submit(e, bad) == -3);
    sx_batch_free(bad);

    enum { N = 3000 };
    char **bodies = NULL;
    sx_batch *b = mk_http_batch("dep", N, &bodies);
    REQUIRE(b != NULL && bodies != NULL);
    const char *h1[] = {"X-Deployment: one"};
    const char *h2[] = {"X-Deployment: two"};
    CHECK(sx_batch_add_target(b, url2, h1, 1) == 0);  /* deployment 0: the second server */
    CHECK(sx_batch_add_target(b, g_url, h2, 1) == 0);
    CHECK(b->ntargets == 2 && strcmp(b->targets[0].headers->data, "Expect:") == 0);
    pthread_mutex_lock(&g_srv.mu);
    unsigned long base1 = g_srv.requests;
    pthread_mutex_unlock(&g_srv.mu);
    CHECK(sx_engine_submit(e, b) == 0);
    /* Let it serve some, then kill it under load. */
    for (int i = 0; i < 2000; i++) {
        pthread_mutex_lock(&second.mu);
        unsigned long got = second.requests;
        pthread_mutex_unlock(&second.mu);
        if (got >= 300)
            break;
        sleep_s(0.001);
    }
    srv_stop(&second);
    int done = sx_engine_wait(e, b, 60.0);
    CHECK(done);
    size_t ok = 0, by[2] = {0, 0};
    for (size_t i = 0; i < N; i++) {
        sx_slot *s = &b->slots[i];
        if (s->state == SX_OK && s->response_len == strlen(bodies[i]) &&
            memcmp(s->response, bodies[i], s->response_len) == 0)
            ok++;
        by[s->deploy]++;
    }
    CHECK(ok == N);
    sx_engine_lock(e);
    sx_deploy d0 = e->sched.deploy[0], d1 = e->sched.deploy[1];
    sx_engine_unlock(e);
    pthread_mutex_lock(&g_srv.mu);
    unsigned long served1 = g_srv.requests - base1;
    pthread_mutex_unlock(&g_srv.mu);
    printf("  deployment 0 (killed): %llu ok, %llu failed attempts, %llu trips; deployment 1: %llu ok\n",
           (unsigned long long)d0.stats.ok, (unsigned long long)d0.stats.failed,
           (unsigned long long)d0.stats.trips, (unsigned long long)d1.stats.ok);
    CHECK(d0.stats.ok >= 300 && d0.stats.trips >= 1 && d0.stats.failed >= 1);
    CHECK(d1.stats.ok == by[1] && served1 >= by[1]);
    CHECK(by[0] + by[1] == N && by[1] > by[0]);   /* the survivor took the rest */
    CHECK(d0.in_flight == 0 && d1.in_flight == 0);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
    free_bodies(bodies, N);
}

typedef struct {
    sx_sse_verdict verdict;
    char content[512];
    size_t content_len;
    int content_null, finish_null;
    char finish[64];
    int64_t tokens[3];
    int error_status;
    char error[256];
} sse_result;

/* Feed `text` to a fresh reader in pieces of `step` bytes (0: one piece), through a buffer
 * that grows like a transfer's, check the raw bytes are never modified, and read the
 * outcome. */
static void sse_run(const char *text, size_t step, sse_result *out)
{
    size_t n = strlen(text);
    memset(out, 0, sizeof *out);
    sx_sse r;
    sx_sse_init(&r);
    char *raw = NULL;
    size_t len = 0;
    if (!step)
        step = n ? n : 1;
    while (len < n) {
        size_t more = n - len < step ? n - len : step;
        /* exactly as long as what arrived, so ASan sees a read past the end */
        char *grown = realloc(raw, len + more);
        if (!grown)
            break;
        raw = grown;
        memcpy(raw + len, text + len, more);
        len += more;
        sx_sse_feed(&r, raw, len);
    }
    out->verdict = sx_sse_finish(&r, raw, len);
    CHECK(len == 0 || memcmp(raw, text, len) == 0);
    if (out->verdict == SX_SSE_COMPLETE) {
        sx_chat chat;
        size_t alen = 0;
        char *answer = sx_sse_take_answer(&r, &chat, &alen);
        CHECK(answer != NULL && chat.parsed);
        if (answer && chat.content_len < sizeof out->content &&
            chat.finish_len < sizeof out->finish) {
            memcpy(out->content, answer + chat.content_off, chat.content_len);
            out->content_len = chat.content_len;
            memcpy(out->finish, answer + chat.finish_off, chat.finish_len);
            out->content_null = chat.content_null;
            out->finish_null = chat.finish_null;
            out->tokens[0] = chat.prompt_tokens;
            out->tokens[1] = chat.completion_tokens;
            out->tokens[2] = chat.total_tokens;
        }
        free(answer);
    } else if (out->verdict == SX_SSE_ERROR) {
        out->error_status = sx_sse_error_status(&r);
        size_t elen = 0;
        char *body = sx_sse_take_error(&r, &elen);
        if (body && elen < sizeof out->error)
            memcpy(out->error, body, elen);
        free(body);
    }
    sx_sse_reset(&r);
    free(raw);
}

#define CHUNK(content) "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":" \
                       "[{\"index\":0,\"delta\":{\"content\":" content "},\"finish_reason\":null}]}"

static const char SSE_GOOD[] =
    ": ping\n\n"
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
    "\"content\":\"\"},\"finish_reason\":null}]}\n\n"
    CHUNK("\"Hel\"") "\n\n"
    CHUNK("\"lo \\u00e9\\ud83d\\ude00\"") "\n\n"
    CHUNK("null") "\n\n"
    "event: message\nid: 7\nretry: 100\n"
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\n\\\"x\\\"\"},\n"
    "data:  \"finish_reason\":\"stop\"}]}\n\n"
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,"
    "\"total_tokens\":13}}\n\n"
    "data: [DONE]\n\n"
    "data: {\"choices\":[{\"delta\":{\"content\":\"after done\"}}]}\n\n";
static const char SSE_GOOD_CONTENT[] = "Hello \xc3\xa9\xf0\x9f\x98\x80\n\"x\"";

/* Rewrite SSE_GOOD's line breaks as `eol` (and optionally a leading BOM). */
static char *sse_with_eol(const char *eol, int bom)
{
    size_t n = strlen(SSE_GOOD), el = strlen(eol);
    char *out = malloc(3 + n * el + 1);
    if (!out)
        return NULL;
    size_t k = 0;
    if (bom) {
        memcpy(out, "\xEF\xBB\xBF", 3);
        k = 3;
    }
    for (size_t i = 0; i < n; i++) {
        if (SSE_GOOD[i] == '\n') {
            memcpy(out + k, eol, el);
            k += el;
        } else {
            out[k++] = SSE_GOOD[i];
        }
    }
    out[k] = '\0';
    return out;
}

static void check_good(const sse_result *res)
{
    CHECK(res->verdict == SX_SSE_COMPLETE);
    CHECK(res->content_len == strlen(SSE_GOOD_CONTENT) &&
          memcmp(res->content, SSE_GOOD_CONTENT, res->content_len) == 0);
    CHECK(strcmp(res->finish, "stop") == 0 && !res->finish_null && !res->content_null);
    CHECK(res->tokens[0] == 9 && res->tokens[1] == 4 && res->tokens[2] == 13);
}

static void test_sse_reader_any_split_any_line_ending(void)
{
    const char *eols[] = {"\n", "\r\n", "\r"};
    for (int bom = 0; bom < 2; bom++) {
        for (size_t e = 0; e < 3; e++) {
            char *text = sse_with_eol(eols[e], bom);
            REQUIRE(text != NULL);
            size_t n = strlen(text);
            sse_result res;
            /* whole, then every piece size: each event split across reads somewhere */
            for (size_t step = 0; step <= n; step += step < 16 ? 1 : 37) {
                sse_run(text, step, &res);
                check_good(&res);
                if (res.verdict != SX_SSE_COMPLETE) {
                    fprintf(stderr, "    eol %zu bom %d step %zu: verdict %d\n", e, bom, step,
                            (int)res.verdict);
                    break;
                }
            }
            free(text);
        }
    }
}

static void test_sse_reader_outcomes(void)
{
    sse_result res;
    /* cut: no [DONE], no finish_reason */
    sse_run(CHUNK("\"Hel\"") "\n\n" CHUNK("\"lo\"") "\n\n", 5, &res);
    CHECK(res.verdict == SX_SSE_CUT);
    /* ... even mid-event */
    sse_run(CHUNK("\"Hel\"") "\n\ndata: {\"choi", 0, &res);
    CHECK(res.verdict == SX_SSE_CUT);
    /* a server that ends after the finish_reason without [DONE]; last line unterminated */
    sse_run(CHUNK("\"a\"") "\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}",
            3, &res);
    CHECK(res.verdict == SX_SSE_COMPLETE && res.content_len == 1 && res.content[0] == 'a');
    CHECK(strcmp(res.finish, "length") == 0 && res.tokens[2] == 0);
    /* [DONE] without its line break at the very end */
    sse_run(CHUNK("\"a\"") "\n\ndata: [DONE]", 1, &res);
    CHECK(res.verdict == SX_SSE_COMPLETE && res.finish_null);
    /* only null contents (a tool call): content is null, as in a whole answer */
    sse_run(CHUNK("null") "\n\ndata: [DONE]\n\n", 0, &res);
    CHECK(res.verdict == SX_SSE_COMPLETE && res.content_null && res.content_len == 0);
    /* an error object inside the stream: its code is the status, its bytes the body */
    const char *err = "{\"error\":{\"message\":\"bad \\ud800 thing\",\"type\":\"invalid\","
                      "\"code\":400}}";
    char text[512];
    snprintf(text, sizeof text, "%s\n\ndata: %s\n\n%s\n\n", CHUNK("\"a\""), err, CHUNK("\"b\""));
    sse_run(text, 2, &res);
    CHECK(res.verdict == SX_SSE_ERROR && res.error_status == 400);
    CHECK(strcmp(res.error, err) == 0);
    /* ... an error with no usable code stands for 500 */
    sse_run("data: {\"error\":{\"message\":\"overloaded\",\"code\":\"x\"}}\n\n", 0, &res);
    CHECK(res.verdict == SX_SSE_ERROR && res.error_status == 500);
    /* an `error` event, whatever its data */
    sse_run(CHUNK("\"a\"") "\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":"
            "\"overloaded_error\",\"code\":529}}\n\n", 4, &res);
    CHECK(res.verdict == SX_SSE_ERROR && res.error_status == 529);
    sse_run("event: error\ndata: not json\n\n", 0, &res);
    CHECK(res.verdict == SX_SSE_ERROR && res.error_status == 500 &&
          strcmp(res.error, "not json") == 0);
    /* left to Python: chunks chatjson does not read exactly, and bodies with no event */
    const char *fallbacks[] = {
        CHUNK("\"\\ud83d\"") "\n\n" CHUNK("\"\\ude00\"") "\n\ndata: [DONE]\n\n",
        "data: not json\n\ndata: [DONE]\n\n",
        "data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}},{\"delta\":{}}]}\n\ndata: [DONE]\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"x\",\"content\":\"y\"}}]}\n\n",
        "{\"choices\":[{\"message\":{\"content\":\"plain json\"}}]}",
        ": only a comment\n\n",
        "",
    };
    for (size_t i = 0; i < sizeof fallbacks / sizeof *fallbacks; i++) {
        sse_run(fallbacks[i], 3, &res);
        CHECK(res.verdict == SX_SSE_FALLBACK);
        if (res.verdict != SX_SSE_FALLBACK)
            fprintf(stderr, "    fallback %zu: verdict %d\n", i, (int)res.verdict);
    }
    /* empty and whitespace-only data, unknown fields, lines without a colon: ignored */
    sse_run("data:\n\ndata:   \n\nfoo: bar\nnocolon\n\n" CHUNK("\"z\"") "\n\ndata: [DONE]\n\n",
            1, &res);
    CHECK(res.verdict == SX_SSE_COMPLETE && res.content_len == 1 && res.content[0] == 'z');
}

/* Random pieces and random bytes: never a crash or a read out of bounds, and an answer's
 * spans stay inside it. */
static void test_sse_reader_mutations(void)
{
    size_t n = strlen(SSE_GOOD);
    sx_rng rng;
    sx_rng_seed(&rng, 11);
    char *text = malloc(n + 1);
    REQUIRE(text != NULL);
    for (int round = 0; round < 3000; round++) {
        memcpy(text, SSE_GOOD, n + 1);
        int edits = (int)(sx_rng_uniform(&rng) * 5);
        for (int e = 0; e < edits; e++) {
            char c = (char)(1 + (int)(sx_rng_uniform(&rng) * 255));
            text[(size_t)(sx_rng_uniform(&rng) * (double)n)] = c;
        }
        size_t step = 1 + (size_t)(sx_rng_uniform(&rng) * 40);
        sse_result res;
        sse_run(text, step, &res);
        CHECK(res.verdict <= SX_SSE_ERROR);
    }
    free(text);
}

/* Through the workers: streamed answers become parsed chat results, and with stream_deltas
 * their text is queued in order, joining to the answer. */
static void test_engine_stream_deltas(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(2, 8);
    REQUIRE(e != NULL);
    enum { N = 12 };
    char *bodies[N];
    size_t lens[N];
    for (size_t i = 0; i < N; i++) {
        char text[2048];
        size_t k = (size_t)snprintf(text, sizeof text, "SSE: keep-alive\r\n\r\n");
        for (int part = 0; part < 6; part++)
            k += (size_t)snprintf(text + k, sizeof text - k,
                                  "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":"
                                  "\"r%zu-p%d \"},\"finish_reason\":null}]}\r\n\r\n", i, part);
        k += (size_t)snprintf(text + k, sizeof text - k,
                              "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":"
                              "\"stop\"}]}\r\n\r\ndata: {\"choices\":[],\"usage\":{"
                              "\"prompt_tokens\":%zu,\"completion_tokens\":6,"
                              "\"total_tokens\":%zu}}\r\n\r\n", i, i + 6);
        if (i % 3 != 2)  /* some streams end without [DONE] */
            k += (size_t)snprintf(text + k, sizeof text - k, "data: [DONE]\r\n\r\n");
        bodies[i] = strdup(text);
        lens[i] = k;
    }
    const char *hdrs[] = {"Content-Type: text/plain"};
    sx_request_opts o = e2e_opts();
    o.parse_chat = 1;
    o.stream_deltas = 1;
    sx_batch *b = sx_batch_new(g_url, hdrs, 1, (const char *const *)bodies, lens, NULL, N, &o);
    REQUIRE(b != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    /* drain the queue while the batch runs, as Python's tick does */
    char joined[N][256];
    size_t jlen[N];
    memset(jlen, 0, sizeof jlen);
    int ordered = 1;
    for (int done = 0; !done;) {
        done = sx_engine_wait(e, b, 0.002);
        size_t len;
        sx_engine_lock(e);
        char *records = sx_batch_take_deltas(b, &len);
        sx_engine_unlock(e);
        for (size_t off = 0; off + sizeof(sx_delta_head) <= len;) {
            sx_delta_head head;
            memcpy(&head, records + off, sizeof head);
            off += sizeof head;
            CHECK(head.index < N && head.len >= 0);  /* no restart: nothing failed */
            if (head.index < N && head.len > 0 && jlen[head.index] + (size_t)head.len < 256) {
                memcpy(joined[head.index] + jlen[head.index], records + off, (size_t)head.len);
                jlen[head.index] += (size_t)head.len;
            }
            off += head.len > 0 ? (size_t)head.len : 0;
        }
        free(records);
    }
    for (size_t i = 0; i < N; i++) {
        sx_slot *s = &b->slots[i];
        char want[256];
        size_t wl = 0;
        for (int part = 0; part < 6; part++)
            wl += (size_t)snprintf(want + wl, sizeof want - wl, "r%zu-p%d ", i, part);
        CHECK(s->state == SX_OK && s->chat.parsed);
        CHECK(s->chat.content_len == wl &&
              memcmp(s->response + s->chat.content_off, want, wl) == 0);
        CHECK(s->chat.finish_len == 4 &&
              memcmp(s->response + s->chat.finish_off, "stop", 4) == 0);
        CHECK(s->chat.prompt_tokens == (int64_t)i && s->chat.total_tokens == (int64_t)(i + 6));
        if (jlen[i] != wl || memcmp(joined[i], want, wl) != 0)
            ordered = 0;
    }
    CHECK(ordered);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
    for (size_t i = 0; i < N; i++)
        free(bodies[i]);
}

/* A stream cut before [DONE] is a connection error, retried; the retry's text follows a
 * restart marker in the queue. */
static void test_engine_stream_cut_is_retried(void)
{
    REQUIRE(g_srv_ok);
    sx_engine *e = mk_engine(1, 4);
    REQUIRE(e != NULL);
    const char *cut = "SSE" CHUNK("\"partial\"") "\n\n";
    size_t len = strlen(cut);
    const char *hdrs[] = {"Content-Type: text/plain"};
    sx_request_opts o = e2e_opts();
    o.parse_chat = 1;
    o.stream_deltas = 1;
    o.max_retries = 2;
    sx_batch *b = sx_batch_new(g_url, hdrs, 1, &cut, &len, NULL, 1, &o);
    REQUIRE(b != NULL);
    CHECK(sx_engine_submit(e, b) == 0);
    CHECK(sx_engine_wait(e, b, 10.0) == 1);
    sx_slot *s = &b->slots[0];
    CHECK(s->state == SX_FAILED && s->error_kind == SX_ERR_CONNECTION && s->attempts == 3);
    CHECK(s->error && strstr(s->error, "[DONE]") != NULL);
    size_t qlen;
    sx_engine_lock(e);
    char *records = sx_batch_take_deltas(b, &qlen);
    sx_engine_unlock(e);
    /* three attempts, each "partial" then a restart */
    int texts = 0, restarts = 0, last_was_restart = 0;
    for (size_t off = 0; off + sizeof(sx_delta_head) <= qlen;) {
        sx_delta_head head;
        memcpy(&head, records + off, sizeof head);
        off += sizeof head;
        if (head.len < 0) {
            restarts++;
            last_was_restart = 1;
        } else {
            texts++;
            last_was_restart = 0;
            CHECK(head.len == 7 && memcmp(records + off, "partial", 7) == 0);
            off += (size_t)head.len;
        }
    }
    free(records);
    CHECK(texts == 3 && restarts == 3 && last_was_restart);
    sx_engine_release_batch(e, b);
    sx_engine_free(e);
}

#define TEST(fn) {#fn, fn}

static const test_case tests[] = {
    TEST(test_chat_reader),
    TEST(test_sse_reader_any_split_any_line_ending),
    TEST(test_sse_reader_outcomes),
    TEST(test_sse_reader_mutations),
    TEST(test_bucket_unlimited),
    TEST(test_bucket_rpm_burst_then_paced),
    TEST(test_bucket_continuous_refill),
    TEST(test_bucket_oversized_and_refund),
    TEST(test_window_aimd),
    TEST(test_rng_uniform),
    TEST(test_backoff),
    TEST(test_hints_retry_after),
    TEST(test_hints_durations),
    TEST(test_hints_anthropic),
    TEST(test_hints_retry_info_body),
    TEST(test_native_readers),
    TEST(test_hints_ratelimit_headers),
    TEST(test_classify),
    TEST(test_batch_results),
    TEST(test_sched_max_in_flight),
    TEST(test_sched_batch_cap_and_fifo),
    TEST(test_sched_shared_cap),
    TEST(test_sched_rpm),
    TEST(test_sched_tpm),
    TEST(test_sched_tpm_settle),
    TEST(test_sched_tpm_seed_from_remaining),
    TEST(test_sched_lease_settle),
    TEST(test_sched_lease),
    TEST(test_sched_429_retry_and_cooldown),
    TEST(test_sched_retry_before_first_attempts),
    TEST(test_sched_retries_exhausted),
    TEST(test_sched_adaptive_window),
    TEST(test_sched_remove_batch),
    TEST(test_sched_queue_limit),
    TEST(test_sched_deploy_tpm_settle),
    TEST(test_sched_deploy_split_by_limits),
    TEST(test_sched_deploy_429_drains_to_others),
    TEST(test_sched_deploy_trips_and_recovers),
    TEST(test_sched_deploy_bad_key_disables_it),
    TEST(test_engine_echo_500),
    TEST(test_engine_retry_503),
    TEST(test_engine_cancel),
    TEST(test_engine_close_running),
    TEST(test_engine_release_running),
    TEST(test_engine_body_cap_and_timeout),
    TEST(test_engine_abort_on_401),
    TEST(test_engine_eventfd),
    TEST(test_engine_429_cooldown),
    TEST(test_engine_rpm_paced),
    TEST(test_engine_http2_option_on_plain_http),
    TEST(test_engine_new_free_churn),
    TEST(test_engine_stream_deltas),
    TEST(test_engine_stream_cut_is_retried),
    TEST(test_engine_deployments_one_dies),
    /* regressions: each of these failed, crashed or hung before its fix in csrc/ */
    TEST(test_bug_sched_retry_head_of_line),
    TEST(test_bug_worker_spins_on_capped_retry),
    TEST(test_bug_retry_after_not_digits),
    TEST(test_hints_hostile),
    TEST(test_backoff_hint_cap),
    TEST(test_sched_hostile_hints),
    TEST(test_sched_bare_429_converges),
    TEST(test_sched_bare_429_episodes),
    TEST(test_bug_lost_wakeup),
};

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "curl_global_init failed\n");
        return 2;
    }
    static double dog_limit = 120.0;
    const char *env_limit = getenv("SX_TEST_TIMEOUT");
    if (env_limit && atof(env_limit) > 0)
        dog_limit = atof(env_limit);
    pthread_condattr_t dog_attr;
    pthread_condattr_init(&dog_attr);
    pthread_condattr_setclock(&dog_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&g_dog_cv, &dog_attr);
    pthread_condattr_destroy(&dog_attr);
    pthread_t dog;
    int dog_ok = pthread_create(&dog, NULL, watchdog_main, &dog_limit) == 0;

    g_srv_ok = srv_start(&g_srv) == 0;
    if (g_srv_ok)
        snprintf(g_url, sizeof g_url, "http://127.0.0.1:%d/echo", g_srv.port);
    else
        fprintf(stderr, "could not start the test HTTP server: %s\n", strerror(errno));

    /* Usage: test_engine [name-substring] */
    const test_case *table = tests;
    size_t ntests = sizeof tests / sizeof *tests;
    const char *only = NULL;
    for (int i = 1; i < argc; i++)
        only = argv[i];
    int passed = 0, failed = 0;
    for (size_t i = 0; i < ntests; i++) {
        if (only && !strstr(table[i].name, only))
            continue;
        unsigned long before = g_failures;
        double t = mono_now();
        atomic_store(&g_current_test, table[i].name);
        table[i].fn();
        double took = mono_now() - t;
        if (g_failures == before) {
            passed++;
            printf("ok   %-45s %7.3fs\n", table[i].name, took);
        } else {
            failed++;
            printf("FAIL %-45s %7.3fs\n", table[i].name, took);
        }
        fflush(stdout);
    }

    atomic_store(&g_current_test, "(teardown)");
    if (g_srv_ok)
        srv_stop(&g_srv);
    curl_global_cleanup();
    if (dog_ok) {
        pthread_mutex_lock(&g_dog_mu);
        g_dog_done = 1;
        pthread_cond_signal(&g_dog_cv);
        pthread_mutex_unlock(&g_dog_mu);
        pthread_join(dog, NULL);
    }
    pthread_cond_destroy(&g_dog_cv);
    printf("%lu checks, %lu failed\n", g_checks, g_failures);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
