/* module.c — CPython glue for the engine: types Engine and Batch.
 *
 * No business logic lives here: argument checking, conversion between Python objects and the
 * engine's C structures, and releasing the GIL around every wait. Worker threads never enter
 * this file's code. Multi-phase init (PEP 489) with heap types and one module state. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>

#include "blake2b.h"
#include "embedjson.h"
#include "engine.h"
#include "jsonstr.h"
#include "module_rows.h"
#include "nativejson.h"
#include "results.h"
#include "sx_clock.h"

/* ------------------------------------------------------------ Python 3.9
 * pyproject.toml promises Python >= 3.9. These four names arrived in 3.10; on 3.9 each gets
 * the nearest equivalent below. Everything else this file uses exists since 3.9
 * (PyType_FromModuleAndSpec, PyType_GetModule, PyModule_AddType). */
#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *sx_new_ref(PyObject *obj)
{
    Py_INCREF(obj);
    return obj;
}
#define Py_NewRef(obj) sx_new_ref((PyObject *)(obj))

/* Like PyModule_AddObject, but the caller keeps its reference whatever happens. */
static int sx_module_add_object_ref(PyObject *mod, const char *name, PyObject *value)
{
    if (!value) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "PyModule_AddObjectRef() given NULL");
        return -1;
    }
    Py_INCREF(value);
    if (PyModule_AddObject(mod, name, value) < 0) {
        Py_DECREF(value);
        return -1;
    }
    return 0;
}
#define PyModule_AddObjectRef sx_module_add_object_ref

/* 3.9's heap types cannot be made immutable: their attributes can be reassigned (only by
 * code that goes out of its way to; nothing in semex does). */
#define Py_TPFLAGS_IMMUTABLETYPE 0
/* 3.9 has no flag for "no Python-level constructor"; module_exec clears the type's tp_new
 * instead, which is what the flag does (type_call then refuses with "cannot create"). */
#define Py_TPFLAGS_DISALLOW_INSTANTIATION 0
#define SX_NEEDS_NO_NEW 1
#endif

typedef struct {
    PyTypeObject *engine_type;
    PyTypeObject *batch_type;
    PyObject *engine_error;   /* semex._engine.EngineError (RuntimeError) */
} module_state;

static module_state *state_of(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

typedef struct {
    PyObject_HEAD
    sx_engine *engine;
    PyObject *error_type;     /* borrowed from the module state, kept alive by a reference */
    int max_in_flight, workers;
    int ndeploys;             /* 0: one target; else batches need one target per deployment */
    double rpm, tpm;
    PyObject *weakreflist;    /* the Python layer keeps a WeakSet of live engines */
} EngineObject;

typedef struct {
    PyObject_HEAD
    EngineObject *owner;      /* strong: the engine must outlive its batches */
    sx_batch *batch;
} BatchObject;

/* How long a synchronous wait sleeps between checks for Ctrl-C. */
#define SX_WAIT_SLICE 0.05

static int engine_usable(EngineObject *self)
{
    if (!self->engine) {
        PyErr_SetString(self->error_type, "the engine is closed");
        return 0;
    }
    if (!sx_engine_owned(self->engine)) {
        PyErr_SetString(self->error_type,
                        "this engine was created in another process (before fork()); "
                        "create a new one in this process");
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------ Engine */

/* Engine(deployments=[(rpm, tpm, weight, max_in_flight), ...]): 2 or more, checked here. */
static int parse_deploys(PyObject *obj, sx_deploy_opts **out, Py_ssize_t *count)
{
    PyObject *seq = PySequence_Fast(obj, "deployments must be a list of (rpm, tpm, weight, "
                                         "max_in_flight) tuples");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 2 || n > 1000) {
        PyErr_Format(PyExc_ValueError, "deployments needs 2 to 1000 entries, got %zd", n);
        Py_DECREF(seq);
        return -1;
    }
    sx_deploy_opts *d = PyMem_Calloc((size_t)n, sizeof *d);
    if (!d) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) ||
            !PyArg_ParseTuple(item, "dddi", &d[i].rpm, &d[i].tpm, &d[i].weight,
                              &d[i].max_in_flight)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "deployments[%zd] must be a tuple (rpm, tpm, "
                         "weight, max_in_flight) of numbers", i);
            goto fail;
        }
        if (!(d[i].weight > 0) || !(d[i].rpm >= 0) || !(d[i].tpm >= 0) ||
            d[i].max_in_flight < 0) {
            PyErr_Format(PyExc_ValueError, "deployments[%zd]: weight must be > 0, rpm/tpm "
                         "and max_in_flight >= 0 (0: unlimited / the engine's cap)", i);
            goto fail;
        }
    }
    Py_DECREF(seq);
    *out = d;
    *count = n;
    return 0;
fail:
    Py_DECREF(seq);
    PyMem_Free(d);
    return -1;
}

/* submit(targets=[(url, [headers...]), ...]): one per deployment, added to batch b. */
static int add_targets(sx_batch *b, PyObject *obj, int ndeploys)
{
    PyObject *seq = PySequence_Fast(obj, "targets must be a list of (url, headers) tuples");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != ndeploys) {
        PyErr_Format(PyExc_ValueError, "targets has %zd entries but the engine has %d "
                     "deployments", n, ndeploys);
        Py_DECREF(seq);
        return -1;
    }
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        const char *url;
        PyObject *hdrs_obj;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "sO", &url, &hdrs_obj)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "targets[%zd] must be a tuple (url, headers)", i);
            goto done;
        }
        PyObject *hdrs = PySequence_Fast(hdrs_obj, "a target's headers must be a list");
        if (!hdrs)
            goto done;
        Py_ssize_t nh = PySequence_Fast_GET_SIZE(hdrs);
        const char **ptrs = PyMem_Calloc((size_t)nh + 1, sizeof *ptrs);
        int ok = ptrs != NULL;
        if (!ok)
            PyErr_NoMemory();
        for (Py_ssize_t k = 0; ok && k < nh; k++) {
            PyObject *h = PySequence_Fast_GET_ITEM(hdrs, k);
            ptrs[k] = PyUnicode_Check(h) ? PyUnicode_AsUTF8(h) : NULL;
            if (!ptrs[k]) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_TypeError, "targets[%zd] headers[%zd] must be a str",
                                 i, k);
                ok = 0;
            } else if (strpbrk(ptrs[k], "\r\n")) {
                PyErr_Format(PyExc_ValueError, "targets[%zd] headers[%zd] contains a line "
                             "break", i, k);
                ok = 0;
            }
        }
        if (ok && sx_batch_add_target(b, url, ptrs, (size_t)nh) != 0) {
            PyErr_NoMemory();
            ok = 0;
        }
        PyMem_Free(ptrs);
        Py_DECREF(hdrs);
        if (!ok)
            goto done;
    }
    rc = 0;
done:
    Py_DECREF(seq);
    return rc;
}

