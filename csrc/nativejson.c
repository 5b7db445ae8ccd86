/* nativejson.c — see nativejson.h. Like chatjson.c: one recursive-descent pass validates the
 * whole body and records where the wanted pieces are; they are decoded (in place) only once
 * the body is known good, so a fallback leaves the original bytes for json.loads. */
#include "nativejson.h"
#include "jsonscan.h"

#include <string.h>

typedef enum {
    R_SKIP = 0,
    /* Anthropic */
    R_A_TOP,
    R_A_CONTENT,      /* the content array */
    R_A_BLOCK,        /* one content block */
    R_A_TYPE,
    R_A_TEXT,
    R_A_INPUT,
    R_A_STOP,
    R_A_USAGE,
    R_A_INPUT_TOKENS,
    R_A_CACHE_CREATION,
    R_A_CACHE_READ,
    R_A_OUTPUT_TOKENS,
    /* Gemini */
    R_G_TOP,
    R_G_CANDIDATES,
    R_G_CANDIDATE0,
    R_G_CONTENT,
    R_G_PARTS,
    R_G_PART,
    R_G_TEXT,
    R_G_THOUGHT,
    R_G_FINISH,
    R_G_USAGE,
    R_G_PROMPT,
    R_G_CANDIDATES_TOKENS,
    R_G_THOUGHTS_TOKENS,
    R_G_TOTAL,
    R_COUNT
} role_t;

/* Token counters, in the order the roles above name them. */
enum { T_A_INPUT, T_A_CACHE_CREATION, T_A_CACHE_READ, T_A_OUTPUT, T_G_PROMPT,
       T_G_CANDIDATES, T_G_THOUGHTS, T_G_TOTAL, T_COUNT };

/* What the block or part being scanned holds (reset at its start). */
typedef struct {
    sx_json_span type, text;
    size_t input_off, input_len;
    int has_input;
    int text_not_string;  /* Anthropic: a "text" member that is not a string */
    int thought;          /* Gemini: "thought": true */
} piece;

typedef struct {
    sx_json_cursor c;
    piece cur;
    sx_json_span parts[SX_NATIVE_MAX_PARTS];
    size_t nparts;
    int tool_found;
    size_t tool_off, tool_len;
    sx_json_span finish;
    int content_found;      /* Anthropic content array / Gemini candidates[0] seen */
    int64_t tokens[T_COUNT];
} scanner;

enum { OK = SX_JSON_OK, FALLBACK = SX_JSON_FALLBACK };

static int scan_value(scanner *s, role_t role, int depth);

static role_t child_role(role_t parent, const unsigned char *k, size_t n)
{
#define KEY_IS(lit) (n == sizeof(lit) - 1 && memcmp(k, lit, n) == 0)
    switch (parent) {
    case R_A_TOP:
        if (KEY_IS("content"))
            return R_A_CONTENT;
        if (KEY_IS("stop_reason"))
            return R_A_STOP;
        if (KEY_IS("usage"))
            return R_A_USAGE;
        break;
    case R_A_BLOCK:
        if (KEY_IS("type"))
            return R_A_TYPE;
        if (KEY_IS("text"))
            return R_A_TEXT;
        if (KEY_IS("input"))
            return R_A_INPUT;
        break;
    case R_A_USAGE:
        if (KEY_IS("input_tokens"))
            return R_A_INPUT_TOKENS;
        if (KEY_IS("cache_creation_input_tokens"))
            return R_A_CACHE_CREATION;
        if (KEY_IS("cache_read_input_tokens"))
            return R_A_CACHE_READ;
        if (KEY_IS("output_tokens"))
            return R_A_OUTPUT_TOKENS;
        break;
    case R_G_TOP:
        if (KEY_IS("candidates"))
            return R_G_CANDIDATES;
        if (KEY_IS("usageMetadata"))
            return R_G_USAGE;
        break;
    case R_G_CANDIDATE0:
        if (KEY_IS("content"))
            return R_G_CONTENT;
        if (KEY_IS("finishReason"))
            return R_G_FINISH;
        break;
    case R_G_CONTENT:
        if (KEY_IS("parts"))
            return R_G_PARTS;
        break;
    case R_G_PART:
        if (KEY_IS("text"))
            return R_G_TEXT;
        if (KEY_IS("thought"))
            return R_G_THOUGHT;
        break;
    case R_G_USAGE:
        if (KEY_IS("promptTokenCount"))
            return R_G_PROMPT;
        if (KEY_IS("candidatesTokenCount"))
            return R_G_CANDIDATES_TOKENS;
        if (KEY_IS("thoughtsTokenCount"))
            return R_G_THOUGHTS_TOKENS;
        if (KEY_IS("totalTokenCount"))
            return R_G_TOTAL;
        break;
    default:
        break;
    }
    return R_SKIP;
#undef KEY_IS
}

