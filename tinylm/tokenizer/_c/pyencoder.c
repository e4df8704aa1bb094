/* The Encoder type: merges, the chunk cache, and encoding that runs without the GIL.
 *
 * The GIL is released while a text is encoded, so threads that each hold an Encoder encode in
 * parallel. An Encoder's cache is not shared: a lock makes concurrent calls on one Encoder wait
 * for each other. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

#include "fastbpe.h"

#define RELEASE_GIL_FROM 2048 /* bytes of text worth releasing the GIL for */

typedef struct {
    PyObject_HEAD
    fb_encoder enc;
    int pattern;
    PyObject **id_objects; /* an int object per id, shared by every list of ids returned */
    size_t n_ids;
    PyThread_type_lock lock;
} Encoder;

/* UTF-8 of every str in a tuple (which keeps them alive while the GIL is released). */
int fb_utf8_of(PyObject *tuple, const uint8_t **ptrs, size_t *lens) {
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(tuple); t++) {
        PyObject *text = PyTuple_GET_ITEM(tuple, t);
        Py_ssize_t n;
        if (!PyUnicode_Check(text)) {
            PyErr_SetString(PyExc_TypeError, "texts must be str");
            return -1;
        }
        if (!(ptrs[t] = (const uint8_t *)PyUnicode_AsUTF8AndSize(text, &n))) return -1;
        lens[t] = (size_t)n;
    }
    return 0;
}

static void lock_encoder(Encoder *self) {
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static void clear_id_objects(Encoder *self) {
    for (size_t i = 0; i < self->n_ids; i++) Py_XDECREF(self->id_objects[i]);
    PyMem_Free(self->id_objects);
    self->id_objects = NULL;
    self->n_ids = 0;
}

static int load(Encoder *self, PyObject *byte_ids, PyObject *merges, int pattern, Py_ssize_t cache) {
    if (PyList_GET_SIZE(byte_ids) != 256) {
        PyErr_SetString(PyExc_ValueError, "byte_ids must have 256 entries");
        return -1;
    }
    fb_encoder_free(&self->enc);
    clear_id_objects(self);
    if (fb_encoder_init(&self->enc, (size_t)PyList_GET_SIZE(merges)) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->pattern = pattern;
    self->enc.max_cache_entries = cache > 0 ? (size_t)cache : 1;
    uint32_t max_id = 0;
    for (int b = 0; b < 256; b++) {
        unsigned long id = PyLong_AsUnsignedLong(PyList_GET_ITEM(byte_ids, b));
        if (PyErr_Occurred()) return -1;
        if (id >= UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "token id too large");
            return -1;
        }
        self->enc.byte_ids[b] = (uint32_t)id;
        if (id > max_id) max_id = (uint32_t)id;
    }
    for (Py_ssize_t r = 0; r < PyList_GET_SIZE(merges); r++) {
        unsigned int a, b, c;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(merges, r), "III", &a, &b, &c)) return -1;
        int inserted;
        int64_t *v = fb_pmap_put(&self->enc.merges, FB_PAIR(a, b), 0, &inserted);
        if (!v) {
            PyErr_NoMemory();
            return -1;
        }
        if (inserted) *v = ((int64_t)r << 32) | c; /* a repeated pair keeps its first rank */
        if (c > max_id) max_id = c;
    }
    self->id_objects = PyMem_Calloc((size_t)max_id + 1, sizeof(PyObject *));
    if (!self->id_objects) {
        PyErr_NoMemory();
        return -1;
    }
    self->n_ids = (size_t)max_id + 1;
    for (size_t i = 0; i < self->n_ids; i++)
        if (!(self->id_objects[i] = PyLong_FromSize_t(i))) return -1;
    return 0;
}

static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwds) {
    PyObject *byte_ids, *merges;
    int pattern;
    Py_ssize_t cache = (Py_ssize_t)1 << 18;
    (void)kwds;
    if (!PyArg_ParseTuple(args, "O!O!i|n", &PyList_Type, &byte_ids, &PyList_Type, &merges,
                          &pattern, &cache))
        return -1;
    if (!self->lock && !(self->lock = PyThread_allocate_lock())) {
        PyErr_NoMemory();
        return -1;
    }
    lock_encoder(self);
    int rc = load(self, byte_ids, merges, pattern, cache);
    PyThread_release_lock(self->lock);
    return rc;
}

static void Encoder_dealloc(Encoder *self) {
    fb_encoder_free(&self->enc);
    clear_id_objects(self);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(Encoder *self, int need_pattern) {
    if (!self->lock || !self->id_objects) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder is not initialized");
        return -1;
    }
    if (need_pattern && (self->pattern != FB_PATTERN_GPT4 && self->pattern != FB_PATTERN_GPT2)) {
        PyErr_SetString(PyExc_ValueError, "pattern must be 1 (gpt4) or 2 (gpt2)");
        return -1;
    }
    if (need_pattern && !fb_classes) {
        PyErr_SetString(PyExc_RuntimeError, "set_char_classes() has not been called");
        return -1;
    }
    return 0;
}

/* A list of the ids v[0..n), sharing the encoder's int objects. */
static PyObject *make_list(Encoder *self, const uint32_t *v, size_t n) {
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *o;
        if (v[i] < self->n_ids) {
            o = self->id_objects[v[i]];
            Py_INCREF(o);
        } else if (!(o = PyLong_FromUnsignedLong(v[i]))) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, o);
    }
    return list;
}