PyDoc_STRVAR(Engine_doc,
"Engine(*, workers=1, max_in_flight=64, rpm=0.0, tpm=0.0, adaptive=True, "
"queue_limit=1000000, http2=True, max_connections=0, lease=False, lease_tokens=False, "
"deployments=None, settle_tokens=True, own_http1=True)\n"
"--\n\n"
"The C concurrency engine: `workers` I/O threads, each with its own libcurl multi handle,\n"
"sharing one scheduler (in-flight cap, requests/min and tokens/min limits, cool-down after\n"
"429, adaptive concurrency, retries). rpm/tpm <= 0 mean unlimited.\n"
"deployments: 2 or more (rpm, tpm, weight, max_in_flight) tuples, one per deployment of\n"
"the same model; each keeps its own limits, window, cool-down and health, and every\n"
"attempt goes to one of them (see csrc/sched.h). rpm/tpm/max_in_flight above then bound\n"
"their sum; each batch gives one target (url, headers) per deployment.\n"
"settle_tokens: a success whose answer (read with parse_chat) gives its usage settles the\n"
"tokens it reserved: the unused part goes back to the tokens/min bucket(s), an overrun is\n"
"charged; and the first x-ratelimit-remaining-tokens sets the bucket's level. False: the\n"
"estimate is the charge.\n"
"own_http1: plain http:// requests to an IP address or localhost run on the workers' own\n"
"HTTP/1.1 (csrc/h1.h: less than half libcurl's CPU per request); TLS, proxies, host names and\n"
"special headers stay with libcurl. False, or SEMEX_HTTP=curl in the environment: libcurl\n"
"carries every request.");

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"workers", "max_in_flight", "rpm", "tpm", "adaptive",
                             "queue_limit", "http2", "max_connections", "lease",
                             "lease_tokens", "deployments", "settle_tokens", "own_http1", NULL};
    int workers = 1, max_in_flight = 64, adaptive = 1, http2 = 1, lease = 0, lease_tokens = 0;
    int settle_tokens = 1, own_http1 = 1;
    double rpm = 0.0, tpm = 0.0;
    Py_ssize_t queue_limit = 1000000;
    long max_connections = 0;
    PyObject *deploys_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$iiddpnplppOpp:Engine", kwlist, &workers,
                                     &max_in_flight, &rpm, &tpm, &adaptive, &queue_limit,
                                     &http2, &max_connections, &lease, &lease_tokens,
                                     &deploys_obj, &settle_tokens, &own_http1))
        return NULL;
    if (workers < 1 || workers > 64) {
        PyErr_Format(PyExc_ValueError, "workers must be between 1 and 64, got %d", workers);
        return NULL;
    }
    if (max_in_flight < 1) {
        PyErr_Format(PyExc_ValueError, "max_in_flight must be >= 1, got %d", max_in_flight);
        return NULL;
    }
    if (queue_limit < 1) {
        PyErr_SetString(PyExc_ValueError, "queue_limit must be >= 1");
        return NULL;
    }
    sx_deploy_opts *deploys = NULL;
    Py_ssize_t ndeploys = 0;
    if (deploys_obj != Py_None && parse_deploys(deploys_obj, &deploys, &ndeploys) < 0)
        return NULL;
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self) {
        PyMem_Free(deploys);
        return NULL;
    }
    PyObject *mod = PyType_GetModule(type);
    self->error_type = Py_NewRef(state_of(mod)->engine_error);
    sx_engine_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.workers = workers;
    opts.sched.max_in_flight = max_in_flight;
    opts.sched.rpm = rpm;
    opts.sched.tpm = tpm;
    opts.sched.adaptive = adaptive;
    opts.sched.queue_limit = (size_t)queue_limit;
    opts.sched.lease = lease;
    opts.sched.lease_tokens = lease && lease_tokens;
    opts.sched.deploys = deploys;
    opts.sched.ndeploys = (size_t)ndeploys;
    opts.sched.settle_tokens = settle_tokens;
    opts.http2 = http2;
    opts.max_connections = max_connections;
    const char *http_env = getenv("SEMEX_HTTP");
    opts.own_http1 = own_http1 && !(http_env && strcmp(http_env, "curl") == 0);
    self->max_in_flight = max_in_flight;
    self->workers = workers;
    self->rpm = rpm;
    self->tpm = tpm;
    self->ndeploys = (int)ndeploys;
    char err[256] = "";
    sx_engine *engine;
    Py_BEGIN_ALLOW_THREADS
    engine = sx_engine_new(&opts, err, sizeof err);
    Py_END_ALLOW_THREADS
    PyMem_Free(deploys);  /* the scheduler copied them */
    if (!engine) {
        PyErr_Format(self->error_type, "could not start the engine: %s", err);
        Py_DECREF(self);
        return NULL;
    }
    self->engine = engine;
    return (PyObject *)self;
}

static void engine_shutdown(EngineObject *self)
{
    sx_engine *engine = self->engine;
    if (!engine)
        return;
    self->engine = NULL;
    if (!sx_engine_owned(engine))
        return;  /* fork child: the parent's threads are not here; leaking is the safe choice */
    Py_BEGIN_ALLOW_THREADS
    sx_engine_free(engine);
    Py_END_ALLOW_THREADS
}

static void Engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    engine_shutdown(self);
    Py_CLEAR(self->error_type);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int Engine_traverse(EngineObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->error_type);
    return 0;
}

static int Engine_clear(EngineObject *self)
{
    Py_CLEAR(self->error_type);
    return 0;
}

PyDoc_STRVAR(Engine_submit_doc,
"submit($self, url, headers, bodies, tokens=None, *, timeout=60.0, connect_timeout=10.0,\n"
"       max_retries=5, max_body=67108864, verify=True, backoff_base=0.5, backoff_cap=30.0,\n"
"       notify_each=False, max_in_flight=0, parse_chat=False, share_cap_with=None,\n"
"       total_timeout=0.0, stream_deltas=False, ca_file=None, ca_path=None,\n"
"       max_hint_wait=120.0, targets=None)\n"
"--\n\n"
"Submit one batch: a request per item of `bodies` (bytes to POST, or None to GET), all to\n"
"`url` with `headers` (a list of 'Name: value' strings). `tokens` gives each request's\n"
"estimated token cost for the tokens/min limit. Returns a Batch whose results come back in\n"
"input order. max_in_flight > 0 caps this batch's own concurrency below the engine's.\n"
"parse_chat=1 (True, DIALECT_OPENAI): workers read each successful answer as a chat\n"
"completion as it lands; DIALECT_ANTHROPIC / DIALECT_GEMINI: as that API's answer, into the\n"
"same fields"
"(see Batch.chat_results). share_cap_with=<Batch of this engine>: count this batch's\n"
"requests against that batch's max_in_flight cap (one cap for a call split into windows).\n"
"total_timeout > 0: seconds one request may take over all its attempts and backoffs (waits\n"
"a 429 orders excepted); its last attempt's timeout is cut to what is left.\n"
"With parse_chat, event-stream answers are assembled by the workers into the same shape;\n"
"stream_deltas=True also queues their text as it arrives (see Batch.take_deltas).\n"
"ca_file / ca_path: a CA bundle file / a directory of CA certificates to verify servers\n"
"with instead of libcurl's default.\n"
"max_hint_wait: a server's Retry-After / retry-after-ms / x-ratelimit-reset-* asking for a\n"
"longer wait (seconds) is ignored, as if absent, so no response can stall the engine.\n"
"targets: for an engine with deployments, one (url, headers) per deployment, in its order:\n"
"where the requests that deployment is chosen for go (`url`/`headers` are then unused).");