static int span_is(const scanner *s, const sx_json_span *span, const char *word)
{
    size_t n = strlen(word);
    return span->found == 1 && span->len == n && memcmp(s->c.base + span->off, word, n) == 0;
}

static int add_part(scanner *s, const sx_json_span *text)
{
    if (s->nparts == SX_NATIVE_MAX_PARTS)
        return FALLBACK;
    s->parts[s->nparts++] = *text;
    return OK;
}

/* A block or part has been scanned whole: keep what it contributes. */
static int piece_done(scanner *s, role_t role)
{
    piece *p = &s->cur;
    if (role == R_A_BLOCK) {
        if (p->type.found != 1)
            return FALLBACK;  /* no type, or not a string: Python's reader decides */
        if (span_is(s, &p->type, "text")) {
            if (p->text.found != 1 || p->text_not_string)
                return FALLBACK;
            return add_part(s, &p->text);
        }
        if (span_is(s, &p->type, "tool_use") && p->has_input && !s->tool_found) {
            s->tool_found = 1;
            s->tool_off = p->input_off;
            s->tool_len = p->input_len;
        }
        return OK;
    }
    /* R_G_PART */
    if (p->text.found == 1 && !p->thought)
        return add_part(s, &p->text);
    return OK;
}

static int scan_object(scanner *s, role_t role, int depth)
{
    unsigned seen = 0;  /* bit per extracted child role: a second one is a duplicate key */
    int piece_role = role == R_A_BLOCK || role == R_G_PART;
    if (piece_role)
        memset(&s->cur, 0, sizeof s->cur);
    s->c.p++;  /* '{' */
    sx_json_skip_ws(&s->c);
    if (s->c.p < s->c.end && *s->c.p == '}') {
        s->c.p++;
    } else {
        for (;;) {
            if (s->c.p >= s->c.end || *s->c.p != '"')
                return FALLBACK;
            sx_json_span key;
            if (!sx_json_string(&s->c, &key, 0))
                return FALLBACK;
            role_t child = R_SKIP;
            if (role != R_SKIP) {
                if (key.escaped)
                    return FALLBACK;  /* could spell a wanted key: not worth decoding */
                child = child_role(role, s->c.base + key.off, key.len);
                if (child != R_SKIP) {
                    if (seen & (1u << child))
                        return FALLBACK;  /* json.loads keeps the last: leave that to it */
                    seen |= 1u << child;
                }
            }
            sx_json_skip_ws(&s->c);
            if (s->c.p >= s->c.end || *s->c.p != ':')
                return FALLBACK;
            s->c.p++;
            sx_json_skip_ws(&s->c);
            if (!scan_value(s, child, depth + 1))
                return FALLBACK;
            int more = sx_json_next(&s->c, '}');
            if (more < 0)
                return FALLBACK;
            if (!more)
                break;
        }
    }
    if (role == R_G_CANDIDATE0)
        s->content_found = 1;
    return piece_role ? piece_done(s, role) : OK;
}