/* Encode texts (a list or tuple of str) into ids; ends[t] is where text t's ids end. */
static int encode_texts(Encoder *self, PyObject *texts, fb_ids *ids, size_t **ends_out, size_t *count) {
    PyObject *tuple = PySequence_Tuple(texts);
    if (!tuple) return -1;
    size_t k = (size_t)PyTuple_GET_SIZE(tuple), total = 0;
    const uint8_t **ptrs = PyMem_Malloc((k + 1) * sizeof(uint8_t *));
    size_t *lens = PyMem_Malloc((k + 1) * sizeof(size_t));
    size_t *ends = PyMem_Malloc((k + 1) * sizeof(size_t));
    int rc = -1;
    if (!ptrs || !lens || !ends) {
        PyErr_NoMemory();
        goto done;
    }
    if (fb_utf8_of(tuple, ptrs, lens) < 0) goto done;
    for (size_t t = 0; t < k; t++) total += lens[t];
    lock_encoder(self);
    rc = 0;
    PyThreadState *saved = total >= RELEASE_GIL_FROM ? PyEval_SaveThread() : NULL;
    for (size_t t = 0; rc == 0 && t < k; t++) {
        rc = fb_encode_text(&self->enc, ptrs[t], lens[t], self->pattern, ids);
        ends[t] = ids->n;
    }
    if (saved) PyEval_RestoreThread(saved);
    PyThread_release_lock(self->lock);
    if (rc < 0) PyErr_NoMemory();
done:
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_DECREF(tuple);
    if (rc < 0) {
        PyMem_Free(ends);
        return -1;
    }
    *ends_out = ends;
    *count = k;
    return 0;
}

static PyObject *Encoder_encode(Encoder *self, PyObject *text) {
    fb_ids ids = {NULL, 0, 0};
    size_t *ends, k;
    PyObject *one = PyTuple_Pack(1, text), *out = NULL;
    if (one && ready(self, 1) == 0 && encode_texts(self, one, &ids, &ends, &k) == 0) {
        out = make_list(self, ids.v, ids.n);
        PyMem_Free(ends);
    }
    Py_XDECREF(one);
    free(ids.v);
    return out;
}

static PyObject *Encoder_encode_u32(Encoder *self, PyObject *text) {
    fb_ids ids = {NULL, 0, 0};
    size_t *ends, k;
    PyObject *one = PyTuple_Pack(1, text), *out = NULL;
    if (one && ready(self, 1) == 0 && encode_texts(self, one, &ids, &ends, &k) == 0) {
        out = PyBytes_FromStringAndSize((const char *)ids.v, (Py_ssize_t)(ids.n * sizeof(uint32_t)));
        PyMem_Free(ends);
    }
    Py_XDECREF(one);
    free(ids.v);
    return out;
}

static PyObject *Encoder_encode_many(Encoder *self, PyObject *texts) {
    fb_ids ids = {NULL, 0, 0};
    size_t *ends, k;
    if (ready(self, 1) < 0 || encode_texts(self, texts, &ids, &ends, &k) < 0) {
        free(ids.v);
        return NULL;
    }
    PyObject *out = PyList_New((Py_ssize_t)k);
    for (size_t t = 0, start = 0; out && t < k; start = ends[t], t++) {
        PyObject *list = make_list(self, ids.v + start, ends[t] - start);
        if (!list) Py_CLEAR(out);
        else PyList_SET_ITEM(out, (Py_ssize_t)t, list);
    }
    PyMem_Free(ends);
    free(ids.v);
    return out;
}

static PyObject *Encoder_encode_chunks(Encoder *self, PyObject *chunks) {
    if (ready(self, 0) < 0) return NULL;
    PyObject *tuple = PySequence_Tuple(chunks);
    if (!tuple) return NULL;
    fb_ids ids = {NULL, 0, 0};
    PyObject *out = NULL;
    int rc = 0;
    lock_encoder(self);
    for (Py_ssize_t k = 0; rc == 0 && k < PyTuple_GET_SIZE(tuple); k++) {
        PyObject *chunk = PyTuple_GET_ITEM(tuple, k);
        Py_ssize_t n;
        const uint8_t *s = PyUnicode_Check(chunk) ? (const uint8_t *)PyUnicode_AsUTF8AndSize(chunk, &n) : NULL;
        if (!s) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "chunks must be str");
            rc = -1;
        } else if (n > 0 && fb_encode_chunk(&self->enc, s, (size_t)n, &ids) < 0) {
            PyErr_NoMemory();
            rc = -1;
        }
    }
    PyThread_release_lock(self->lock);
    if (rc == 0) out = make_list(self, ids.v, ids.n);
    free(ids.v);
    Py_DECREF(tuple);
    return out;
}

static PyObject *Encoder_unpack(Encoder *self, PyObject *data) {
    if (ready(self, 0) < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *list = NULL;
    if (view.len % sizeof(uint32_t)) PyErr_SetString(PyExc_ValueError, "not packed uint32 ids");
    else list = make_list(self, (const uint32_t *)view.buf, (size_t)view.len / sizeof(uint32_t));
    PyBuffer_Release(&view);
    return list;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O, "Ids of a text (built-in pattern)."},
    {"encode_u32", (PyCFunction)Encoder_encode_u32, METH_O, "Ids as native uint32 bytes."},
    {"encode_many", (PyCFunction)Encoder_encode_many, METH_O, "Ids of each text of a list."},
    {"encode_chunks", (PyCFunction)Encoder_encode_chunks, METH_O, "Ids of pre-split chunks."},
    {"unpack", (PyCFunction)Encoder_unpack, METH_O, "Ids packed by encode_u32 as a list."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject fb_EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tinylm.tokenizer._fastbpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(byte_ids, merges: [(left, right, new_id)] by rank, pattern, cache_entries)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};
