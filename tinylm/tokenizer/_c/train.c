/* BPE training with incremental pair counts (the same algorithm as bpe.train_merges).
 *
 * Words are the unique pre-tokenized chunks with their counts. A pair's count is the sum over
 * words of (word count) x (occurrences of the pair, overlapping ones included). Each merge only
 * visits the words that hold the pair and updates counts locally; a max-heap with lazy deletion
 * finds the next pair. Ties: the highest count wins, then the smallest (left id, right id). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "fastbpe.h"

typedef struct {
    int64_t count;
    uint32_t a, b, idx;
} entry;

typedef struct {
    uint32_t *v;
    uint32_t n, cap;
} wlist;

typedef struct {
    uint32_t *tok;    /* all words' tokens, word w at tok[start[w]] */
    size_t *start;
    uint32_t *len;
    int64_t *count;
    size_t n_words;
    fb_pmap index;    /* pair -> index into the arrays below */
    uint32_t *pa, *pb, *stamp;
    int64_t *pc;
    wlist *where;     /* words that (may) hold the pair */
    size_t n_pairs, cap_pairs;
    entry *heap;
    size_t hn, hcap;
    uint32_t *touched; /* pairs that gained count during this merge */
    size_t n_touched, cap_touched;
} trainer;

static inline int better(const entry *x, const entry *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static int heap_push(trainer *T, entry e) {
    if (T->hn == T->hcap) {
        size_t cap = T->hcap ? T->hcap * 2 : 1024;
        entry *h = realloc(T->heap, cap * sizeof(entry));
        if (!h) return -1;
        T->heap = h;
        T->hcap = cap;
    }
    size_t i = T->hn++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!better(&e, &T->heap[p])) break;
        T->heap[i] = T->heap[p];
        i = p;
    }
    T->heap[i] = e;
    return 0;
}

static entry heap_pop(trainer *T) {
    entry top = T->heap[0], last = T->heap[--T->hn];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= T->hn) break;
        if (c + 1 < T->hn && better(&T->heap[c + 1], &T->heap[c])) c++;
        if (!better(&T->heap[c], &last)) break;
        T->heap[i] = T->heap[c];
        i = c;
    }
    if (T->hn) T->heap[i] = last;
    return top;
}

static int64_t pair_index(trainer *T, uint32_t a, uint32_t b) {
    int inserted;
    int64_t *slot = fb_pmap_put(&T->index, FB_PAIR(a, b), (int64_t)T->n_pairs, &inserted);
    if (!slot) return -1;
    if (!inserted) return *slot;
    if (T->n_pairs == T->cap_pairs) {
        size_t cap = T->cap_pairs ? T->cap_pairs * 2 : 4096;
        uint32_t *pa = realloc(T->pa, cap * sizeof(uint32_t));
        if (pa) T->pa = pa;
        uint32_t *pb = realloc(T->pb, cap * sizeof(uint32_t));
        if (pb) T->pb = pb;
        uint32_t *st = realloc(T->stamp, cap * sizeof(uint32_t));
        if (st) T->stamp = st;
        int64_t *pc = realloc(T->pc, cap * sizeof(int64_t));
        if (pc) T->pc = pc;
        wlist *wh = realloc(T->where, cap * sizeof(wlist));
        if (wh) T->where = wh;
        if (!pa || !pb || !st || !pc || !wh) return -1;
        T->cap_pairs = cap;
    }
    size_t i = T->n_pairs++;
    T->pa[i] = a;
    T->pb[i] = b;
    T->pc[i] = 0;
    T->stamp[i] = UINT32_MAX;
    T->where[i] = (wlist){NULL, 0, 0};
    return (int64_t)i;
}

/* Add delta to the count of (a, b) in word w; gains remember the word and the pair. */
static int add_pair(trainer *T, uint32_t a, uint32_t b, int64_t delta, uint32_t w, uint32_t stamp) {
    int64_t i = pair_index(T, a, b);
    if (i < 0) return -1;
    T->pc[i] += delta;
    if (delta <= 0) return 0;
    wlist *wl = &T->where[i];
    if (wl->n == 0 || wl->v[wl->n - 1] != w) {
        if (wl->n == wl->cap) {
            uint32_t cap = wl->cap ? wl->cap * 2 : 2;
            uint32_t *v = realloc(wl->v, cap * sizeof(uint32_t));
            if (!v) return -1;
            wl->v = v;
            wl->cap = cap;
        }
        wl->v[wl->n++] = w;
    }
    if (T->stamp[i] != stamp) {
        T->stamp[i] = stamp;
        if (T->n_touched == T->cap_touched) {
            size_t cap = T->cap_touched ? T->cap_touched * 2 : 1024;
            uint32_t *t = realloc(T->touched, cap * sizeof(uint32_t));
            if (!t) return -1;
            T->touched = t;
            T->cap_touched = cap;
        }
        T->touched[T->n_touched++] = (uint32_t)i;
    }
    return 0;
}

/* Replace every (a, b) in word w by c, left to right, updating the neighbours' pair counts. */
static int merge_word(trainer *T, uint32_t w, uint32_t a, uint32_t b, uint32_t c, uint32_t stamp) {
    uint32_t *t = T->tok + T->start[w];
    size_t len = T->len[w], r = 0, o = 0;
    int64_t n = T->count[w];
    while (r < len) {
        if (r + 1 < len && t[r] == a && t[r + 1] == b) {
            if (o > 0 && (add_pair(T, t[o - 1], a, -n, w, stamp) < 0 ||
                          add_pair(T, t[o - 1], c, n, w, stamp) < 0))
                return -1;
            if (add_pair(T, a, b, -n, w, stamp) < 0) return -1;
            if (r + 2 < len && (add_pair(T, b, t[r + 2], -n, w, stamp) < 0 ||
                                add_pair(T, c, t[r + 2], n, w, stamp) < 0))
                return -1;
            t[o++] = c;
            r += 2;
        } else {
            t[o++] = t[r++];
        }
    }
    T->len[w] = (uint32_t)o;
    return 0;
}