static int scan_array(scanner *s, role_t role, int depth)
{
    s->c.p++;  /* '[' */
    sx_json_skip_ws(&s->c);
    if (s->c.p < s->c.end && *s->c.p == ']') {
        s->c.p++;
        /* no candidate: a blocked prompt, for Python's reader to explain */
        return role == R_G_CANDIDATES ? FALLBACK : OK;
    }
    for (size_t i = 0;; i++) {
        role_t child = R_SKIP;
        if (role == R_A_CONTENT)
            child = R_A_BLOCK;
        else if (role == R_G_PARTS)
            child = R_G_PART;
        else if (role == R_G_CANDIDATES && i == 0)
            child = R_G_CANDIDATE0;
        if (!scan_value(s, child, depth + 1))
            return FALLBACK;
        int more = sx_json_next(&s->c, ']');
        if (more <= 0)
            return more < 0 ? FALLBACK : OK;
    }
}

static int scan_string_or_null(scanner *s, sx_json_span *span)
{
    unsigned c = *s->c.p;
    if (c == '"') {
        if (!sx_json_string(&s->c, span, 1))
            return FALLBACK;
        span->found = 1;
        return OK;
    }
    if (c == 'n' && sx_json_literal(&s->c, "null", 4)) {
        span->found = 2;
        return OK;
    }
    return FALLBACK;
}

static int scan_value(scanner *s, role_t role, int depth)
{
    if (depth > SX_CHAT_MAX_DEPTH || s->c.p >= s->c.end)
        return FALLBACK;
    unsigned c = *s->c.p;
    int64_t number;
    switch (role) {
    case R_SKIP:
    case R_COUNT:
        break;
    case R_A_TOP: case R_A_USAGE: case R_G_TOP: case R_G_CANDIDATE0: case R_G_CONTENT:
    case R_G_USAGE:
        if (c == 'n' && (role == R_A_USAGE || role == R_G_USAGE))
            return sx_json_literal(&s->c, "null", 4);
        if (c != '{')
            return FALLBACK;
        return scan_object(s, role, depth);
    case R_A_BLOCK: case R_G_PART:
        if (c != '{')
            return FALLBACK;
        return scan_object(s, role, depth);
    case R_A_CONTENT: case R_G_CANDIDATES: case R_G_PARTS:
        if (c != '[')
            return FALLBACK;
        if (role == R_A_CONTENT)
            s->content_found = 1;
        return scan_array(s, role, depth);
    case R_A_TYPE:
        if (c != '"' || !sx_json_string(&s->c, &s->cur.type, 0))
            return FALLBACK;
        if (s->cur.type.escaped)
            return FALLBACK;
        s->cur.type.found = 1;
        return OK;
    case R_A_TEXT:
        if (c == '"') {
            if (!sx_json_string(&s->c, &s->cur.text, 1))
                return FALLBACK;
            s->cur.text.found = 1;
            return OK;
        }
        s->cur.text_not_string = 1;
        break;
    case R_G_TEXT:
        if (c != '"' || !sx_json_string(&s->c, &s->cur.text, 1))
            return FALLBACK;
        s->cur.text.found = 1;
        return OK;
    case R_G_THOUGHT:
        if (c == 't' && sx_json_literal(&s->c, "true", 4)) {
            s->cur.thought = 1;
            return OK;
        }
        if (c == 'f')
            return sx_json_literal(&s->c, "false", 5);
        return FALLBACK;
    case R_A_INPUT: {
        const unsigned char *start = s->c.p;
        if (!sx_json_skip(&s->c, depth))
            return FALLBACK;
        s->cur.has_input = 1;
        s->cur.input_off = (size_t)(start - s->c.base);
        s->cur.input_len = (size_t)(s->c.p - start);
        return OK;
    }
    case R_A_STOP: case R_G_FINISH:
        return scan_string_or_null(s, &s->finish);
    case R_A_INPUT_TOKENS: case R_A_CACHE_CREATION: case R_A_CACHE_READ:
    case R_A_OUTPUT_TOKENS: case R_G_PROMPT: case R_G_CANDIDATES_TOKENS:
    case R_G_THOUGHTS_TOKENS: case R_G_TOTAL: {
        if (c == 'n')
            return sx_json_literal(&s->c, "null", 4);
        if (!sx_json_number(&s->c, &number, NULL) || number < 0)
            return FALLBACK;
        int t = role <= R_A_OUTPUT_TOKENS ? (int)(role - R_A_INPUT_TOKENS)
                                          : T_G_PROMPT + (int)(role - R_G_PROMPT);
        s->tokens[t] = number;
        return OK;
    }
    }
    return sx_json_skip(&s->c, depth);  /* off the extracted path: validate and skip */
}

