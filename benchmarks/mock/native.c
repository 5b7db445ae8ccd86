/* native.c - the native provider APIs, with what each requires checked as it does:
 *   POST .../v1/messages                      Anthropic's Messages API: x-api-key and
 *       anthropic-version: 2023-06-01 (401 authentication_error / 400 otherwise), a positive
 *       integer max_tokens, messages of user/assistant turns only (a "system" role is a 400:
 *       the system prompt is the top-level "system"). Answers a text block "echo: <last user
 *       text>", or with a forced tool (tool_choice {"type":"tool","name":N}) a tool_use block
 *       whose input is the schema-shaped answer of fill.c for that tool's input_schema.
 *   POST .../models/<model>:generateContent   Gemini: x-goog-api-key (400 INVALID_ARGUMENT
 *       "API key not valid" otherwise), contents of user/model turns with parts; no
 *       "messages". Answers candidates[0].content.parts[0].text "echo: <last user text>", or
 *       with generationConfig.responseSchema (responseMimeType application/json) the
 *       schema-shaped answer as that text; a responseSchema holding additionalProperties or
 *       $ref is a 400, as Gemini's OpenAPI subset refuses them.
 * Errors are in each API's shape (put_dialect_error); limits and faults answer in it too
 * (routes.c, limits.c), a Gemini 429 with its retry delay in a RetryInfo detail. Usage: input/prompt tokens body/4 + 1, output tokens text/4 + 1. */
#include "mock.h"

static const char *anthropic_type(int status) {
    switch (status) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 529: return "overloaded_error";
    default: return "api_error";
    }
}

static const char *google_status(int status) {
    switch (status) {
    case 400: return "INVALID_ARGUMENT";
    case 401: return "UNAUTHENTICATED";
    case 403: return "PERMISSION_DENIED";
    case 404: return "NOT_FOUND";
    case 429: return "RESOURCE_EXHAUSTED";
    case 503: return "UNAVAILABLE";
    case 504: return "DEADLINE_EXCEEDED";
    default: return "INTERNAL";
    }
}

void put_dialect_error(buf_t *b, int dialect, int status, const char *msg, const char *type,
                       uint64_t retry_ms) {
    b->len = 0;
    if (dialect == D_ANTHROPIC) {
        buf_puts(b, "{\"type\":\"error\",\"error\":{\"type\":\"");
        buf_puts(b, status == 429 || status == 529 || !type ? anthropic_type(status) : type);
        buf_puts(b, "\",\"message\":\"");
        put_escaped(b, msg, strlen(msg));
        buf_puts(b, "\"}}");
        return;
    }
    buf_puts(b, "{\"error\":{\"code\":");
    buf_putu(b, (uint64_t)status);
    buf_puts(b, ",\"message\":\"");
    put_escaped(b, msg, strlen(msg));
    buf_puts(b, "\",\"status\":\"");
    buf_puts(b, google_status(status));
    if (retry_ms) {
        char delay[48];
        snprintf(delay, sizeof delay, "%llu.%03llus", (unsigned long long)(retry_ms / 1000),
                 (unsigned long long)(retry_ms % 1000));
        buf_puts(b, "\",\"details\":[{\"@type\":\"type.googleapis.com/google.rpc.RetryInfo\","
                    "\"retryDelay\":\"");
        buf_puts(b, delay);
        buf_puts(b, "\"}]}}");
        return;
    }
    buf_puts(b, "\"}}");
}

static void fail(worker_t *w, route_ctx_t *rc, int dialect, int status, const char *msg) {
    rc->status = status;
    put_dialect_error(&w->body, dialect, status, msg, NULL, 0);
}

static void put_hex_id(buf_t *b, const char *body, size_t blen) {
    char hex[16];
    uint64_t h = fnv1a(body, blen);
    for (int i = 15; i >= 0; i--) {
        hex[i] = "0123456789abcdef"[h & 15];
        h >>= 4;
    }
    buf_put(b, hex, 16);
}

/* the value of `key` in the object at obj is a string equal to lit */
static int str_member_is(const char *p, size_t len, size_t obj, const char *key,
                         const char *lit) {
    size_t v = obj_get(p, len, obj, key);
    return v != SIZE_MAX && raw_is(p, v + 1, str_end(p, len, v), lit);
}

