/* hints.h — what a provider's response headers say about when to come back.
 *
 * Parsed from each response header line as it arrives (libcurl's header callback), so no
 * header is ever stored. Understood:
 *   Retry-After: <seconds> | <HTTP-date>
 *   retry-after-ms: <milliseconds>
 *   x-ratelimit-reset-requests / x-ratelimit-reset-tokens: OpenAI durations ("1s", "6m0s",
 *       "20ms", "1h2m3.5s", or a bare number of seconds)
 *   x-ratelimit-remaining-requests / x-ratelimit-remaining-tokens: integers
 *   x-ratelimit-limit-requests / x-ratelimit-limit-tokens: integers (the budget's size)
 *   anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining}:
 *       integers, and -reset: an RFC 3339 date-time (when that budget is full again), read
 *       into the same fields (input and output tokens as budgets of their own), so the
 *       scheduler treats Anthropic's budgets exactly as OpenAI's
 * A status line ("HTTP/1.1 ...") resets the hints: only the final response counts.
 *
 * Strict grammar: a value that is not exactly what the header's grammar allows is ignored
 * (the header is treated as absent), never read as its longest valid prefix. Numbers are
 * ASCII digits with at most one decimal point: no sign, no exponent, no "inf", no embedded
 * NUL or other bytes; "retry-after-ms: 2s" is not 0.002 s, "Retry-After: +5" is nothing.
 * An HTTP-date must start with a day name. An RFC 3339 date-time is exactly
 * YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM) with every field in range (the day within
 * its month, leap years counted; "T" and "Z" in either case; second 60 allowed).
 *
 * The parsed values are not capped here: the one cap is `max_wait` (the request option
 * max_hint_wait, SX_HINT_WAIT_DEFAULT unless the caller chose one) applied by the functions
 * that turn hints into a delay, sx_hints_retry_delay and sx_hints_exhausted_delay, and by
 * sx_backoff. A delay above it is ignored, as if the server had sent no hint: our own
 * backoff then applies, and if the server keeps refusing, the row fails after its retries
 * with an error that says the hint was ignored. A hostile or broken header
 * ("Retry-After: Fri, 31 Dec 9999 ...", "x-ratelimit-reset-requests: 99999999h") therefore
 * cannot stall the engine: the alternative, sleeping for the capped time, would still hold
 * every other batch for minutes on the word of one bad response. */
#ifndef SEMEX_HINTS_H
#define SEMEX_HINTS_H

#include <stddef.h>

/* Default for max_hint_wait (seconds): openai-python likewise ignores a Retry-After above
 * a minute; we allow two, since OpenAI's own x-ratelimit-reset-tokens can say "1m30s". */
#define SX_HINT_WAIT_DEFAULT 120.0

typedef struct sx_hints {
    double retry_after;         /* seconds from Retry-After / retry-after-ms; < 0 if absent */
    double reset_requests;      /* seconds; < 0 if absent */
    double reset_tokens;        /* seconds; < 0 if absent */
    long remaining_requests;    /* < 0 if absent */
    long remaining_tokens;      /* < 0 if absent */
    long limit_requests;        /* < 0 if absent */
    long limit_tokens;          /* < 0 if absent */
    /* Anthropic's separate input- and output-token budgets: reset (seconds), remaining and
     * limit, each < 0 if absent */
    double reset_input_tokens, reset_output_tokens;
    long remaining_input_tokens, remaining_output_tokens;
    long limit_input_tokens, limit_output_tokens;
} sx_hints;

void sx_hints_reset(sx_hints *h);

/* Feed one raw header line (not NUL-terminated, may end in CRLF). `wall_now` is the current
 * wall-clock time in seconds, used only to turn an HTTP-date into a delay; < 0 means "read the
 * clock if a date needs it" (most header lines do not, so the caller need not read it). */
void sx_hints_feed(sx_hints *h, const char *line, size_t len, double wall_now);

/* Gemini (any Google API) says when to retry a 429 / 503 in the error body, not a header: a
 * google.rpc.RetryInfo detail, "retryDelay": "<seconds>s" (the protobuf Duration's JSON form,
 * e.g. "37s", "0.5s"). Sets h->retry_after from the first such member in body[0, len) when
 * no header gave one; a value outside that grammar is ignored. Capped like any hint. */
void sx_hints_feed_body(sx_hints *h, const char *body, size_t len);

/* Parse an OpenAI-style duration ("6m0s", "20ms", "1.5s", "1h", "2") into seconds.
 * Returns -1 on anything it cannot read completely. */
double sx_parse_duration(const char *s, size_t len);

/* An RFC 3339 date-time (grammar above) as seconds after `wall_now` (0 if it is past);
 * -1 if it is not one. */
double sx_parse_rfc3339_delay(const char *s, size_t len, double wall_now);

/* The one cap on every hint: `delay` if it is a usable wait (0 <= delay <= max_wait, not
 * NaN), else -1 (ignore it). */
double sx_hint_usable(double delay, double max_wait);

/* The delay the server asked for before retrying: Retry-After if given, else the later of the
 * x-ratelimit resets whose remaining count is 0 (or absent), else -1. -1 as well when that
 * delay is above max_wait (see above). */
double sx_hints_retry_delay(const sx_hints *h, double max_wait);

/* The delay the server asked for, uncapped (for messages saying what was ignored); -1 if
 * none. */
double sx_hints_asked_delay(const sx_hints *h);

/* The delay before the next request may go out because the server said a budget is used up
 * (remaining == 0 with a reset time), on any response; -1 if none. OpenAI's reset is the time
 * until the budget is back to full, but it refills continuously: with the budget's size
 * known (x-ratelimit-limit-*), the wait is the time to refill what one request needs, one
 * request or `tokens` tokens (reset × need / limit), not the whole reset. Pausing for the
 * whole reset each time a steady client at the limit drains the budget to 0 would cost it
 * throughput for nothing. A delay above max_wait is ignored (-1). */
double sx_hints_exhausted_delay(const sx_hints *h, double tokens, double max_wait);

#endif