static PyObject *Engine_submit(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"url", "headers", "bodies", "tokens", "timeout",
                             "connect_timeout", "max_retries", "max_body", "verify",
                             "backoff_base", "backoff_cap", "notify_each", "max_in_flight",
                             "parse_chat", "share_cap_with", "total_timeout", "stream_deltas",
                             "ca_file", "ca_path", "max_hint_wait", "targets", NULL};
    const char *url;
    PyObject *headers_obj, *bodies_obj, *tokens_obj = Py_None, *share_obj = Py_None;
    PyObject *targets_obj = Py_None;
    double timeout = 60.0, connect_timeout = 10.0, backoff_base = 0.5, backoff_cap = 30.0;
    double total_timeout = 0.0;
    double max_hint_wait = SX_HINT_WAIT_DEFAULT;
    int max_retries = 5, verify = 1, notify_each = 0, batch_cap = 0, parse_chat = 0;
    int stream_deltas = 0;
    const char *ca_file = NULL, *ca_path = NULL;
    Py_ssize_t max_body = 64 * 1024 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sOO|O$ddinpddpiiOdpzzdO:submit", kwlist,
                                     &url, &headers_obj, &bodies_obj, &tokens_obj, &timeout,
                                     &connect_timeout, &max_retries, &max_body, &verify,
                                     &backoff_base, &backoff_cap, &notify_each, &batch_cap,
                                     &parse_chat, &share_obj, &total_timeout, &stream_deltas,
                                     &ca_file, &ca_path, &max_hint_wait, &targets_obj))
        return NULL;
    if ((targets_obj == Py_None) != (self->ndeploys == 0)) {
        PyErr_SetString(PyExc_ValueError,
                        self->ndeploys ? "this engine has deployments: submit needs targets="
                                       : "targets= is for an engine built with deployments=");
        return NULL;
    }
    sx_batch *share_with = NULL;
    if (share_obj != Py_None) {
        PyObject *mod_ = PyType_GetModule(Py_TYPE(self));
        if (!PyObject_TypeCheck(share_obj, state_of(mod_)->batch_type) ||
            ((BatchObject *)share_obj)->owner != self || !((BatchObject *)share_obj)->batch) {
            PyErr_SetString(PyExc_ValueError,
                            "share_cap_with must be a Batch submitted to this engine");
            return NULL;
        }
        share_with = ((BatchObject *)share_obj)->batch;
    }
    if (!engine_usable(self))
        return NULL;
    if (!(timeout > 0) || !(connect_timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout and connect_timeout must be > 0 seconds");
        return NULL;
    }
    if (parse_chat < SX_DIALECT_NONE || parse_chat > SX_DIALECT_GEMINI) {
        PyErr_Format(PyExc_ValueError, "parse_chat must be 0..%d (a DIALECT_* constant), got %d",
                     SX_DIALECT_GEMINI, parse_chat);
        return NULL;
    }
    if (!(total_timeout >= 0)) {
        PyErr_SetString(PyExc_ValueError, "total_timeout must be >= 0 seconds (0: none)");
        return NULL;
    }
    if (max_retries < 0) {
        PyErr_Format(PyExc_ValueError, "max_retries must be >= 0, got %d", max_retries);
        return NULL;
    }
    if (max_body < 1) {
        PyErr_SetString(PyExc_ValueError, "max_body must be >= 1 byte");
        return NULL;
    }
    if (!(backoff_base >= 0) || !(backoff_cap >= 0)) {
        PyErr_SetString(PyExc_ValueError, "backoff_base and backoff_cap must be >= 0");
        return NULL;
    }
    if (!(max_hint_wait >= 0)) {
        PyErr_SetString(PyExc_ValueError, "max_hint_wait must be >= 0 seconds");
        return NULL;
    }

    PyObject *headers = NULL, *bodies = NULL, *tokens = NULL, *result = NULL;
    const char **header_ptrs = NULL, **body_ptrs = NULL;
    size_t *lens = NULL;
    double *costs = NULL;
    sx_batch *batch = NULL;

    headers = PySequence_Fast(headers_obj, "headers must be a list of 'Name: value' strings");
    if (!headers)
        goto done;
    bodies = PySequence_Fast(bodies_obj, "bodies must be a list of bytes");
    if (!bodies)
        goto done;
    Py_ssize_t nh = PySequence_Fast_GET_SIZE(headers);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(bodies);
    header_ptrs = PyMem_Calloc((size_t)nh + 1, sizeof *header_ptrs);
    body_ptrs = PyMem_Calloc((size_t)n + 1, sizeof *body_ptrs);
    lens = PyMem_Calloc((size_t)n + 1, sizeof *lens);
    if (!header_ptrs || !body_ptrs || !lens) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nh; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(headers, i);
        if (!PyUnicode_Check(h)) {
            PyErr_Format(PyExc_TypeError, "headers[%zd] must be a str, not %.100s", i,
                         Py_TYPE(h)->tp_name);
            goto done;
        }
        header_ptrs[i] = PyUnicode_AsUTF8(h);
        if (!header_ptrs[i])
            goto done;
        if (strpbrk(header_ptrs[i], "\r\n")) {
            PyErr_Format(PyExc_ValueError, "headers[%zd] contains a line break", i);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *body = PySequence_Fast_GET_ITEM(bodies, i);
        if (body == Py_None)
            continue;
        char *ptr;
        Py_ssize_t len;
        if (!PyBytes_Check(body)) {
            PyErr_Format(PyExc_TypeError, "bodies[%zd] must be bytes or None, not %.100s", i,
                         Py_TYPE(body)->tp_name);
            goto done;
        }
        PyBytes_AsStringAndSize(body, &ptr, &len);
        body_ptrs[i] = ptr;
        lens[i] = (size_t)len;
    }
    if (tokens_obj != Py_None) {
        tokens = PySequence_Fast(tokens_obj, "tokens must be a list of numbers");
        if (!tokens)
            goto done;
        if (PySequence_Fast_GET_SIZE(tokens) != n) {
            PyErr_Format(PyExc_ValueError, "tokens has %zd items but bodies has %zd",
                         PySequence_Fast_GET_SIZE(tokens), n);
            goto done;
        }
        costs = PyMem_Calloc((size_t)n + 1, sizeof *costs);
        if (!costs) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            double c = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(tokens, i));
            if (c == -1.0 && PyErr_Occurred())
                goto done;
            if (!(c >= 0)) {
                PyErr_Format(PyExc_ValueError, "tokens[%zd] must be >= 0", i);
                goto done;
            }
            costs[i] = c;
        }
    }

    sx_request_opts opts = {
        .timeout = timeout,
        .connect_timeout = connect_timeout,
        .max_retries = max_retries,
        .max_body = (size_t)max_body,
        .verify_tls = verify,
        .backoff_base = backoff_base,
        .backoff_cap = backoff_cap,
        .max_hint_wait = max_hint_wait,
        .notify_each = notify_each,
        .max_in_flight = batch_cap > 0 ? batch_cap : 0,
        .parse_chat = parse_chat,
        .total_timeout = total_timeout,
        .ca_file = ca_file,
        .ca_path = ca_path,
        .stream_deltas = parse_chat == SX_DIALECT_OPENAI && stream_deltas,
    };
    batch = sx_batch_new(url, header_ptrs, (size_t)nh, body_ptrs, lens, costs, (size_t)n,
                         &opts);
    if (!batch) {
        PyErr_NoMemory();
        goto done;
    }
    if (targets_obj != Py_None && add_targets(batch, targets_obj, self->ndeploys) < 0) {
        sx_batch_free(batch);
        batch = NULL;
        goto done;
    }
    if (share_with)
        sx_batch_share_cap(batch, share_with);
    PyObject *mod = PyType_GetModule(Py_TYPE(self));
    BatchObject *bo = PyObject_GC_New(BatchObject, state_of(mod)->batch_type);
    if (!bo) {
        sx_batch_free(batch);
        goto done;
    }
    bo->owner = (EngineObject *)Py_NewRef(self);
    bo->batch = NULL;
    int rc = sx_engine_submit(self->engine, batch);
    if (rc != 0) {
        sx_batch_free(batch);
        if (rc == -1)
            PyErr_Format(self->error_type,
                         "the engine's queue is full (queue_limit); submit %zd requests "
                         "in smaller windows", n);
        else if (rc == -3)
            PyErr_SetString(PyExc_ValueError, "the batch needs one target per deployment");
        else
            PyErr_SetString(self->error_type, "the engine is closed");
        Py_DECREF(bo);
        goto done;
    }
    bo->batch = batch;
    PyObject_GC_Track(bo);
    result = (PyObject *)bo;

done:
    Py_XDECREF(headers);
    Py_XDECREF(bodies);
    Py_XDECREF(tokens);
    PyMem_Free(header_ptrs);
    PyMem_Free(body_ptrs);
    PyMem_Free(lens);
    PyMem_Free(costs);
    return result;
}

PyDoc_STRVAR(Engine_close_doc,
"close($self)\n--\n\nCancel everything pending and join the worker threads. Idempotent.");

