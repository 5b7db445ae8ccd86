/* module_rows.h — see module_rows.c. */
#ifndef SEMEX_MODULE_ROWS_H
#define SEMEX_MODULE_ROWS_H

#include <Python.h>

PyDoc_STRVAR(sx_py_read_rows_doc,
"read_rows($module, contents, names, kinds, /)\n--\n\n"
"Read each answer of `contents` (a list of str or None) as one flat JSON object and take the\n"
"values of the keys `names` (a tuple of str), each by its kind (`kinds`, one byte per name:\n"
"0 untyped, stripped; 1 text as it is; 2 str, 3 int, 4 float, 5 bool, each | 0x80 when\n"
"null is allowed). Returns (flags, columns): flags[i] is 1 when row i was read (then\n"
"columns[k][i] is its value for names[k]) and 0 when Python must read it (columns hold\n"
"None there).");

PyObject *sx_py_read_rows(PyObject *m, PyObject *args);

PyDoc_STRVAR(sx_py_render_docs_doc,
"render_docs($module, keys, columns, /)\n--\n\n"
"Each row of `columns` (a tuple of equal-length lists, one per key of `keys`) as the model\n"
"sees it: one \"[key]: value\" line per value, joined by newlines; None, a float NaN and\n"
"blank text are left out. A row holding any other kind of value is None: Python renders it.");

PyObject *sx_py_render_docs(PyObject *m, PyObject *args);

PyDoc_STRVAR(sx_py_chat_bodies_doc,
"chat_bodies($module, head, texts, tail, /)\n--\n\n"
"head + the JSON string of each text (json.dumps(text, ensure_ascii=False), UTF-8) + tail,\n"
"as bytes; None for an item that is not a str or cannot be UTF-8 (a lone surrogate).");

PyObject *sx_py_chat_bodies(PyObject *m, PyObject *args);

PyDoc_STRVAR(sx_py_render_dicts_doc,
"render_dicts($module, docs, /)\n--\n\n"
"render_docs for a list of dicts (each dict's own keys, in its order); None for an item that\n"
"is not a dict, has a key that is not a str or a value render_docs leaves to Python.");

PyObject *sx_py_render_dicts(PyObject *m, PyObject *arg);

PyDoc_STRVAR(sx_py_row_dicts_doc,
"row_dicts($module, names, columns, flags, /)\n--\n\n"
"For each i with flags[i] set, {names[k]: columns[k][i]}; None where it is not.");

PyObject *sx_py_row_dicts(PyObject *m, PyObject *args);

#endif
