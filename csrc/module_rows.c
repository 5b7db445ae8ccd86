/* module_rows.c — CPython glue for sem_extract's per-row work: documents rendered as the
 * model sees them, request bodies written around each prompt's JSON string (jsonstr.h),
 * answers read into column lists (rowjson.h) and those made into row dicts.
 *
 * Each runs on the calling Python thread (the GIL held) over a whole window of rows per call,
 * so the per-row cost is C's, not the interpreter's. Every row these functions cannot handle
 * exactly as the Python code would is left to that code (flag 0 / None), never guessed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "jsonscan.h"
#include "jsonstr.h"
#include "module_rows.h"
#include "rowjson.h"

/* Column kinds (semex/_schema.py's _KIND_* for OutputSpec.row_reader, the same numbers). */
enum {
    K_STRIP = 0,  /* untyped column: a string stripped (blank: None), other scalars as they are */
    K_TEXT = 1,   /* a quote or the reasoning: a string as it is, null/absent None */
    K_STR = 2,    /* typed str: a string as it is */
    K_INT = 3,    /* typed int: a JSON integer */
    K_FLOAT = 4,  /* typed float: a JSON number, as a float */
    K_BOOL = 5,   /* typed bool: true or false */
    K_KIND_MASK = 0x0f,
    K_NULLABLE = 0x80,  /* typed: null is None (absent still goes to Python: defaults) */
};

#define MAX_COLUMNS 256

static inline PyObject *new_ref(PyObject *obj)  /* Py_NewRef, which Python 3.9 lacks */
{
    Py_INCREF(obj);
    return obj;
}

typedef struct {
    unsigned char *buf;
    size_t cap;
} scratch;

static unsigned char *scratch_get(scratch *s, size_t n)
{
    if (n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 256;
        while (cap < n + 1)
            cap *= 2;
        unsigned char *p = realloc(s->buf, cap);
        if (!p) {
            PyErr_NoMemory();
            return NULL;
        }
        s->buf = p;
        s->cap = cap;
    }
    return s->buf;
}

/* Python's str.strip() of `text` (steals it); None when nothing is left. */
static PyObject *stripped(PyObject *text)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), a = 0, b = n;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    while (a < b && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, a)))
        a++;
    while (b > a && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, b - 1)))
        b--;
    if (a == 0 && b == n && n > 0)
        return text;
    PyObject *out = a == b ? new_ref(Py_None) : PyUnicode_Substring(text, a, b);
    Py_DECREF(text);
    return out;
}

static PyObject *string_value(const unsigned char *base, const sx_row_value *v, scratch *s)
{
    if (!v->escaped)
        return PyUnicode_DecodeUTF8((const char *)base + v->off, (Py_ssize_t)v->len, "strict");
    unsigned char *buf = scratch_get(s, v->len);
    if (!buf)
        return NULL;
    memcpy(buf, base + v->off, v->len);
    sx_json_span span = {0, v->len, 1, 1};
    size_t n = sx_json_decode_in_place(buf, &span);
    return PyUnicode_DecodeUTF8((const char *)buf, (Py_ssize_t)n, "strict");
}

static PyObject *number_value(const unsigned char *base, const sx_row_value *v, int as_float,
                              scratch *s)
{
    if (v->kind == SX_VAL_INT && v->as_int >= 0)
        return as_float ? PyFloat_FromDouble((double)v->as_int)
                        : PyLong_FromLongLong((long long)v->as_int);
    unsigned char *buf = scratch_get(s, v->len);
    if (!buf)
        return NULL;
    memcpy(buf, base + v->off, v->len);
    buf[v->len] = '\0';
    if (v->kind == SX_VAL_INT && !as_float)
        return PyLong_FromString((const char *)buf, NULL, 10);  /* int(), as json.loads */
    double d = PyOS_string_to_double((const char *)buf, NULL, NULL);  /* float(), as json */
    if (d == -1.0 && PyErr_Occurred())
        return NULL;
    return PyFloat_FromDouble(d);
}

/* The value for one column, or NULL with *fallback set (the row goes to Python) or NULL with
 * an exception. */