static PyObject *Engine_close(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    engine_shutdown(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Engine_stats_doc,
"stats($self)\n--\n\nA dict snapshot of the scheduler: in_flight, window, queued, "
"retry_waiting, cooldown_remaining, admitted, retries, http_429, timeouts, cooldowns, "
"window_cuts, lease_waits, bare_429_episodes (overload episodes told only by 429s without hints),\n"
"learned_rpm (the requests/min learned from them; 0 until the first). With deployments, also\n"
"deployments: one dict each (in_flight, window, cooldown_remaining, in_service,\n"
"out_of_service_remaining, admitted, ok, failed, http_429, trips, learned_rpm, disabled:\n"
"'auth' or 'quota' once a 401/403 or insufficient_quota took it out for good, else '').\n"
"tokens_settled (reservations settled against an answer's usage), tokens_refunded and\n"
"tokens_overrun (what those settlements gave back to and took from the tokens/min bucket).");

static PyObject *Engine_stats(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!engine_usable(self))
        return NULL;
    sx_engine *e = self->engine;
    sx_engine_lock(e);
    sx_sched_stats st = e->sched.stats;
    size_t in_flight = e->sched.in_flight, queued = e->sched.queued;
    size_t retrying = e->sched.heap_len;
    int window = sx_sched_window(&e->sched);
    double learned = e->sched.pace.active ? e->sched.pace.rate * 60.0 : 0.0;
    double now = sx_now();
    double cooldown = e->sched.cooldown_until - now;
    size_t nd = e->sched.ndeploy;
    sx_deploy *deploys = nd ? PyMem_RawMalloc(nd * sizeof *deploys) : NULL;
    int windows[1000];
    if (deploys) {
        memcpy(deploys, e->sched.deploy, nd * sizeof *deploys);
        for (size_t i = 0; i < nd && i < 1000; i++)
            windows[i] = sx_deploy_window(&e->sched, &e->sched.deploy[i]);
    }
    sx_engine_unlock(e);
    if (nd && !deploys)
        return PyErr_NoMemory();
    PyObject *result = Py_BuildValue(
        "{s:n,s:i,s:n,s:n,s:d,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:d,s:K,s:d,s:d}", "in_flight",
        (Py_ssize_t)in_flight,
        "window", window, "queued", (Py_ssize_t)queued, "retry_waiting", (Py_ssize_t)retrying,
        "cooldown_remaining", cooldown > 0 ? cooldown : 0.0, "admitted",
        (unsigned long long)st.admitted, "retries", (unsigned long long)st.retries,
        "http_429", (unsigned long long)st.http_429, "timeouts",
        (unsigned long long)st.timeouts, "cooldowns", (unsigned long long)st.cooldowns,
        "window_cuts", (unsigned long long)st.window_cuts, "lease_waits",
        (unsigned long long)st.lease_waits, "bare_429_episodes",
        (unsigned long long)st.bare_episodes, "learned_rpm", learned, "tokens_settled",
        (unsigned long long)st.settled, "tokens_refunded", st.tokens_refunded, "tokens_overrun",
        st.tokens_overrun);
    if (result && nd) {
        PyObject *list = PyList_New((Py_ssize_t)nd);
        for (size_t i = 0; list && i < nd; i++) {
            const sx_deploy *d = &deploys[i];
            double cool = d->cooldown_until - now, down = d->down_until - now;
            PyObject *item = Py_BuildValue(
                "{s:n,s:i,s:d,s:O,s:d,s:K,s:K,s:K,s:K,s:K,s:d,s:s}", "in_flight",
                (Py_ssize_t)d->in_flight, "window", windows[i], "cooldown_remaining",
                cool > 0 ? cool : 0.0, "in_service",
                sx_deploy_in_service(d, now) ? Py_True : Py_False, "out_of_service_remaining",
                !sx_deploy_in_service(d, now) && down > 0 ? down : 0.0, "admitted",
                (unsigned long long)d->stats.admitted, "ok", (unsigned long long)d->stats.ok,
                "failed", (unsigned long long)d->stats.failed, "http_429",
                (unsigned long long)d->stats.http_429, "trips",
                (unsigned long long)d->stats.trips, "learned_rpm",
                d->pace.active ? d->pace.rate * 60.0 : 0.0, "disabled",
                !d->disabled ? "" : d->stats.disabled_kind == SX_ERR_QUOTA ? "quota" : "auth");
            if (!item) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        }
        if (!list || PyDict_SetItemString(result, "deployments", list) < 0)
            Py_CLEAR(result);
        Py_XDECREF(list);
    }
    PyMem_RawFree(deploys);
    return result;
}

static PyObject *Engine_repr(EngineObject *self)
{
    /* Only numbers: an engine has no secrets, but keep it that way by construction. */
    return PyUnicode_FromFormat("<semex._engine.Engine workers=%d max_in_flight=%d %s>",
                                self->workers, self->max_in_flight,
                                self->engine ? "running" : "closed");
}

static PyObject *Engine_get_closed(EngineObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->engine == NULL);
}

static PyObject *Engine_get_forked(EngineObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->engine != NULL && !sx_engine_owned(self->engine));
}

PyDoc_STRVAR(Engine_grant_doc,
"grant($self, requests, tokens=0.0)\n--\n\n"
"Add budget to the engine's lease (an Engine built with lease=True admits requests only\n"
"while it lasts; each attempt spends one request and, with lease_tokens, its estimated\n"
"tokens) and wake the workers.");

static PyObject *Engine_grant(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"requests", "tokens", NULL};
    double requests, tokens = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "d|d:grant", kwlist, &requests, &tokens))
        return NULL;
    if (!(requests >= 0) || !(tokens >= 0)) {
        PyErr_SetString(PyExc_ValueError, "grant() takes budgets >= 0");
        return NULL;
    }
    if (!engine_usable(self))
        return NULL;
    sx_engine_grant(self->engine, requests, tokens);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Engine_lease_doc,
"lease($self)\n--\n\n"
"(requests_left, tokens_left, requests_used, tokens_used) of the granted budget; left may\n"
"be negative (a debt the next grant pays first).");

static PyObject *Engine_lease(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!engine_usable(self))
        return NULL;
    sx_lease lease = sx_engine_lease(self->engine);
    return Py_BuildValue("(dddd)", lease.requests, lease.tokens, lease.used_requests,
                         lease.used_tokens);
}

static PyMethodDef Engine_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Engine_submit, METH_VARARGS | METH_KEYWORDS,
     Engine_submit_doc},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, Engine_close_doc},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, Engine_stats_doc},
    {"grant", (PyCFunction)(void (*)(void))Engine_grant, METH_VARARGS | METH_KEYWORDS,
     Engine_grant_doc},
    {"lease", (PyCFunction)Engine_lease, METH_NOARGS, Engine_lease_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"closed", (getter)Engine_get_closed, NULL, "True once close() ran.", NULL},
    {"forked", (getter)Engine_get_forked, NULL,
     "True in a fork() child: this engine cannot be used here.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Engine_members[] = {
    {"workers", T_INT, offsetof(EngineObject, workers), READONLY, "I/O threads."},
    {"max_in_flight", T_INT, offsetof(EngineObject, max_in_flight), READONLY,
     "The in-flight cap."},
    {"rpm", T_DOUBLE, offsetof(EngineObject, rpm), READONLY, "Requests/min limit (0: none)."},
    {"tpm", T_DOUBLE, offsetof(EngineObject, tpm), READONLY, "Tokens/min limit (0: none)."},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(EngineObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Engine_slots[] = {
    {Py_tp_doc, (void *)Engine_doc},
    {Py_tp_new, Engine_new},
    {Py_tp_dealloc, Engine_dealloc},
    {Py_tp_traverse, Engine_traverse},
    {Py_tp_clear, Engine_clear},
    {Py_tp_repr, Engine_repr},
    {Py_tp_methods, Engine_methods},
    {Py_tp_getset, Engine_getset},
    {Py_tp_members, Engine_members},
    {0, NULL},
};

static PyType_Spec Engine_spec = {
    .name = "semex._engine.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Engine_slots,
};

/* ------------------------------------------------------------------ Batch */

static int batch_usable(BatchObject *self)
{
    if (!self->batch) {
        PyErr_SetString(PyExc_RuntimeError, "this batch was never submitted");
        return 0;
    }
    if (!self->owner->engine || !sx_engine_owned(self->owner->engine)) {
        /* Closed engine: slots are final and readable. A fork child: refuse. */
        if (self->owner->engine) {
            PyErr_SetString(self->owner->error_type,
                            "this batch belongs to an engine of another process (before "
                            "fork())");
            return 0;
        }
    }
    return 1;
}

/* The engine lock, or nothing when the engine is gone (all slots final then). */
static void batch_lock(BatchObject *self)
{
    if (self->owner->engine)
        sx_engine_lock(self->owner->engine);
}

static void batch_unlock(BatchObject *self)
{
    if (self->owner->engine)
        sx_engine_unlock(self->owner->engine);
}

static void Batch_dealloc(BatchObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->batch) {
        sx_engine *e = self->owner->engine;
        if (e && sx_engine_owned(e)) {
            sx_engine_release_batch(e, self->batch);
        } else if (!e) {
            sx_batch_free(self->batch);  /* engine closed: nobody else holds it */
        }
        /* fork child with a live parent engine: leak rather than touch foreign locks */
        self->batch = NULL;
    }
    Py_CLEAR(self->owner);
    PyObject_GC_Del(self);
    Py_DECREF(tp);
}

static int Batch_traverse(BatchObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->owner);
    return 0;
}

