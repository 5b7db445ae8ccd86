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
    h->reset_input_tokens = h->reset_output_tokens = -1;
    h->remaining_input_tokens = h->remaining_output_tokens = -1;
    h->limit_input_tokens = h->limit_output_tokens = -1;
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

/* n digits at s as a number; -1 if any is not a digit. */
static int digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Days from 1970-01-01 to y-m-d of the proleptic Gregorian calendar (Howard Hinnant's
 * days_from_civil). */
static long days_from_civil(long y, int m, int d)
{
    y -= m <= 2;
    long era = (y >= 0 ? y : y - 399) / 400;
    long yoe = y - era * 400;
    long doy = (153L * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

double sx_parse_rfc3339_delay(const char *s, size_t len, double wall_now)
{
    static const int mdays[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    char t[SX_HINT_VALUE_MAX];
    if (copy_value(t, sizeof t, s, len) != 0 || len < 20)
        return -1;
    int year = digits(t, 4), month = digits(t + 5, 2), day = digits(t + 8, 2);
    int hour = digits(t + 11, 2), minute = digits(t + 14, 2), second = digits(t + 17, 2);
    if (year < 0 || month < 1 || month > 12 || day < 1 || hour < 0 || hour > 23 ||
        minute < 0 || minute > 59 || second < 0 || second > 60 || t[4] != '-' ||
        t[7] != '-' || (t[10] != 'T' && t[10] != 't') || t[13] != ':' || t[16] != ':')
        return -1;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day > mdays[month - 1] + (month == 2 && leap))
        return -1;
    size_t i = 19;
    double fraction = 0, scale = 0.1;
    if (t[i] == '.') {
        if (!isdigit((unsigned char)t[i + 1]))
            return -1;
        for (i++; isdigit((unsigned char)t[i]); i++) {
            fraction += (t[i] - '0') * scale;
            scale /= 10;
        }
    }
    int offset = 0;  /* seconds east of UTC */
    if ((t[i] == 'Z' || t[i] == 'z') && i + 1 == len) {
        offset = 0;
    } else if ((t[i] == '+' || t[i] == '-') && i + 6 == len && t[i + 3] == ':') {
        int oh = digits(t + i + 1, 2), om = digits(t + i + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59)
            return -1;
        offset = (oh * 60 + om) * 60 * (t[i] == '-' ? -1 : 1);
    } else {
        return -1;
    }
    double when = (double)days_from_civil(year, month, day) * 86400.0 + hour * 3600.0 +
                  minute * 60.0 + second + fraction - offset;
    if (wall_now < 0)
        wall_now = sx_wall_now();
    double delay = when - wall_now;
    return delay > 0 ? delay : 0;
}

/* anthropic-ratelimit-<budget>-<field>: the field of that budget in *h. Returns 1 if the
 * name was one of them. */
static int feed_anthropic(sx_hints *h, const char *name, size_t name_len, const char *value,
                          size_t value_len, double wall_now)
{
    static const char prefix[] = "anthropic-ratelimit-";
    size_t np = sizeof prefix - 1;
    if (name_len <= np || strncasecmp(name, prefix, np) != 0)
        return 0;
    name += np;
    name_len -= np;
    static const struct { const char *budget; int which; } budgets[] = {
        {"requests-", 0}, {"tokens-", 1}, {"input-tokens-", 2}, {"output-tokens-", 3}};
    for (size_t b = 0; b < sizeof budgets / sizeof budgets[0]; b++) {
        size_t nb = strlen(budgets[b].budget);
        if (name_len <= nb || strncasecmp(name, budgets[b].budget, nb) != 0)
            continue;
        const char *field = name + nb;
        size_t nf = name_len - nb;
        double *reset[] = {&h->reset_requests, &h->reset_tokens, &h->reset_input_tokens,
                           &h->reset_output_tokens};
        long *remaining[] = {&h->remaining_requests, &h->remaining_tokens,
                             &h->remaining_input_tokens, &h->remaining_output_tokens};
        long *limit[] = {&h->limit_requests, &h->limit_tokens, &h->limit_input_tokens,
                         &h->limit_output_tokens};
        int w = budgets[b].which;
        if (name_is(field, nf, "reset"))
            *reset[w] = sx_parse_rfc3339_delay(value, value_len, wall_now);
        else if (name_is(field, nf, "remaining"))
            *remaining[w] = parse_long(value, value_len);
        else if (name_is(field, nf, "limit"))
            *limit[w] = parse_long(value, value_len);
        else
            return 0;
        return 1;
    }
    return 0;
}

void sx_hints_feed_body(sx_hints *h, const char *body, size_t len)
{
    static const char key[] = "\"retryDelay\"";
    size_t n = sizeof key - 1;
    if (!body || h->retry_after >= 0)
        return;
    for (size_t i = 0; i + n <= len; i++) {
        if (body[i] != '"' || memcmp(body + i, key, n) != 0)
            continue;
        size_t j = i + n;
        while (j < len && (body[j] == ' ' || body[j] == '\t' || body[j] == '\r' || body[j] == '\n'))
            j++;
        if (j >= len || body[j++] != ':')
            return;
        while (j < len && (body[j] == ' ' || body[j] == '\t' || body[j] == '\r' || body[j] == '\n'))
            j++;
        if (j >= len || body[j++] != '"')
            return;
        const char *close = memchr(body + j, '"', len - j);
        if (!close || close == body + j || close[-1] != 's')
            return;
        /* digits [. digits] s: parse_number refuses anything else */
        double v = parse_number(body + j, (size_t)(close - 1 - (body + j)));
        if (v >= 0)
            h->retry_after = v;
        return;
    }
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
    } else if (name_len > 20 && (line[0] == 'a' || line[0] == 'A')) {
        feed_anthropic(h, line, name_len, value, value_len, wall_now);
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
    if (h->reset_input_tokens >= 0 && h->remaining_input_tokens <= 0 &&
        h->reset_input_tokens > delay)
        delay = h->reset_input_tokens;
    if (h->reset_output_tokens >= 0 && h->remaining_output_tokens <= 0 &&
        h->reset_output_tokens > delay)
        delay = h->reset_output_tokens;
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
    if (h->remaining_input_tokens == 0 && h->reset_input_tokens >= 0) {
        double t = refill_time(h->reset_input_tokens, h->limit_input_tokens, tokens);
        if (t > delay)
            delay = t;
    }
    if (h->remaining_output_tokens == 0 && h->reset_output_tokens >= 0) {
        double t = refill_time(h->reset_output_tokens, h->limit_output_tokens, tokens);
        if (t > delay)
            delay = t;
    }
    return sx_hint_usable(delay, max_wait);
}