static PyObject *column_value(const unsigned char *base, const sx_row_value *v, int kind,
                              scratch *s, int *fallback)
{
    int k = kind & K_KIND_MASK, nullable = kind & K_NULLABLE;
    switch (k) {
    case K_STRIP:
        switch (v->kind) {
        case SX_VAL_ABSENT:
        case SX_VAL_NULL:
            return new_ref(Py_None);
        case SX_VAL_TRUE:
            return new_ref(Py_True);
        case SX_VAL_FALSE:
            return new_ref(Py_False);
        case SX_VAL_STRING: {
            PyObject *text = string_value(base, v, s);
            return text ? stripped(text) : NULL;
        }
        default:
            return number_value(base, v, 0, s);
        }
    case K_TEXT:
        if (v->kind == SX_VAL_ABSENT || v->kind == SX_VAL_NULL)
            return new_ref(Py_None);
        if (v->kind == SX_VAL_STRING)
            return string_value(base, v, s);
        break;
    default:
        if (v->kind == SX_VAL_NULL && nullable)
            return new_ref(Py_None);
        if (k == K_STR && v->kind == SX_VAL_STRING)
            return string_value(base, v, s);
        if (k == K_INT && v->kind == SX_VAL_INT)
            return number_value(base, v, 0, s);
        if (k == K_FLOAT && (v->kind == SX_VAL_FLOAT || (v->kind == SX_VAL_INT &&
                                                          v->as_int >= 0)))
            return number_value(base, v, 1, s);
        if (k == K_BOOL && (v->kind == SX_VAL_TRUE || v->kind == SX_VAL_FALSE))
            return new_ref(v->kind == SX_VAL_TRUE ? Py_True : Py_False);
        break;
    }
    *fallback = 1;
    return NULL;
}

PyObject *sx_py_read_rows(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *contents, *names;
    Py_buffer kinds;
    if (!PyArg_ParseTuple(args, "OO!y*:read_rows", &contents, &PyTuple_Type, &names, &kinds))
        return NULL;
    PyObject *result = NULL, *flags = NULL, *columns = NULL;
    sx_row_key keys[MAX_COLUMNS];
    sx_row_value values[MAX_COLUMNS];
    scratch s = {NULL, 0};
    Py_ssize_t ncols = PyTuple_GET_SIZE(names);
    if (!PyList_Check(contents)) {
        PyErr_SetString(PyExc_TypeError, "read_rows: contents must be a list");
        goto done;
    }
    if (ncols < 1 || ncols > MAX_COLUMNS || kinds.len != ncols) {
        PyErr_Format(PyExc_ValueError, "read_rows: 1 to %d names, one kind byte each",
                     MAX_COLUMNS);
        goto done;
    }
    const unsigned char *kind = kinds.buf;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *name = PyTuple_GET_ITEM(names, k);
        Py_ssize_t len;
        const char *utf8 = PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &len) : NULL;
        if (!utf8) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "read_rows: names must be str");
            goto done;
        }
        keys[k].name = utf8;
        keys[k].len = (size_t)len;
    }
    Py_ssize_t n = PyList_GET_SIZE(contents);
    flags = PyByteArray_FromStringAndSize(NULL, n);
    columns = PyTuple_New(ncols);
    if (!flags || !columns)
        goto done;
    char *flag = PyByteArray_AS_STRING(flags);
    memset(flag, 0, (size_t)n);
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *list = PyList_New(n);
        if (!list)
            goto done;
        for (Py_ssize_t i = 0; i < n; i++)
            PyList_SET_ITEM(list, i, new_ref(Py_None));
        PyTuple_SET_ITEM(columns, k, list);
    }
    PyObject *row[MAX_COLUMNS];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *text = PyList_GET_ITEM(contents, i);
        if (!PyUnicode_Check(text))
            continue;
        Py_ssize_t len;
        const char *utf8 = PyUnicode_AsUTF8AndSize(text, &len);
        if (!utf8) {  /* a lone surrogate: Python's reader decides */
            PyErr_Clear();
            continue;
        }
        const unsigned char *base = (const unsigned char *)utf8;
        if (sx_row_parse(base, (size_t)len, keys, (size_t)ncols, values) != SX_ROW_PARSED)
            continue;
        int fallback = 0;
        Py_ssize_t made = 0;
        for (; made < ncols; made++) {
            row[made] = column_value(base, &values[made], kind[made], &s, &fallback);
            if (!row[made])
                break;
        }
        if (made < ncols) {
            for (Py_ssize_t k = 0; k < made; k++)
                Py_DECREF(row[k]);
            if (!fallback)
                goto done;  /* an exception (memory) */
            continue;
        }
        for (Py_ssize_t k = 0; k < ncols; k++) {
            PyObject *list = PyTuple_GET_ITEM(columns, k);
            PyObject *none = PyList_GET_ITEM(list, i);
            PyList_SET_ITEM(list, i, row[k]);
            Py_DECREF(none);
        }
        flag[i] = 1;
    }
    result = PyTuple_Pack(2, flags, columns);