PyDoc_STRVAR(Batch_wait_doc,
"wait($self, timeout=None)\n--\n\n"
"Block until the batch finishes or `timeout` seconds pass; return True when finished.\n"
"The GIL is released while waiting. Ctrl-C (or any signal handler that raises) cancels the\n"
"batch's remaining work and raises.");

static PyObject *Batch_wait(BatchObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:wait", kwlist, &timeout_obj))
        return NULL;
    double timeout = -1;
    if (timeout_obj != Py_None) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (timeout == -1.0 && PyErr_Occurred())
            return NULL;
        if (timeout < 0)
            timeout = 0;
    }
    if (!batch_usable(self))
        return NULL;
    sx_engine *e = self->owner->engine;
    if (!e)
        Py_RETURN_TRUE;  /* closed engine: every slot is final */
    double until = timeout >= 0 ? sx_now() + timeout : -1;
    for (;;) {
        double slice = SX_WAIT_SLICE;
        if (until >= 0) {
            double left = until - sx_now();
            if (left < slice)
                slice = left > 0 ? left : 0;
        }
        int done;
        Py_BEGIN_ALLOW_THREADS
        done = sx_engine_wait(e, self->batch, slice);
        Py_END_ALLOW_THREADS
        if (done)
            Py_RETURN_TRUE;
        if (PyErr_CheckSignals() < 0) {
            sx_engine_cancel(e, self->batch);
            return NULL;
        }
        if (until >= 0 && sx_now() >= until)
            Py_RETURN_FALSE;
    }
}

PyDoc_STRVAR(Batch_fileno_doc,
"fileno($self)\n--\n\n"
"An eventfd that becomes readable when the batch finishes (or, with notify_each, when any\n"
"request finishes). For loop.add_reader; clear it with clear_notify().");

static PyObject *Batch_fileno(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!batch_usable(self))
        return NULL;
    batch_lock(self);
    int fd = sx_batch_fileno(self->batch);
    batch_unlock(self);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

PyDoc_STRVAR(Batch_clear_notify_doc,
"clear_notify($self)\n--\n\nConsume the eventfd's wake-up; returns the number of finished "
"requests.");

static PyObject *Batch_clear_notify(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!batch_usable(self))
        return NULL;
    batch_lock(self);
    sx_batch_clear_notify(self->batch);
    size_t done = self->batch->done;
    batch_unlock(self);
    return PyLong_FromSize_t(done);
}

PyDoc_STRVAR(Batch_cancel_doc,
"cancel($self)\n--\n\nCancel the unfinished requests: waiting ones at once, in-flight "
"transfers promptly (their connections are closed). Finished results are kept.");

static PyObject *Batch_cancel(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!batch_usable(self))
        return NULL;
    if (self->owner->engine)
        sx_engine_cancel(self->owner->engine, self->batch);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Batch_take_deltas_doc,
"take_deltas($self)\n--\n\n"
"The text streamed so far and not taken yet (a batch submitted with stream_deltas=True), as\n"
"a list of (index, text) in arrival order; text None means the request's attempt that\n"
"streamed the earlier text failed (it is being retried, or failed): discard that text.\n"
"For one index the texts arrive in order and, after its last None, join to its answer.");

static PyObject *Batch_take_deltas(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!batch_usable(self))
        return NULL;
    size_t len = 0;
    batch_lock(self);
    char *records = sx_batch_take_deltas(self->batch, &len);
    batch_unlock(self);
    PyObject *list = PyList_New(0);
    for (size_t off = 0; list && off + sizeof(sx_delta_head) <= len;) {
        sx_delta_head head;
        memcpy(&head, records + off, sizeof head);
        off += sizeof head;
        PyObject *text;
        if (head.len < 0) {
            text = Py_NewRef(Py_None);
        } else {
            /* whole code points: workers queue text decoded from complete JSON strings */
            text = PyUnicode_DecodeUTF8(records + off, head.len, "strict");
            off += (size_t)head.len;
        }
        PyObject *item = text ? Py_BuildValue("(IN)", (unsigned)head.index, text) : NULL;
        if (!item || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    free(records);
    return list;
}

PyDoc_STRVAR(Batch_progress_doc,
"progress($self)\n--\n\n(done, ok, failed, cancelled, retries, http_429) so far.");

static PyObject *Batch_progress(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!batch_usable(self))
        return NULL;
    batch_lock(self);
    sx_batch *b = self->batch;
    size_t done = b->done, ok = b->ok, failed = b->failed, cancelled = b->cancelled;
    unsigned long long retries = b->retries, h429 = b->http_429;
    batch_unlock(self);
    return Py_BuildValue("(nnnnKK)", (Py_ssize_t)done, (Py_ssize_t)ok, (Py_ssize_t)failed,
                         (Py_ssize_t)cancelled, retries, h429);
}

/* (state, error_kind, http_status, body, error, attempts, last); `last` is stolen. The body
 * is left out (None) when `skip_body`. */
static PyObject *slot_tuple_body(const sx_slot *s, int skip_body, PyObject *last)
{
    PyObject *body, *error;
    if (!last)
        return NULL;
    if (s->response && !skip_body) {
        body = PyBytes_FromStringAndSize(s->response, (Py_ssize_t)s->response_len);
    } else {
        body = Py_NewRef(Py_None);
    }
    if (!body) {
        Py_DECREF(last);
        return NULL;
    }
    if (s->error) {
        error = PyUnicode_DecodeUTF8(s->error, (Py_ssize_t)strlen(s->error), "replace");
        if (!error) {
            Py_DECREF(body);
            Py_DECREF(last);
            return NULL;
        }
    } else {
        error = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(iiiNNiN)", (int)s->state, (int)s->error_kind, s->http_status, body,
                         error, s->attempts, last);
}

static PyObject *slot_tuple_with(const sx_slot *s, PyObject *last)
{
    return slot_tuple_body(s, s->chat.parsed, last);  /* a parsed body was rewritten */
}

static PyObject *slot_tuple(const sx_slot *s)
{
    return slot_tuple_with(s, PyFloat_FromDouble(s->latency));
}

/* A parsed chat answer as (content, finish_reason, prompt, completion, total tokens). */
static PyObject *chat_tuple(const sx_slot *s)
{
    const sx_chat *c = &s->chat;
    PyObject *content, *finish;
    if (c->content_null)
        content = Py_NewRef(Py_None);
    else
        content = PyUnicode_DecodeUTF8(s->response + c->content_off,
                                       (Py_ssize_t)c->content_len, "strict");
    if (!content)
        return NULL;
    if (c->finish_null)
        finish = Py_NewRef(Py_None);
    else
        finish = PyUnicode_DecodeUTF8(s->response + c->finish_off, (Py_ssize_t)c->finish_len,
                                      "strict");
    if (!finish) {
        Py_DECREF(content);
        return NULL;
    }
    return Py_BuildValue("(NNLLL)", content, finish, (long long)c->prompt_tokens,
                         (long long)c->completion_tokens, (long long)c->total_tokens);
}

/* results()' tuple with its last item replaced by the parsed answer (or None). A parsed
 * answer's body is not turned into bytes (slot_tuple_with leaves it None): nobody reads it. */
static PyObject *slot_chat_tuple(const sx_slot *s)
{
    int parsed = s->state == SX_OK && s->chat.parsed && s->response;
    return slot_tuple_with(s, parsed ? chat_tuple(s) : Py_NewRef(Py_None));
}

typedef PyObject *(*slot_converter)(const sx_slot *);

static PyObject *batch_tuples(BatchObject *self, slot_converter convert)
{
    if (!batch_usable(self))
        return NULL;
    sx_batch *b = self->batch;
    batch_lock(self);
    int done = b->done == b->n;
    if (done)
        batch_unlock(self);  /* final slots never change again: convert without the lock */
    PyObject *list = PyList_New((Py_ssize_t)b->n);
    if (list) {
        for (size_t i = 0; i < b->n; i++) {
            PyObject *item = convert(&b->slots[i]);
            if (!item) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        }
    }
    if (!done)
        batch_unlock(self);
    return list;
}

PyDoc_STRVAR(Batch_chat_results_doc,
"chat_results($self)\n--\n\n"
"results(), with the last item of each tuple (latency) replaced by the parsed answer of a\n"
"batch submitted with parse_chat=True: (content, finish_reason, prompt_tokens,\n"
"completion_tokens, total_tokens), content/finish_reason None for JSON null, token counts 0\n"
"when absent. Such rows carry body None. None instead where the answer was not read (not\n"
"OK, or a body the fast reader leaves to json.loads: then body holds the bytes).");