static int scan_document(scanner *s, char *buf, size_t len, role_t top)
{
    memset(s, 0, sizeof *s);
    if (!buf || len == 0 || len > UINT32_MAX)
        return FALLBACK;
    s->c.base = (const unsigned char *)buf;
    s->c.p = s->c.base;
    s->c.end = s->c.base + len;
    sx_json_skip_ws(&s->c);
    if (!scan_value(s, top, 0))
        return FALLBACK;
    sx_json_skip_ws(&s->c);
    return s->c.p == s->c.end && s->content_found ? OK : FALLBACK;
}

/* The answer's text, the finish reason and the counts into *out. The finish span lies
 * outside the parts' range (a sibling of the array holding them), so joining the parts
 * cannot overwrite it. */
static int conclude(scanner *s, char *buf, sx_chat *out, int64_t prompt, int64_t completion,
                    int64_t total)
{
    unsigned char *ubuf = (unsigned char *)buf;
    if (s->tool_found) {
        out->content_off = (uint32_t)s->tool_off;  /* raw JSON: nothing to decode */
        out->content_len = (uint32_t)s->tool_len;
    } else if (s->nparts) {
        out->content_off = (uint32_t)s->parts[0].off;
        out->content_len = (uint32_t)sx_json_join_in_place(ubuf, s->parts, s->nparts);
    } else {
        out->content_null = 1;
    }
    if (s->finish.found == 1) {
        out->finish_off = (uint32_t)s->finish.off;
        out->finish_len = (uint32_t)sx_json_decode_in_place(ubuf, &s->finish);
    } else {
        out->finish_null = 1;
    }
    out->prompt_tokens = prompt;
    out->completion_tokens = completion;
    out->total_tokens = total;
    out->parsed = SX_CHAT_PARSED;
    return SX_CHAT_PARSED;
}

/* Sums of counts that each fit 18 digits cannot overflow int64. */
int sx_anthropic_parse(char *buf, size_t len, sx_chat *out)
{
    memset(out, 0, sizeof *out);
    scanner s;
    if (!scan_document(&s, buf, len, R_A_TOP))
        return SX_CHAT_FALLBACK;
    int64_t prompt = s.tokens[T_A_INPUT] + s.tokens[T_A_CACHE_CREATION] +
                     s.tokens[T_A_CACHE_READ];
    int64_t completion = s.tokens[T_A_OUTPUT];
    return conclude(&s, buf, out, prompt, completion, prompt + completion);
}

int sx_gemini_parse(char *buf, size_t len, sx_chat *out)
{
    memset(out, 0, sizeof *out);
    scanner s;
    if (!scan_document(&s, buf, len, R_G_TOP))
        return SX_CHAT_FALLBACK;
    return conclude(&s, buf, out, s.tokens[T_G_PROMPT],
                    s.tokens[T_G_CANDIDATES] + s.tokens[T_G_THOUGHTS], s.tokens[T_G_TOTAL]);
}

int sx_answer_parse(int dialect, char *buf, size_t len, sx_chat *out)
{
    switch (dialect) {
    case SX_DIALECT_OPENAI:
        return sx_chat_parse(buf, len, out);
    case SX_DIALECT_ANTHROPIC:
        return sx_anthropic_parse(buf, len, out);
    case SX_DIALECT_GEMINI:
        return sx_gemini_parse(buf, len, out);
    default:
        memset(out, 0, sizeof *out);
        return SX_CHAT_FALLBACK;
    }
}