done:
    free(s.buf);
    Py_XDECREF(flags);
    Py_XDECREF(columns);
    PyBuffer_Release(&kinds);
    return result;
}

/* ------------------------------------------------------------------ documents */

/* Whether `text` has a character str.strip() would keep. */
static int has_text(PyObject *text)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i)))
            return 1;
    return 0;
}

/* 1: the value is left out (None, a float NaN, blank text); 0: it is text to show; -1: only
 * Python knows how to show it. */
static int left_out(PyObject *value)
{
    if (value == Py_None)
        return 1;
    if (PyUnicode_CheckExact(value))
        return !has_text(value);
    if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        return d != d ? 1 : -1;
    }
    return -1;
}

/* One document's text, "[key]: value" lines joined by "\n": measured over every (key,
 * value) first (doc_measure), then allocated once (doc_start) and written (doc_write, the
 * same pairs in the same order). */
typedef struct {
    Py_ssize_t len, lines;
    Py_UCS4 maxchar;
    PyObject *text;   /* borrowed from doc_start's caller */
    Py_ssize_t at;
} doc_text;

/* 0, or -1 when only Python can show the value. */
static int doc_measure(doc_text *t, PyObject *key, PyObject *value)
{
    int skip = left_out(value);
    if (skip)
        return skip < 0 ? -1 : 0;
    t->len += PyUnicode_GET_LENGTH(key) + 4 + PyUnicode_GET_LENGTH(value) + (t->lines ? 1 : 0);
    t->lines++;
    Py_UCS4 a = PyUnicode_MAX_CHAR_VALUE(key), b = PyUnicode_MAX_CHAR_VALUE(value);
    t->maxchar = a > t->maxchar ? a : t->maxchar;
    t->maxchar = b > t->maxchar ? b : t->maxchar;
    return 0;
}

static PyObject *doc_start(doc_text *t)
{
    t->text = PyUnicode_New(t->len, t->maxchar);
    t->at = 0;
    return t->text;
}

static int doc_write(doc_text *t, PyObject *key, PyObject *value)
{
    if (left_out(value))
        return 0;
    int kind = PyUnicode_KIND(t->text);
    void *data = PyUnicode_DATA(t->text);
    if (t->at)
        PyUnicode_WRITE(kind, data, t->at++, '\n');
    PyUnicode_WRITE(kind, data, t->at++, '[');
    if (PyUnicode_CopyCharacters(t->text, t->at, key, 0, PyUnicode_GET_LENGTH(key)) < 0)
        return -1;
    t->at += PyUnicode_GET_LENGTH(key);
    PyUnicode_WRITE(kind, data, t->at++, ']');
    PyUnicode_WRITE(kind, data, t->at++, ':');
    PyUnicode_WRITE(kind, data, t->at++, ' ');
    if (PyUnicode_CopyCharacters(t->text, t->at, value, 0, PyUnicode_GET_LENGTH(value)) < 0)
        return -1;
    t->at += PyUnicode_GET_LENGTH(value);
    return 0;
}

PyObject *sx_py_render_docs(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *keys, *columns;
    if (!PyArg_ParseTuple(args, "O!O!:render_docs", &PyTuple_Type, &keys, &PyTuple_Type,
                          &columns))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(keys);
    if (ncols < 1 || PyTuple_GET_SIZE(columns) != ncols) {
        PyErr_SetString(PyExc_ValueError, "render_docs: one column per key, at least one");
        return NULL;
    }
    Py_ssize_t n = -1;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *key = PyTuple_GET_ITEM(keys, k), *column = PyTuple_GET_ITEM(columns, k);
        if (!PyUnicode_Check(key) || !PyList_Check(column) ||
            (n >= 0 && PyList_GET_SIZE(column) != n)) {
            PyErr_SetString(PyExc_TypeError,
                            "render_docs: keys are str, columns lists of one length");
            return NULL;
        }
        n = PyList_GET_SIZE(column);
    }
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* "[key]: value" lines joined by "\n": sizes first, then one copy */
        doc_text t = {0, 0, 127, NULL, 0};
        int python = 0;
        for (Py_ssize_t k = 0; k < ncols && !python; k++)
            python = doc_measure(&t, PyTuple_GET_ITEM(keys, k),
                                 PyList_GET_ITEM(PyTuple_GET_ITEM(columns, k), i)) < 0;
        PyObject *text = python ? new_ref(Py_None)  /* Python renders this row */
                                : doc_start(&t);
        for (Py_ssize_t k = 0; text && !python && k < ncols; k++)
            if (doc_write(&t, PyTuple_GET_ITEM(keys, k),
                          PyList_GET_ITEM(PyTuple_GET_ITEM(columns, k), i)) < 0)
                Py_CLEAR(text);
        if (!text) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, text);
    }
    return out;
}