static PyObject *Batch_chat_results(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    return batch_tuples(self, slot_chat_tuple);
}

/* batch_usable, and every slot final (else RuntimeError naming `what`). */
static int batch_finished(BatchObject *self, const char *what)
{
    if (!batch_usable(self))
        return 0;
    batch_lock(self);
    int done = self->batch->done == self->batch->n;
    batch_unlock(self);
    if (!done)
        PyErr_Format(PyExc_RuntimeError, "%s needs a finished batch", what);
    return done;
}

PyDoc_STRVAR(Batch_settle_doc,
"settle($self, usage, /)\n--\n\n"
"usage: a list of (offset, prompt_tokens, completion_tokens, total_tokens) for successes\n"
"whose usage Python read (answers the worker left to json.loads, embeddings answers): each\n"
"such request's tokens/min reservation is settled against what it used, by the rule the\n"
"worker settles the answers it reads by (Engine settle_tokens). A request already settled,\n"
"failed, or whose usage says nothing is left alone. Returns how many were settled.");

static PyObject *Batch_settle(BatchObject *self, PyObject *arg)
{
    if (!batch_usable(self))
        return NULL;
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError,
                        "settle: a list of (offset, prompt, completion, total)");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    if (n == 0)
        return PyLong_FromLong(0);
    size_t *index = PyMem_Malloc((size_t)n * sizeof *index);
    double *used = PyMem_Malloc((size_t)n * sizeof *used);
    PyObject *result = NULL;
    if (!index || !used) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyList_GET_ITEM(arg, k);
        Py_ssize_t offset;
        PyObject *counts[3];
        if (!PyTuple_Check(item) ||
            !PyArg_ParseTuple(item, "nOOO", &offset, &counts[0], &counts[1], &counts[2])) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_TypeError,
                                "settle: a list of (offset, prompt, completion, total)");
            }
            goto done;
        }
        if (offset < 0 || (size_t)offset >= self->batch->n) {
            PyErr_SetString(PyExc_IndexError, "settle: no such offset");
            goto done;
        }
        /* a provider's counts, whatever their size: one too big for a double (or not a
         * number) says nothing to settle by */
        double c[3];
        int readable = 1;
        for (int j = 0; j < 3; j++) {
            c[j] = PyFloat_AsDouble(counts[j]);
            if (c[j] == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                readable = 0;
            }
        }
        index[k] = (size_t)offset;
        used[k] = readable ? sx_usage_tokens(c[0], c[1], c[2]) : -1;
    }
    size_t settled = self->owner->engine  /* a closed engine has no buckets left */
                         ? sx_engine_settle(self->owner->engine, self->batch, index, used,
                                            (size_t)n)
                         : 0;
    result = PyLong_FromSize_t(settled);
done:
    PyMem_Free(index);
    PyMem_Free(used);
    return result;
}

PyDoc_STRVAR(Batch_chat_result_doc,
"chat_result($self, offset, /)\n--\n\n"
"chat_results()[offset], alone.");

static PyObject *Batch_chat_result(BatchObject *self, PyObject *arg)
{
    if (!batch_usable(self))
        return NULL;
    Py_ssize_t k = PyLong_AsSsize_t(arg);
    if (k == -1 && PyErr_Occurred())
        return NULL;
    sx_batch *b = self->batch;
    if (k < 0 || (size_t)k >= b->n) {
        PyErr_SetString(PyExc_IndexError, "chat_result: no such offset");
        return NULL;
    }
    batch_lock(self);
    PyObject *item = slot_chat_tuple(&b->slots[k]);
    batch_unlock(self);
    return item;
}

PyDoc_STRVAR(Batch_collect_chat_doc,
"collect_chat($self, outputs, finish_reasons, start, /)\n--\n\n"
"For a finished batch submitted with parse_chat=True: each answer the worker read with text\n"
"content goes into outputs[start + offset] (its finish reason into finish_reasons[...]), so\n"
"Python touches no tuple for it. Returns (rest, requests, retries, prompt_tokens,\n"
"completion_tokens, total_tokens): `rest` the offsets left for chat_result() (failed, not\n"
"read, or null content), the counts summed over the others.");

static PyObject *Batch_collect_chat(BatchObject *self, PyObject *args)
{
    PyObject *outputs, *finishes;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "O!O!n:collect_chat", &PyList_Type, &outputs, &PyList_Type,
                          &finishes, &start))
        return NULL;
    if (!batch_finished(self, "collect_chat"))
        return NULL;
    sx_batch *b = self->batch;
    if (start < 0 || start + (Py_ssize_t)b->n > PyList_GET_SIZE(outputs) ||
        start + (Py_ssize_t)b->n > PyList_GET_SIZE(finishes)) {
        PyErr_SetString(PyExc_IndexError, "collect_chat: the lists are too short");
        return NULL;
    }
    PyObject *rest = PyList_New(0);
    if (!rest)
        return NULL;
    long long requests = 0, retries = 0, prompt = 0, completion = 0, total = 0;
    for (size_t k = 0; k < b->n; k++) {
        const sx_slot *s = &b->slots[k];
        const sx_chat *c = &s->chat;
        if (s->state != SX_OK || !c->parsed || !s->response || c->content_null) {
            PyObject *offset = PyLong_FromSize_t(k);
            if (!offset || PyList_Append(rest, offset) < 0) {
                Py_XDECREF(offset);
                Py_DECREF(rest);
                return NULL;
            }
            Py_DECREF(offset);
            continue;
        }
        PyObject *content = PyUnicode_DecodeUTF8(s->response + c->content_off,
                                                 (Py_ssize_t)c->content_len, "strict");
        PyObject *finish = c->finish_null ? Py_NewRef(Py_None)
                                          : PyUnicode_DecodeUTF8(s->response + c->finish_off,
                                                                 (Py_ssize_t)c->finish_len,
                                                                 "strict");
        if (!content || !finish) {
            Py_XDECREF(content);
            Py_XDECREF(finish);
            Py_DECREF(rest);
            return NULL;
        }
        Py_ssize_t i = start + (Py_ssize_t)k;
        PyList_SetItem(outputs, i, content);   /* steals; releases what was there */
        PyList_SetItem(finishes, i, finish);
        requests += s->attempts;
        if (s->attempts > 1)
            retries += s->attempts - 1;
        prompt += c->prompt_tokens;
        completion += c->completion_tokens;
        total += c->total_tokens;
    }
    return Py_BuildValue("(NLLLLL)", rest, requests, retries, prompt, completion, total);
}

