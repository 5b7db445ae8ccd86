/* hints.c — see hints.h. */
#include "hints.h"

#include <ctype.h>
#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>

#include "sx_clock.h"

void sx_hints_reset(sx_hints *h)
{
    h->retry_after = -1;
    h->reset_requests = -1;
    h->reset_tokens = -1;
    h->remaining_requests = -1;
    h->remaining_tokens = -1;
    h->limit_requests = -1;
    h->limit_tokens = -1;
}

/* Longest header value we bother to parse; anything longer is not a hint we understand. */
#define SX_HINT_VALUE_MAX 96

/* Digits with at most one decimal point, nothing else: strtod would also take "inf",
 * "1e999" and hex, and an infinite Retry-After would stall a batch forever. Values are
 * capped at a day. Returns -1 if there is no number at s. */
static double parse_decimal(const char *s, const char **end)
{
    double v = 0, scale = 0;
    int digits = 0;
    const char *p = s;
    for (; *p; p++) {
        if (isdigit((unsigned char)*p)) {
            if (scale > 0) {
                v += (*p - '0') * scale;
                scale /= 10;
            } else {
                v = v * 10 + (*p - '0');
            }
            digits++;
        } else if (*p == '.' && scale == 0) {
            scale = 0.1;
        } else {
            break;
        }
    }
    *end = p;
    if (!digits)
        return -1;
    return v < 86400.0 * 1000 ? v : 86400.0 * 1000;
}


double sx_parse_duration(const char *s, size_t len)
{
    char text[SX_HINT_VALUE_MAX];
    if (len == 0 || len >= sizeof text)
        return -1;
    memcpy(text, s, len);
    text[len] = '\0';

    const char *p = text;
    double total = 0;
    int parts = 0;
    while (*p) {
        const char *end;
        double v = parse_decimal(p, &end);
        if (v < 0)
            return -1;
        p = end;
        if (*p == '\0') {
            if (parts)          /* "1m30" is not a duration */
                return -1;
            return v;           /* bare number: seconds */
        }
        if (p[0] == 'm' && p[1] == 's') {
            total += v / 1000.0;
            p += 2;
        } else if (*p == 'h') {
            total += v * 3600.0;
            p++;
        } else if (*p == 'm') {
            total += v * 60.0;
            p++;
        } else if (*p == 's') {
            total += v;
            p++;
        } else if (*p == 'u' && p[1] == 's') {
            total += v / 1e6;
            p += 2;
        } else if (*p == 'n' && p[1] == 's') {
            total += v / 1e9;
            p += 2;
        } else {
            return -1;
        }
        parts++;
    }
    return parts ? total : -1;
}

static int name_is(const char *line, size_t name_len, const char *want)
{
    return strlen(want) == name_len && strncasecmp(line, want, name_len) == 0;
}

static long parse_long(const char *s, size_t len)
{
    char text[32];
    if (len == 0 || len >= sizeof text)
        return -1;
    memcpy(text, s, len);
    text[len] = '\0';
    char *end;
    long v = strtol(text, &end, 10);
    return (*end == '\0' && v >= 0) ? v : -1;
}

static double parse_retry_after(const char *s, size_t len, double wall_now)
{
    char text[SX_HINT_VALUE_MAX];
    if (len == 0 || len >= sizeof text)
        return -1;
    memcpy(text, s, len);
    text[len] = '\0';
    const char *end;
    double v = parse_decimal(text, &end);
    if (v >= 0 && *end == '\0')
        return v > 86400.0 ? 86400.0 : v;
    /* An HTTP-date: libcurl already knows every format RFC 7231 allows. */
    time_t when = curl_getdate(text, NULL);
    if (when == (time_t)-1)
        return -1;
    if (wall_now < 0)
        wall_now = sx_wall_now();
    double delay = (double)when - wall_now;
    return delay > 0 ? delay : 0;
}

void sx_hints_feed(sx_hints *h, const char *line, size_t len, double wall_now)
{
    while (len && (line[len - 1] == '\r' || line[len - 1] == '\n'))
        len--;
    if (len >= 5 && strncmp(line, "HTTP/", 5) == 0) {
        sx_hints_reset(h);
        return;
    }
    const char *colon = memchr(line, ':', len);
    if (!colon)
        return;
    size_t name_len = (size_t)(colon - line);
    const char *value = colon + 1;
    size_t value_len = len - name_len - 1;
    while (value_len && (*value == ' ' || *value == '\t')) {
        value++;
        value_len--;
    }
    while (value_len && (value[value_len - 1] == ' ' || value[value_len - 1] == '\t'))
        value_len--;

    if (name_is(line, name_len, "retry-after-ms")) {
        double ms = sx_parse_duration(value, value_len);
        if (ms >= 0)
            h->retry_after = ms / 1000.0;   /* takes precedence: it is the finer hint */
    } else if (name_is(line, name_len, "retry-after")) {
        double v = parse_retry_after(value, value_len, wall_now);
        if (v >= 0 && h->retry_after < 0)
            h->retry_after = v;
    } else if (name_is(line, name_len, "x-ratelimit-reset-requests")) {
        h->reset_requests = sx_parse_duration(value, value_len);
    } else if (name_is(line, name_len, "x-ratelimit-reset-tokens")) {
        h->reset_tokens = sx_parse_duration(value, value_len);
    } else if (name_is(line, name_len, "x-ratelimit-remaining-requests")) {
        h->remaining_requests = parse_long(value, value_len);
    } else if (name_is(line, name_len, "x-ratelimit-remaining-tokens")) {
        h->remaining_tokens = parse_long(value, value_len);
    } else if (name_is(line, name_len, "x-ratelimit-limit-requests")) {
        h->limit_requests = parse_long(value, value_len);
    } else if (name_is(line, name_len, "x-ratelimit-limit-tokens")) {
        h->limit_tokens = parse_long(value, value_len);
    }
}

double sx_hints_retry_delay(const sx_hints *h)
{
    if (h->retry_after >= 0)
        return h->retry_after;
    double delay = -1;
    /* Without a remaining count we cannot tell which budget ran out: honour both resets. */
    if (h->reset_requests >= 0 && h->remaining_requests <= 0 && h->reset_requests > delay)
        delay = h->reset_requests;
    if (h->reset_tokens >= 0 && h->remaining_tokens <= 0 && h->reset_tokens > delay)
        delay = h->reset_tokens;
    return delay;
}

static double refill_time(double reset, long limit, double need)
{
    if (limit <= 0)
        return reset;
    if (need < 1)
        need = 1;
    double t = reset * need / (double)limit;
    return t < reset ? t : reset;
}

double sx_hints_exhausted_delay(const sx_hints *h, double tokens)
{
    double delay = -1;
    if (h->remaining_requests == 0 && h->reset_requests >= 0) {
        double t = refill_time(h->reset_requests, h->limit_requests, 1);
        if (t > delay)
            delay = t;
    }
    if (h->remaining_tokens == 0 && h->reset_tokens >= 0) {
        double t = refill_time(h->reset_tokens, h->limit_tokens, tokens);
        if (t > delay)
            delay = t;
    }
    return delay;
}