/* ------------------------------------------------------------------ request bodies */

/* A growing byte buffer (jsonstr.h's out for a body). */
typedef struct {
    char *buf;
    size_t len, cap;
    int failed;  /* out of memory */
} body_buf;

static void body_out(void *ctx, const void *bytes, size_t n)
{
    body_buf *b = ctx;
    if (b->failed)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n)
            cap *= 2;
        char *p = realloc(b->buf, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->buf = p;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, bytes, n);
    b->len += n;
}

PyObject *sx_py_chat_bodies(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer head, tail;
    PyObject *texts;
    if (!PyArg_ParseTuple(args, "y*O!y*:chat_bodies", &head, &PyList_Type, &texts, &tail))
        return NULL;
    body_buf b = {NULL, 0, 0, 0};
    Py_ssize_t n = PyList_GET_SIZE(texts);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *text = PyList_GET_ITEM(texts, i), *body = NULL;
        b.len = 0;
        body_out(&b, head.buf, (size_t)head.len);
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_CheckExact(text) && PyUnicode_READY(text) < 0) {
            Py_CLEAR(out);
            break;
        }
#endif
        if (!PyUnicode_CheckExact(text) ||
            sx_json_string_write(body_out, &b, (int)PyUnicode_KIND(text), PyUnicode_DATA(text),
                                 (size_t)PyUnicode_GET_LENGTH(text)) < 0) {
            body = new_ref(Py_None);  /* not a str, or a lone surrogate: Python writes (or
                                       * refuses) it */
        } else {
            body_out(&b, tail.buf, (size_t)tail.len);
            body = b.failed ? PyErr_NoMemory()
                            : PyBytes_FromStringAndSize(b.buf, (Py_ssize_t)b.len);
        }
        if (!body) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, body);
    }
    free(b.buf);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return out;
}

/* ------------------------------------------------------------------ list documents */

PyObject *sx_py_render_dicts(PyObject *Py_UNUSED(m), PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "render_dicts: a list of dicts");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *doc = PyList_GET_ITEM(arg, i), *key, *value;
        Py_ssize_t pos = 0;
        doc_text t = {0, 0, 127, NULL, 0};
        int python = !PyDict_CheckExact(doc);
        while (!python && PyDict_Next(doc, &pos, &key, &value))
            python = !PyUnicode_CheckExact(key) || doc_measure(&t, key, value) < 0;
        PyObject *text = python ? new_ref(Py_None)  /* Python renders this one */
                                : doc_start(&t);
        pos = 0;
        while (text && !python && PyDict_Next(doc, &pos, &key, &value))
            if (doc_write(&t, key, value) < 0)
                Py_CLEAR(text);
        if (!text) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, text);
    }
    return out;
}

/* ------------------------------------------------------------------ result rows */

PyObject *sx_py_row_dicts(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *names, *columns;
    Py_buffer flags;
    if (!PyArg_ParseTuple(args, "O!O!y*:row_dicts", &PyTuple_Type, &names, &PyTuple_Type,
                          &columns, &flags))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(names), n = flags.len;
    if (PyTuple_GET_SIZE(columns) != ncols) {
        PyErr_SetString(PyExc_ValueError, "row_dicts: one column per name");
        goto done;
    }
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *column = PyTuple_GET_ITEM(columns, k);
        if (!PyList_Check(column) || PyList_GET_SIZE(column) != n) {
            PyErr_SetString(PyExc_ValueError, "row_dicts: columns are lists, one item a flag");
            goto done;
        }
    }
    out = PyList_New(n);
    if (!out)
        goto done;
    const unsigned char *flag = flags.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row;
        if (!flag[i]) {
            row = new_ref(Py_None);
        } else {
            row = PyDict_New();
            for (Py_ssize_t k = 0; row && k < ncols; k++) {
                if (PyDict_SetItem(row, PyTuple_GET_ITEM(names, k),
                                   PyList_GET_ITEM(PyTuple_GET_ITEM(columns, k), i)) < 0)
                    Py_CLEAR(row);
            }
            if (!row) {
                Py_CLEAR(out);
                goto done;
            }
        }
        PyList_SET_ITEM(out, i, row);
    }
done:
    PyBuffer_Release(&flags);
    return out;
}
