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

/* A number as the hint grammars write it: 1*DIGIT ["." 1*DIGIT], nothing else (strtod would
 * also take a sign, "inf", "1e999", hex and leading blanks). At most SX_HINT_VALUE_MAX
 * characters, so the value is finite. Returns -1 if there is no such number at s; *end is
 * where it stopped. */
static double parse_decimal(const char *s, const char **end)
{
    double v = 0, scale = 0.1;
    int int_digits = 0;
    const char *p = s;
    while (isdigit((unsigned char)*p)) {
        v = v * 10 + (*p - '0');
        int_digits++;
        p++;
    }
    if (int_digits && *p == '.' && isdigit((unsigned char)p[1])) {
        for (p++; isdigit((unsigned char)*p); p++) {
            v += (*p - '0') * scale;
            scale /= 10;
        }
    }
    *end = p;
    return int_digits ? v : -1;
}

/* Copy a header value into a NUL-terminated buffer, refusing one that is empty, too long, or
 * holds anything but printable ASCII (an embedded NUL would otherwise cut "5\0garbage" to
 * "5"). Returns 0 on success. */
static int copy_value(char *text, size_t size, const char *s, size_t len)
{
    if (len == 0 || len >= size)
        return -1;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return -1;
    memcpy(text, s, len);
    text[len] = '\0';
    return 0;
}

/* A whole value that is one number and nothing else; -1 otherwise. */
static double parse_number(const char *s, size_t len)
{
    char text[SX_HINT_VALUE_MAX];
    if (copy_value(text, sizeof text, s, len) != 0)
        return -1;
    const char *end;
    double v = parse_decimal(text, &end);
    return (v >= 0 && *end == '\0') ? v : -1;
}

double sx_parse_duration(const char *s, size_t len)
{
    char text[SX_HINT_VALUE_MAX];
    if (copy_value(text, sizeof text, s, len) != 0)
        return -1;

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

/* 1*DIGIT, at most 18 of them (fits a long); -1 otherwise ("-0" and "+5" included). */
static long parse_long(const char *s, size_t len)
{
    if (len == 0 || len > 18)
        return -1;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (!isdigit((unsigned char)s[i]))
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Retry-After = delta-seconds / HTTP-date (RFC 9110 10.2.3). delta-seconds is 1*DIGIT; a
 * decimal fraction is accepted too, since some servers send one and it cannot be misread. */
static double parse_retry_after(const char *s, size_t len, double wall_now)
{
    char text[SX_HINT_VALUE_MAX];
    if (copy_value(text, sizeof text, s, len) != 0)
        return -1;
    if (isdigit((unsigned char)text[0]))
        return parse_number(s, len);
    /* An HTTP-date starts with a day name; libcurl knows every format RFC 9110 allows. */
    if (!isalpha((unsigned char)text[0]))
        return -1;
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
        double ms = parse_number(value, value_len);   /* milliseconds, no unit */
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

double sx_hint_usable(double delay, double max_wait)
{
    return (delay >= 0 && delay <= max_wait) ? delay : -1;
}

double sx_hints_asked_delay(const sx_hints *h)
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

double sx_hints_retry_delay(const sx_hints *h, double max_wait)
{
    return sx_hint_usable(sx_hints_asked_delay(h), max_wait);
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

double sx_hints_exhausted_delay(const sx_hints *h, double tokens, double max_wait)
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
    return sx_hint_usable(delay, max_wait);
}