/* a positive integer value at v */
static int positive_int(const char *p, size_t len, size_t v) {
    if (v >= len || p[v] < '1' || p[v] > '9') return 0;
    size_t e = skip_value(p, len, v);
    for (size_t i = v; i < e; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

void route_messages(worker_t *w, route_ctx_t *rc) {
    const char *p = rc->body;
    size_t len = rc->blen;
    const int D = D_ANTHROPIC;
    if (!rc->r->has_x_api_key) {
        fail(w, rc, D, 401, "x-api-key header is required");
        return;
    }
    if (!rc->r->anthropic_version_ok) {
        fail(w, rc, D, 400, "anthropic-version: header is required (2023-06-01)");
        return;
    }
    size_t top = skip_ws(p, len, 0);
    if (top >= len || p[top] != '{') {
        fail(w, rc, D, 400, "The request body is not valid JSON.");
        return;
    }
    size_t model = obj_get(p, len, top, "model");
    size_t model_end = str_end(p, len, model);
    if (model_end == SIZE_MAX) {
        fail(w, rc, D, 400, "model: Field required");
        return;
    }
    if (!positive_int(p, len, obj_get(p, len, top, "max_tokens"))) {
        fail(w, rc, D, 400, "max_tokens: Field required");
        return;
    }
    size_t msgs = obj_get(p, len, top, "messages");
    if (msgs == SIZE_MAX || p[msgs] != '[') {
        fail(w, rc, D, 400, "messages: Field required");
        return;
    }
    size_t i = msgs + 1, m;
    int rcode, n = 0;
    while ((rcode = arr_next(p, len, &i, &m)) == 1) {
        n++;
        if (str_member_is(p, len, m, "role", "system")) {
            fail(w, rc, D, 400, "messages: Unexpected role \"system\". The Messages API accepts "
                                "a top-level `system` parameter, not \"system\" as an input "
                                "message role.");
            return;
        }
        if (!str_member_is(p, len, m, "role", "user") &&
            !str_member_is(p, len, m, "role", "assistant")) {
            fail(w, rc, D, 400, "messages.role: Input should be 'user' or 'assistant'");
            return;
        }
    }
    size_t ts = 0, te = 0;
    if (rcode != 0 || n == 0 || !last_user_text(p, len, msgs, &ts, &te)) {
        fail(w, rc, D, 400, "messages: at least one user message with text is required");
        return;
    }
    /* a forced tool: its input_schema shapes the answer */
    size_t schema = SIZE_MAX;
    size_t choice = obj_get(p, len, top, "tool_choice"), tools = obj_get(p, len, top, "tools");
    if (choice != SIZE_MAX && str_member_is(p, len, choice, "type", "tool") &&
        tools != SIZE_MAX && p[tools] == '[') {
        size_t name = obj_get(p, len, choice, "name"), ne = str_end(p, len, name);
        size_t j = tools + 1, t;
        while (ne != SIZE_MAX && schema == SIZE_MAX && arr_next(p, len, &j, &t) == 1) {
            size_t tn = obj_get(p, len, t, "name"), tne = str_end(p, len, tn);
            if (tne != SIZE_MAX && tne - tn == ne - name &&
                memcmp(p + tn, p + name, ne - name) == 0)
                schema = obj_get(p, len, t, "input_schema");
        }
        if (schema == SIZE_MAX || p[schema] != '{') {
            fail(w, rc, D, 400, "tool_choice: the forced tool needs an input_schema object");
            return;
        }
    }
    int structured = schema != SIZE_MAX && build_structured_schema(w, p, len, schema, ts, te);
    buf_t *b = &w->body;
    b->len = 0;
    buf_reserve(b, 320 + (te - ts) + (structured ? w->ans.len : 0));
    buf_puts(b, "{\"id\":\"msg_mock_");
    put_hex_id(b, p, len);
    buf_puts(b, "\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"");
    buf_put(b, p + model + 1, model_end - model - 1);
    size_t at;
    if (structured) {
        buf_puts(b, "\",\"content\":[{\"type\":\"tool_use\",\"id\":\"toolu_mock\",\"name\":\"tool\","
                    "\"input\":");
        at = b->len;
        buf_put(b, w->ans.p, w->ans.len);
        buf_puts(b, "}],\"stop_reason\":\"tool_use\"");
    } else {
        buf_puts(b, "\",\"content\":[{\"type\":\"text\",\"text\":\"echo: ");
        at = b->len;
        buf_put(b, p + ts, te - ts);
        buf_puts(b, "\"}],\"stop_reason\":\"end_turn\"");
    }
    uint64_t output = (b->len - at) / 4 + 1;
    buf_puts(b, ",\"stop_sequence\":null,\"usage\":{\"input_tokens\":");
    buf_putu(b, len / 4 + 1);
    buf_puts(b, ",\"output_tokens\":");
    buf_putu(b, output);
    buf_puts(b, "}}");
}

/* Text p[*ts, *te) of the first text part of the last user turn of Gemini's contents. */
static int last_user_part(const char *p, size_t len, size_t contents, size_t *ts, size_t *te,
                          const char **problem) {
    size_t i = contents + 1, c;
    int rcode, found = 0;
    while ((rcode = arr_next(p, len, &i, &c)) == 1) {
        size_t role = obj_get(p, len, c, "role");
        int user = role == SIZE_MAX || raw_is(p, role + 1, str_end(p, len, role), "user");
        if (!user && !raw_is(p, role + 1, str_end(p, len, role), "model")) {
            *problem = "Please use a valid role: user, model.";
            return 0;
        }
        size_t parts = obj_get(p, len, c, "parts");
        if (parts == SIZE_MAX || p[parts] != '[') {
            *problem = "* GenerateContentRequest.contents.parts: contents.parts must not be empty.";
            return 0;
        }
        if (!user) continue;
        size_t j = parts + 1, part;
        while (arr_next(p, len, &j, &part) == 1) {
            size_t t = obj_get(p, len, part, "text"), e = str_end(p, len, t);
            if (e != SIZE_MAX) {
                *ts = t + 1;
                *te = e;
                found = 1;
                break;
            }
        }
    }
    if (rcode != 0 || !found) {
        *problem = "* GenerateContentRequest.contents: contents is not specified";
        return 0;
    }
    return 1;
}

void route_generate(worker_t *w, route_ctx_t *rc) {
    const char *p = rc->body;
    size_t len = rc->blen;
    const int D = D_GEMINI;
    if (!rc->r->has_goog_api_key) {
        rc->status = 400;
        buf_puts(&w->body, "{\"error\":{\"code\":400,\"message\":\"API key not valid. Please pass a "
                           "valid API key.\",\"status\":\"INVALID_ARGUMENT\",\"details\":[{\"@type\":"
                           "\"type.googleapis.com/google.rpc.ErrorInfo\",\"reason\":"
                           "\"API_KEY_INVALID\",\"domain\":\"googleapis.com\"}]}}");
        return;
    }
    /* the model is the path's last segment, before ":generateContent" */
    const char *path = rc->r->path;
    size_t pe = rc->r->path_len - strlen(":generateContent"), ps = pe;
    while (ps > 0 && path[ps - 1] != '/') ps--;
    size_t top = skip_ws(p, len, 0);
    if (top >= len || p[top] != '{') {
        fail(w, rc, D, 400, "Invalid JSON payload received.");
        return;
    }
    if (obj_get(p, len, top, "messages") != SIZE_MAX) {
        fail(w, rc, D, 400, "Invalid JSON payload received. Unknown name \"messages\": Cannot "
                            "find field.");
        return;
    }
    size_t contents = obj_get(p, len, top, "contents");
    if (contents == SIZE_MAX || p[contents] != '[') {
        fail(w, rc, D, 400, "* GenerateContentRequest.contents: contents is not specified");
        return;
    }
    size_t ts = 0, te = 0;
    const char *problem = NULL;
    if (!last_user_part(p, len, contents, &ts, &te, &problem)) {
        fail(w, rc, D, 400, problem);
        return;
    }
    size_t schema = SIZE_MAX, config = obj_get(p, len, top, "generationConfig");
    if (config != SIZE_MAX && p[config] == '{') {
        schema = obj_get(p, len, config, "responseSchema");
        if (schema != SIZE_MAX) {
            size_t se = skip_value(p, len, schema);
            if (!str_member_is(p, len, config, "responseMimeType", "application/json")) {
                fail(w, rc, D, 400, "responseSchema needs responseMimeType application/json");
                return;
            }
            if (memmem(p + schema, se - schema, "\"additionalProperties\"", 22) ||
                memmem(p + schema, se - schema, "\"$ref\"", 6)) {
                fail(w, rc, D, 400, "Invalid JSON payload received. Unknown name "
                                    "\"additionalProperties\" at 'generation_config.response_schema'");
                return;
            }
        }
    }
    int structured = schema != SIZE_MAX && build_structured_schema(w, p, len, schema, ts, te);
    buf_t *b = &w->body;
    b->len = 0;
    buf_reserve(b, 320 + (te - ts) + (structured ? 2 * w->ans.len : 0));
    buf_puts(b, "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"");
    size_t at = b->len;
    if (structured) {
        put_escaped(b, w->ans.p, w->ans.len);
    } else {
        buf_puts(b, "echo: ");
        buf_put(b, p + ts, te - ts);
    }
    uint64_t output = (b->len - at) / 4 + 1, prompt = len / 4 + 1;
    buf_puts(b, "\"}],\"role\":\"model\"},\"finishReason\":\"STOP\",\"index\":0}],"
                "\"usageMetadata\":{\"promptTokenCount\":");
    buf_putu(b, prompt);
    buf_puts(b, ",\"candidatesTokenCount\":");
    buf_putu(b, output);
    buf_puts(b, ",\"totalTokenCount\":");
    buf_putu(b, prompt + output);
    buf_puts(b, "},\"modelVersion\":\"");
    buf_put(b, path + ps, pe - ps);
    buf_puts(b, "\",\"responseId\":\"mock-");
    put_hex_id(b, p, len);
    buf_puts(b, "\"}");
}