/* A 1-D buffer of n items of `itemsize` bytes with format `fmt` (any of its characters). */
static int get_vector_buffer(PyObject *obj, Py_buffer *view, int writable, const char *fmts,
                             Py_ssize_t itemsize, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    if (view->ndim != 1 || view->itemsize != itemsize || strlen(f) != 1 || !strchr(fmts, *f)) {
        PyErr_Format(PyExc_TypeError, "%s must be a 1-D C-contiguous array of %zd-byte items",
                     name, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(Batch_read_embeddings_doc,
"read_embeddings($self, out, rows, offsets, row_state)\n--\n\n"
"Read every successful answer of a finished batch as an embeddings response, writing each\n"
"vector into `out` (a writable C-contiguous float32 matrix, rows x dim) with the GIL\n"
"released. Request i's inputs are rows[offsets[i]:offsets[i+1]] (int64) of `out`; their\n"
"outcomes go to the same positions of `row_state` (uint8: 1 written, 0 no vector for it,\n"
"2 two vectors for it, 3 a vector of another length). Returns one tuple per request, as\n"
"results() but with the last item (prompt_tokens, total_tokens, vectors, out_of_range,\n"
"bad_length) where the answer was read and None where it was not (not OK, or a body left to\n"
"json.loads: then body holds the bytes and that request's rows are to be read from it).");

static PyObject *Batch_read_embeddings(BatchObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"out", "rows", "offsets", "row_state", NULL};
    PyObject *out_obj, *rows_obj, *offsets_obj, *state_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO:read_embeddings", kwlist, &out_obj,
                                     &rows_obj, &offsets_obj, &state_obj))
        return NULL;
    if (!batch_finished(self, "read_embeddings"))
        return NULL;
    sx_batch *b = self->batch;
    Py_buffer out, rows, offsets, row_state;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                                              PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *result = NULL;
    float *scratch = NULL;
    uint8_t *parsed = NULL;
    sx_embed_result *res = NULL;
    int have_rows = 0, have_offsets = 0, have_state = 0;
    const char *f = out.format ? out.format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    if (out.ndim != 2 || out.itemsize != 4 || strcmp(f, "f") != 0 || out.shape[1] < 1) {
        PyErr_SetString(PyExc_TypeError, "out must be a writable C-contiguous float32 "
                        "matrix with at least one column");
        goto done;
    }
    if (get_vector_buffer(rows_obj, &rows, 0, "qlL", 8, "rows") < 0)
        goto done;
    have_rows = 1;
    if (get_vector_buffer(offsets_obj, &offsets, 0, "qlL", 8, "offsets") < 0)
        goto done;
    have_offsets = 1;
    if (get_vector_buffer(state_obj, &row_state, 1, "BbMc?", 1, "row_state") < 0)
        goto done;
    have_state = 1;
    size_t nrows = (size_t)out.shape[0], dim = (size_t)out.shape[1];
    size_t m = (size_t)rows.shape[0];
    const int64_t *rowv = rows.buf, *offv = offsets.buf;
    if ((size_t)offsets.shape[0] != b->n + 1 || offv[0] != 0 || (size_t)offv[b->n] != m ||
        (size_t)row_state.shape[0] != m) {
        PyErr_Format(PyExc_ValueError, "offsets must have %zd items, start at 0 and end at "
                     "len(rows); row_state must have len(rows) items", (Py_ssize_t)b->n + 1);
        goto done;
    }
    for (size_t i = 0; i < b->n; i++) {
        if (offv[i + 1] < offv[i]) {
            PyErr_Format(PyExc_ValueError, "offsets[%zd] is below offsets[%zd]",
                         (Py_ssize_t)i + 1, (Py_ssize_t)i);
            goto done;
        }
    }
    for (size_t k = 0; k < m; k++) {
        if (rowv[k] < 0 || (size_t)rowv[k] >= nrows) {
            PyErr_Format(PyExc_ValueError, "rows[%zd] = %lld is not a row of out",
                         (Py_ssize_t)k, (long long)rowv[k]);
            goto done;
        }
    }
    scratch = PyMem_RawMalloc(dim * sizeof *scratch);
    parsed = PyMem_RawCalloc(b->n + 1, 1);
    res = PyMem_RawCalloc(b->n + 1, sizeof *res);
    if (!scratch || !parsed || !res) {
        PyErr_NoMemory();
        goto done;
    }
    /* Final slots never change again, and `out` stays ours while the buffer is held. */
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < b->n; i++) {
        const sx_slot *s = &b->slots[i];
        if (s->state != SX_OK || !s->response)
            continue;
        sx_embed_target t = {
            .out = out.buf,
            .dim = dim,
            .rows = rowv + offv[i],
            .n = (size_t)(offv[i + 1] - offv[i]),
            .row_state = (uint8_t *)row_state.buf + offv[i],
            .scratch = scratch,
        };
        parsed[i] = (uint8_t)sx_embed_parse(s->response, s->response_len, &t, &res[i]);
    }
    Py_END_ALLOW_THREADS
    result = PyList_New((Py_ssize_t)b->n);
    if (!result)
        goto done;
    for (size_t i = 0; i < b->n; i++) {
        PyObject *item, *last;
        if (parsed[i])
            last = Py_BuildValue("(LLnnn)", (long long)res[i].prompt_tokens,
                                 (long long)res[i].total_tokens, (Py_ssize_t)res[i].vectors,
                                 (Py_ssize_t)res[i].out_of_range,
                                 (Py_ssize_t)res[i].bad_length);
        else
            last = Py_NewRef(Py_None);
        item = slot_tuple_body(&b->slots[i], parsed[i], last);
        if (!item) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)i, item);
    }

done:
    PyMem_RawFree(scratch);
    PyMem_RawFree(parsed);
    PyMem_RawFree(res);
    if (have_state)
        PyBuffer_Release(&row_state);
    if (have_offsets)
        PyBuffer_Release(&offsets);
    if (have_rows)
        PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(Batch_deployments_doc,
"deployments($self)\n--\n\n"
"For a batch of an engine with deployments: one int per request, in input order, the\n"
"deployment its last attempt went to (-1: never sent); None for an engine without.");

static PyObject *Batch_deployments(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!batch_usable(self))
        return NULL;
    sx_batch *b = self->batch;
    if (!b->ntargets)
        Py_RETURN_NONE;
    PyObject *list = PyList_New((Py_ssize_t)b->n);
    if (!list)
        return NULL;
    batch_lock(self);
    for (size_t i = 0; i < b->n; i++) {
        const sx_slot *s = &b->slots[i];
        PyObject *v = PyLong_FromLong(s->attempts ? (long)s->deploy : -1L);
        if (!v) {
            batch_unlock(self);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    batch_unlock(self);
    return list;
}

PyDoc_STRVAR(Batch_results_doc,
"results($self)\n--\n\n"
"One tuple per request, in input order: (state, error_kind, http_status, body, error,\n"
"attempts, latency). state is PENDING/OK/FAILED/CANCELLED; body is the response bytes (for\n"
"successes and final HTTP errors) or None; error is the failure reason or None.");

static PyObject *Batch_results(BatchObject *self, PyObject *Py_UNUSED(ignored))
{
    return batch_tuples(self, slot_tuple);
}

static Py_ssize_t Batch_len(BatchObject *self)
{
    return self->batch ? (Py_ssize_t)self->batch->n : 0;
}

static PyObject *Batch_get_done(BatchObject *self, void *Py_UNUSED(c))
{
    if (!batch_usable(self))
        return NULL;
    batch_lock(self);
    int done = self->batch->done == self->batch->n;
    batch_unlock(self);
    return PyBool_FromLong(done);
}

static PyObject *Batch_get_completed(BatchObject *self, void *Py_UNUSED(c))
{
    if (!batch_usable(self))
        return NULL;
    batch_lock(self);
    size_t done = self->batch->done;
    batch_unlock(self);
    return PyLong_FromSize_t(done);
}

static PyObject *Batch_repr(BatchObject *self)
{
    if (!self->batch)
        return PyUnicode_FromString("<semex._engine.Batch (unsubmitted)>");
    return PyUnicode_FromFormat("<semex._engine.Batch n=%zd>", (Py_ssize_t)self->batch->n);
}

static PyMethodDef Batch_methods[] = {
    {"wait", (PyCFunction)(void (*)(void))Batch_wait, METH_VARARGS | METH_KEYWORDS,
     Batch_wait_doc},
    {"fileno", (PyCFunction)Batch_fileno, METH_NOARGS, Batch_fileno_doc},
    {"clear_notify", (PyCFunction)Batch_clear_notify, METH_NOARGS, Batch_clear_notify_doc},
    {"cancel", (PyCFunction)Batch_cancel, METH_NOARGS, Batch_cancel_doc},
    {"progress", (PyCFunction)Batch_progress, METH_NOARGS, Batch_progress_doc},
    {"take_deltas", (PyCFunction)Batch_take_deltas, METH_NOARGS, Batch_take_deltas_doc},
    {"results", (PyCFunction)Batch_results, METH_NOARGS, Batch_results_doc},
    {"deployments", (PyCFunction)Batch_deployments, METH_NOARGS, Batch_deployments_doc},
    {"chat_results", (PyCFunction)Batch_chat_results, METH_NOARGS, Batch_chat_results_doc},
    {"chat_result", (PyCFunction)Batch_chat_result, METH_O, Batch_chat_result_doc},
    {"settle", (PyCFunction)Batch_settle, METH_O, Batch_settle_doc},
    {"collect_chat", (PyCFunction)Batch_collect_chat, METH_VARARGS, Batch_collect_chat_doc},
    {"read_embeddings", (PyCFunction)(void (*)(void))Batch_read_embeddings,
     METH_VARARGS | METH_KEYWORDS, Batch_read_embeddings_doc},
    {NULL, NULL, 0, NULL},
};

/* Whether the engine's own HTTP/1.1 carries this batch's requests (h1.h), or libcurl. */
static PyObject *Batch_get_transport(BatchObject *self, void *closure)
{
    (void)closure;
    const sx_batch *b = self->batch;
    int own = self->owner->engine && self->owner->engine->opts.own_http1;
    if (own && b->ntargets) {
        for (size_t i = 0; i < b->ntargets; i++)
            own = own && b->targets[i].h1 != NULL;
    } else if (own) {
        own = b->h1 != NULL;
    }
    return PyUnicode_FromString(own ? "http1" : "curl");
}

static PyGetSetDef Batch_getset[] = {
    {"transport", (getter)Batch_get_transport, NULL,
     "\"http1\": the engine's own HTTP/1.1 carries the requests (csrc/h1.h); \"curl\": libcurl.",
     NULL},
    {"done", (getter)Batch_get_done, NULL, "True when every request has its final outcome.",
     NULL},
    {"completed", (getter)Batch_get_completed, NULL, "Requests finished so far.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Batch_slots[] = {
    {Py_tp_doc, (void *)"A submitted batch of requests and its ordered results."},
    {Py_tp_dealloc, Batch_dealloc},
    {Py_tp_traverse, Batch_traverse},
    {Py_tp_repr, Batch_repr},
    {Py_tp_methods, Batch_methods},
    {Py_tp_getset, Batch_getset},
    {Py_sq_length, Batch_len},
    {0, NULL},
};

static PyType_Spec Batch_spec = {
    .name = "semex._engine.Batch",
    .basicsize = sizeof(BatchObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Batch_slots,
};

/* ------------------------------------------------------------------ module */

static PyObject *mod_curl_version(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(curl_version());
}

PyDoc_STRVAR(mod_prompt_keys_doc,
"prompt_keys(head, close, prompts)\n--\n\n"
"The answer cache's keys of plain-string prompts (semex.cache.JobCache), concatenated:\n"
"16 bytes each, blake2b-128 of head + the prompt's JSON string (UTF-8, as\n"
"json.dumps(prompt, ensure_ascii=False) writes it) + close. None when a prompt is not\n"
"exactly a str or holds a lone surrogate: the caller keys those itself.");

static void hash_out(void *ctx, const void *bytes, size_t n)
{
    sx_blake2b_update(ctx, bytes, n);
}

static PyObject *mod_prompt_keys(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer head, close;
    PyObject *prompts, *seq, *out = NULL;
    if (!PyArg_ParseTuple(args, "y*y*O:prompt_keys", &head, &close, &prompts))
        return NULL;
    seq = PySequence_Fast(prompts, "prompt_keys: prompts must be a sequence");
    if (!seq)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    sx_blake2b base;
    sx_blake2b_init(&base, 16);
    sx_blake2b_update(&base, head.buf, (size_t)head.len);
    out = PyBytes_FromStringAndSize(NULL, 16 * n);
    if (!out)
        goto done;
    uint8_t *key = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++, key += 16) {
        PyObject *text = items[i];
        if (!PyUnicode_CheckExact(text))
            goto fall_back;
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(text) < 0)
            goto fail;
#endif
        sx_blake2b h = base;
        if (sx_json_string_write(hash_out, &h, (int)PyUnicode_KIND(text),
                                 PyUnicode_DATA(text), (size_t)PyUnicode_GET_LENGTH(text)) < 0)
            goto fall_back;
        sx_blake2b_update(&h, close.buf, (size_t)close.len);
        sx_blake2b_final(&h, key);
    }
    goto done;
fall_back:
    Py_CLEAR(out);
    out = Py_NewRef(Py_None);
    goto done;
#if PY_VERSION_HEX < 0x030C0000
fail:
    Py_CLEAR(out);
#endif
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&head);
    PyBuffer_Release(&close);
    return out;
}

