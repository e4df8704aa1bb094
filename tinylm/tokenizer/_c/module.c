/* Python bindings of the C accelerator: tinylm.tokenizer._fastbpe.
 *
 * set_char_classes(table)            install the code point -> class table (from the regex package)
 * split(text, pattern) -> list[str]  pre-tokenize with a built-in pattern
 * count_chunks(texts, pattern, counts)  add each chunk's count (bytes -> int) to the dict
 * merge_counts(dst, src)             dst[k] += src[k]
 * train(words, counts, n_merges, callback, every) -> merges
 * Encoder(byte_ids, merges, pattern[, cache_entries])  see pyencoder.c
 *
 * count_chunks and the Encoder release the GIL while they scan text, so threads run in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "fastbpe.h"

PyObject *fb_py_train(PyObject *self, PyObject *args);
int fb_utf8_of(PyObject *tuple, const uint8_t **ptrs, size_t *lens);
extern PyTypeObject fb_EncoderType;

static PyObject *class_table = NULL; /* kept for the life of the process: threads read it */

static int check_pattern(int pattern) {
    if (pattern != FB_PATTERN_GPT4 && pattern != FB_PATTERN_GPT2) {
        PyErr_SetString(PyExc_ValueError, "pattern must be 1 (gpt4) or 2 (gpt2)");
        return -1;
    }
    if (!fb_classes) {
        PyErr_SetString(PyExc_RuntimeError, "set_char_classes() has not been called");
        return -1;
    }
    return 0;
}

static PyObject *set_char_classes(PyObject *self, PyObject *table) {
    (void)self;
    if (!PyBytes_Check(table) || PyBytes_GET_SIZE(table) != 0x110000) {
        PyErr_SetString(PyExc_ValueError, "expected 0x110000 bytes");
        return NULL;
    }
    if (!class_table) { /* set once: a table in use by another thread is never freed */
        Py_INCREF(table);
        class_table = table;
        fb_classes = (const uint8_t *)PyBytes_AS_STRING(table);
    }
    Py_RETURN_NONE;
}

static PyObject *split(PyObject *self, PyObject *args) {
    PyObject *text;
    int pattern;
    (void)self;
    if (!PyArg_ParseTuple(args, "Ui", &text, &pattern) || check_pattern(pattern) < 0) return NULL;
    Py_ssize_t n;
    const uint8_t *s = (const uint8_t *)PyUnicode_AsUTF8AndSize(text, &n);
    if (!s) return NULL;
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out && i < (size_t)n;) {
        size_t e = fb_next_chunk(s, (size_t)n, i, pattern);
        PyObject *piece = PyUnicode_DecodeUTF8((const char *)s + i, (Py_ssize_t)(e - i), "strict");
        if (!piece || PyList_Append(out, piece) < 0) Py_CLEAR(out);
        Py_XDECREF(piece);
        i = e;
    }
    return out;
}

static int add_count(PyObject *dict, PyObject *key, long long n) {
    PyObject *old = PyDict_GetItemWithError(dict, key);
    if (!old && PyErr_Occurred()) return -1;
    long long total = n;
    if (old) {
        total += PyLong_AsLongLong(old);
        if (PyErr_Occurred()) return -1;
    }
    PyObject *value = PyLong_FromLongLong(total);
    int rc = value ? PyDict_SetItem(dict, key, value) : -1;
    Py_XDECREF(value);
    return rc;
}

/* Count the chunks of texts into m; no Python objects are touched (runs without the GIL). */
static int count_into(fb_bmap *m, const uint8_t **ptrs, const size_t *lens, size_t k, int pattern) {
    for (size_t t = 0; t < k; t++) {
        const uint8_t *s = ptrs[t];
        size_t n = lens[t];
        for (size_t i = 0; i < n;) {
            size_t e = fb_next_chunk(s, n, i, pattern);
            uint64_t h = fb_hash_bytes(s + i, e - i);
            fb_slot *slot = fb_bmap_lookup(m, s + i, (uint32_t)(e - i), h);
            if (!slot->hash && !(slot = fb_bmap_insert(m, slot, s + i, (uint32_t)(e - i), h)))
                return -1;
            slot->value++;
            i = e;
        }
    }
    return 0;
}

static PyObject *count_chunks(PyObject *self, PyObject *args) {
    PyObject *texts, *counts;
    int pattern;
    (void)self;
    if (!PyArg_ParseTuple(args, "OiO!", &texts, &pattern, &PyDict_Type, &counts) ||
        check_pattern(pattern) < 0)
        return NULL;
    PyObject *tuple = PySequence_Tuple(texts); /* keeps the texts alive without the GIL */
    if (!tuple) return NULL;
    size_t k = (size_t)PyTuple_GET_SIZE(tuple);
    const uint8_t **ptrs = PyMem_Malloc((k + 1) * sizeof(uint8_t *));
    size_t *lens = PyMem_Malloc((k + 1) * sizeof(size_t));
    fb_bmap m;
    int rc = -1, mapped = fb_bmap_init(&m, 1 << 14) == 0;
    if (!ptrs || !lens || !mapped) {
        PyErr_NoMemory();
        goto done;
    }
    if (fb_utf8_of(tuple, ptrs, lens) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = count_into(&m, ptrs, lens, k, pattern);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t s = 0; rc == 0 && s < m.cap; s++) {
        fb_slot *slot = &m.slots[s];
        if (!slot->hash) continue;
        PyObject *key = PyBytes_FromStringAndSize((const char *)m.arena + slot->key_off, slot->key_len);
        rc = key ? add_count(counts, key, slot->value) : -1;
        Py_XDECREF(key);
    }
done:
    if (mapped) fb_bmap_free(&m);
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_DECREF(tuple);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *merge_counts(PyObject *self, PyObject *args) {
    PyObject *dst, *src, *key, *value;
    Py_ssize_t pos = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!", &PyDict_Type, &dst, &PyDict_Type, &src)) return NULL;
    while (PyDict_Next(src, &pos, &key, &value)) {
        long long n = PyLong_AsLongLong(value);
        if ((n == -1 && PyErr_Occurred()) || add_count(dst, key, n) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_char_classes", set_char_classes, METH_O, "Install the code point class table (once)."},
    {"split", split, METH_VARARGS, "Pre-tokenize text with a built-in pattern."},
    {"count_chunks", count_chunks, METH_VARARGS, "Add chunk counts of texts to a dict."},
    {"merge_counts", merge_counts, METH_VARARGS, "dst[k] += src[k] for every k."},
    {"train", fb_py_train, METH_VARARGS, "BPE merges from words and their counts."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_fastbpe", "tinylm's optional C accelerator for byte-level BPE.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastbpe(void) {
    if (PyType_Ready(&fb_EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&fb_EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&fb_EncoderType) < 0) {
        Py_DECREF(&fb_EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