static int cmp_u32(const void *x, const void *y) {
    uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
    return (a > b) - (a < b);
}

static void trainer_free(trainer *T) {
    for (size_t i = 0; i < T->n_pairs; i++) free(T->where[i].v);
    free(T->tok), free(T->start), free(T->len), free(T->count);
    free(T->pa), free(T->pb), free(T->stamp), free(T->pc), free(T->where);
    free(T->heap), free(T->touched);
    fb_pmap_free(&T->index);
}

static int load_words(trainer *T, PyObject *words, PyObject *counts) {
    size_t n = (size_t)PyList_GET_SIZE(words), total = 0;
    for (size_t w = 0; w < n; w++) total += (size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(words, w));
    T->n_words = n;
    T->tok = malloc((total + 1) * sizeof(uint32_t));
    T->start = malloc((n + 1) * sizeof(size_t));
    T->len = malloc((n + 1) * sizeof(uint32_t));
    T->count = malloc((n + 1) * sizeof(int64_t));
    if (!T->tok || !T->start || !T->len || !T->count || fb_pmap_init(&T->index, 1 << 16) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    size_t pos = 0;
    for (size_t w = 0; w < n; w++) {
        PyObject *word = PyList_GET_ITEM(words, w);
        const uint8_t *s = (const uint8_t *)PyBytes_AS_STRING(word);
        size_t len = (size_t)PyBytes_GET_SIZE(word);
        long long c = PyLong_AsLongLong(PyList_GET_ITEM(counts, w));
        if (c == -1 && PyErr_Occurred()) return -1;
        T->start[w] = pos;
        T->len[w] = (uint32_t)len;
        T->count[w] = c;
        for (size_t i = 0; i < len; i++) T->tok[pos + i] = s[i];
        for (size_t i = 0; i + 1 < len; i++)
            if (add_pair(T, s[i], s[i + 1], c, (uint32_t)w, 0) < 0) {
                PyErr_NoMemory();
                return -1;
            }
        pos += len;
    }
    return 0;
}

/* train(words: list[bytes], counts: list[int], n_merges, callback, every) -> list[(a, b)] */
PyObject *fb_py_train(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *words, *counts, *callback, *result = NULL;
    Py_ssize_t n_merges, every;
    if (!PyArg_ParseTuple(args, "O!O!nOn", &PyList_Type, &words, &PyList_Type, &counts,
                          &n_merges, &callback, &every))
        return NULL;
    if (PyList_GET_SIZE(words) != PyList_GET_SIZE(counts) || every < 1) {
        PyErr_SetString(PyExc_ValueError, "words and counts differ in length, or every < 1");
        return NULL;
    }
    for (Py_ssize_t w = 0; w < PyList_GET_SIZE(words); w++)
        if (!PyBytes_Check(PyList_GET_ITEM(words, w))) {
            PyErr_SetString(PyExc_TypeError, "words must be bytes");
            return NULL;
        }
    trainer T;
    memset(&T, 0, sizeof(T));
    if (load_words(&T, words, counts) < 0) goto done;
    for (size_t i = 0; i < T.n_pairs; i++)
        if (T.pc[i] > 0 && heap_push(&T, (entry){T.pc[i], T.pa[i], T.pb[i], (uint32_t)i}) < 0) goto nomem;
    if (!(result = PyList_New(0))) goto done;
    for (Py_ssize_t m = 0; m < n_merges; m++) {
        entry top;
        int found = 0;
        while (T.hn) {
            top = heap_pop(&T);
            int64_t now = T.pc[top.idx];
            if (now == top.count && now > 0) {
                found = 1;
                break;
            }
            if (now > 0 && now != top.count) {
                top.count = now;
                if (heap_push(&T, top) < 0) goto nomem;
            }
        }
        if (!found) break;
        uint32_t c = 256 + (uint32_t)m, stamp = (uint32_t)m + 1;
        wlist wl = T.where[top.idx];
        T.where[top.idx] = (wlist){NULL, 0, 0};
        qsort(wl.v, wl.n, sizeof(uint32_t), cmp_u32);
        T.n_touched = 0;
        for (uint32_t k = 0; k < wl.n; k++) {
            if (k > 0 && wl.v[k] == wl.v[k - 1]) continue;
            if (merge_word(&T, wl.v[k], top.a, top.b, c, stamp) < 0) {
                free(wl.v);
                goto nomem;
            }
        }
        free(wl.v);
        for (size_t k = 0; k < T.n_touched; k++) {
            uint32_t i = T.touched[k];
            if (T.pc[i] > 0 && heap_push(&T, (entry){T.pc[i], T.pa[i], T.pb[i], i}) < 0) goto nomem;
        }
        PyObject *pair = Py_BuildValue("(II)", top.a, top.b);
        if (!pair || PyList_Append(result, pair) < 0) {
            Py_XDECREF(pair);
            Py_CLEAR(result);
            goto done;
        }
        Py_DECREF(pair);
        if ((m + 1) % every == 0) {
            if (PyErr_CheckSignals() < 0) {
                Py_CLEAR(result);
                goto done;
            }
            if (callback != Py_None) {
                PyObject *r = PyObject_CallFunction(callback, "n", m + 1);
                if (!r) {
                    Py_CLEAR(result);
                    goto done;
                }
                Py_DECREF(r);
            }
        }
    }
    goto done;
nomem:
    Py_CLEAR(result);
    PyErr_NoMemory();
done:
    trainer_free(&T);
    return result;
}