static PyMethodDef module_methods[] = {
    {"curl_version", mod_curl_version, METH_NOARGS,
     "curl_version()\n--\n\nThe libcurl version string in use."},
    {"read_rows", sx_py_read_rows, METH_VARARGS, sx_py_read_rows_doc},
    {"render_docs", sx_py_render_docs, METH_VARARGS, sx_py_render_docs_doc},
    {"chat_bodies", sx_py_chat_bodies, METH_VARARGS, sx_py_chat_bodies_doc},
    {"render_dicts", sx_py_render_dicts, METH_O, sx_py_render_dicts_doc},
    {"row_dicts", sx_py_row_dicts, METH_VARARGS, sx_py_row_dicts_doc},
    {"prompt_keys", mod_prompt_keys, METH_VARARGS, mod_prompt_keys_doc},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m)
{
    module_state *st = state_of(m);
    const curl_version_info_data *info = curl_version_info(CURLVERSION_NOW);
    if (info->version_num < LIBCURL_VERSION_NUM) {
        PyErr_Format(PyExc_ImportError,
                     "semex._engine was built against libcurl %s but this process loaded "
                     "libcurl %s; reinstall semex or upgrade libcurl",
                     LIBCURL_VERSION, info->version);
        return -1;
    }
    /* Once per process, with the GIL held: curl_global_init is not thread-safe. */
    static int curl_ready = 0;
    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            PyErr_SetString(PyExc_ImportError, "curl_global_init failed");
            return -1;
        }
        curl_ready = 1;
    }
    st->engine_error = PyErr_NewExceptionWithDoc(
        "semex._engine.EngineError",
        "The engine cannot do what was asked (closed, queue full, used across fork()).",
        PyExc_RuntimeError, NULL);
    if (!st->engine_error || PyModule_AddObjectRef(m, "EngineError", st->engine_error) < 0)
        return -1;
    st->engine_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Engine_spec, NULL);
    if (!st->engine_type || PyModule_AddType(m, st->engine_type) < 0)
        return -1;
    st->batch_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Batch_spec, NULL);
    if (!st->batch_type)
        return -1;
#ifdef SX_NEEDS_NO_NEW
    /* Batches come only from Engine.submit; 3.9 would otherwise inherit object.__new__ and
     * let Python build a Batch with no sx_batch behind it. */
    st->batch_type->tp_new = NULL;
#endif
    if (PyModule_AddType(m, st->batch_type) < 0)
        return -1;
#define ADD_INT(name, value)                                  \
    if (PyModule_AddIntConstant(m, name, value) < 0)          \
        return -1;
    ADD_INT("PENDING", SX_PENDING);
    ADD_INT("OK", SX_OK);
    ADD_INT("FAILED", SX_FAILED);
    ADD_INT("CANCELLED", SX_CANCELLED);
    ADD_INT("ERR_NONE", SX_ERR_NONE);
    ADD_INT("ERR_HTTP", SX_ERR_HTTP);
    ADD_INT("ERR_TIMEOUT", SX_ERR_TIMEOUT);
    ADD_INT("ERR_CONNECTION", SX_ERR_CONNECTION);
    ADD_INT("ERR_AUTH", SX_ERR_AUTH);
    ADD_INT("ERR_QUOTA", SX_ERR_QUOTA);
    ADD_INT("ERR_BODY_CAP", SX_ERR_BODY_CAP);
    ADD_INT("ERR_ABORTED", SX_ERR_ABORTED);
    ADD_INT("ERR_TRANSPORT", SX_ERR_TRANSPORT);
    ADD_INT("ERR_CANCELLED", SX_ERR_CANCELLED);
    ADD_INT("DIALECT_OPENAI", SX_DIALECT_OPENAI);
    ADD_INT("DIALECT_ANTHROPIC", SX_DIALECT_ANTHROPIC);
    ADD_INT("DIALECT_GEMINI", SX_DIALECT_GEMINI);
#undef ADD_INT
    if (PyModule_AddStringConstant(m, "LIBCURL_BUILD_VERSION", LIBCURL_VERSION) < 0)
        return -1;
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = state_of(m);
    Py_VISIT(st->engine_type);
    Py_VISIT(st->batch_type);
    Py_VISIT(st->engine_error);
    return 0;
}

static int module_clear(PyObject *m)
{
    module_state *st = state_of(m);
    Py_CLEAR(st->engine_type);
    Py_CLEAR(st->batch_type);
    Py_CLEAR(st->engine_error);
    return 0;
}

static void module_free(void *m)
{
    module_clear((PyObject *)m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "semex._engine",
    .m_doc = "semex's C concurrency engine: libcurl workers, scheduler, ordered results.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    return PyModuleDef_Init(&engine_module);
}
