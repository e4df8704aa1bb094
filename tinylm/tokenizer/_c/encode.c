/* Encoding one chunk: apply merges lowest rank first, the leftmost occurrence first (the
 * same result as tiktoken and Hugging Face tokenizers), through a cache of chunk -> ids. */
#include <stdlib.h>
#include <string.h>

#include "fastbpe.h"

#define NO_MERGE INT64_MAX
#define HEAP_FROM 64 /* chunks at least this long use a heap instead of repeated scans */

int fb_encoder_init(fb_encoder *e, size_t n_merges) {
    memset(e, 0, sizeof(*e));
    if (fb_pmap_init(&e->merges, n_merges * 2 + 16) < 0) return -1;
    return fb_bmap_init(&e->cache, 1 << 12);
}

void fb_encoder_free(fb_encoder *e) {
    fb_pmap_free(&e->merges);
    fb_bmap_free(&e->cache);
    free(e->cache_ids.v);
    free(e->scratch.v);
    memset(e, 0, sizeof(*e));
}

static inline int64_t merge_of(const fb_encoder *e, uint32_t a, uint32_t b) {
    const int64_t *v = fb_pmap_get(&e->merges, FB_PAIR(a, b));
    return v ? *v : NO_MERGE;
}

/* Short chunks: keep the rank of every adjacent pair; merge the smallest, leftmost first. */
static void bpe_scan(const fb_encoder *e, uint32_t *t, int64_t *r, size_t *len_io) {
    size_t len = *len_io;
    for (size_t i = 0; i + 1 < len; i++) r[i] = merge_of(e, t[i], t[i + 1]);
    while (len > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < len; i++)
            if (r[i] < r[best]) best = i;
        if (r[best] == NO_MERGE) break;
        t[best] = (uint32_t)(r[best] & 0xFFFFFFFFu);
        memmove(t + best + 1, t + best + 2, (len - best - 2) * sizeof(uint32_t));
        memmove(r + best + 1, r + best + 2, (len - best - 2) * sizeof(int64_t));
        len--;
        if (best > 0) r[best - 1] = merge_of(e, t[best - 1], t[best]);
        if (best + 1 < len) r[best] = merge_of(e, t[best], t[best + 1]);
    }
    *len_io = len;
}

/* Binary min-heap of (rank << 32 | position) keys. */
static void heap_push(uint64_t *h, size_t *n, uint64_t key) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= key) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = key;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= last) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

/* Long chunks: a linked list of tokens and a heap of candidate merges ordered by (rank,
 * position); stale entries are skipped when popped. O(n log n) for any chunk length. */
static int bpe_heap(const fb_encoder *e, uint32_t *t, size_t *len_io) {
    size_t len = *len_io, hn = 0;
    int64_t *next = malloc(len * sizeof(int64_t));
    int64_t *prev = malloc(len * sizeof(int64_t));
    uint64_t *heap = malloc(3 * len * sizeof(uint64_t)); /* len initial + 2 per merge */
    if (!next || !prev || !heap) {
        free(next), free(prev), free(heap);
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        next[i] = i + 1 < len ? (int64_t)i + 1 : -1;
        prev[i] = (int64_t)i - 1;
        if (i + 1 < len) {
            int64_t m = merge_of(e, t[i], t[i + 1]);
            if (m != NO_MERGE) heap_push(heap, &hn, ((uint64_t)(m >> 32) << 32) | i);
        }
    }
    while (hn) {
        uint64_t key = heap_pop(heap, &hn);
        size_t p = (size_t)(key & 0xFFFFFFFFu);
        int64_t q = next[p];
        if (t[p] == UINT32_MAX || q < 0) continue;
        int64_t m = merge_of(e, t[p], t[q]);
        if (m == NO_MERGE || (uint64_t)(m >> 32) != (key >> 32)) continue;
        t[p] = (uint32_t)(m & 0xFFFFFFFFu);
        t[q] = UINT32_MAX;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = (int64_t)p;
        if (prev[p] >= 0) {
            int64_t m2 = merge_of(e, t[prev[p]], t[p]);
            if (m2 != NO_MERGE) heap_push(heap, &hn, ((uint64_t)(m2 >> 32) << 32) | (uint64_t)prev[p]);
        }
        if (next[p] >= 0) {
            int64_t m2 = merge_of(e, t[p], t[next[p]]);
            if (m2 != NO_MERGE) heap_push(heap, &hn, ((uint64_t)(m2 >> 32) << 32) | p);
        }
    }
    size_t o = 0;
    for (int64_t i = 0; i >= 0; i = next[i]) t[o++] = t[i];
    *len_io = o;
    free(next), free(prev), free(heap);
    return 0;
}

int fb_encode_chunk(fb_encoder *e, const uint8_t *s, size_t len, fb_ids *out) {
    if (len == 1) {
        if (fb_ids_reserve(out, 1) < 0) return -1;
        out->v[out->n++] = e->byte_ids[s[0]];
        return 0;
    }
    uint64_t h = fb_hash_bytes(s, len);
    fb_slot *slot = fb_bmap_lookup(&e->cache, s, (uint32_t)len, h);
    if (slot->hash) {
        if (fb_ids_reserve(out, slot->aux) < 0) return -1;
        memcpy(out->v + out->n, e->cache_ids.v + slot->value, slot->aux * sizeof(uint32_t));
        out->n += slot->aux;
        return 0;
    }
    e->scratch.n = 0;
    if (fb_ids_reserve(&e->scratch, len) < 0) return -1;
    uint32_t *t = e->scratch.v;
    for (size_t i = 0; i < len; i++) t[i] = e->byte_ids[s[i]];
    size_t n = len;
    if (len < HEAP_FROM) {
        int64_t r[HEAP_FROM];
        bpe_scan(e, t, r, &n);
    } else if (bpe_heap(e, t, &n) < 0) {
        return -1;
    }
    if (fb_ids_reserve(out, n) < 0) return -1;
    memcpy(out->v + out->n, t, n * sizeof(uint32_t));
    out->n += n;
    if (len > 4096) return 0; /* very long chunks are rare and not worth their memory */
    if (e->cache.size >= e->max_cache_entries) {
        fb_bmap_clear(&e->cache); /* a full cache starts over: memory stays bounded */
        e->cache_ids.n = 0;
        slot = fb_bmap_lookup(&e->cache, s, (uint32_t)len, h);
    }
    size_t off = e->cache_ids.n;
    if (fb_ids_reserve(&e->cache_ids, n) < 0) return -1;
    memcpy(e->cache_ids.v + off, t, n * sizeof(uint32_t));
    e->cache_ids.n += n;
    slot = fb_bmap_insert(&e->cache, slot, s, (uint32_t)len, h);
    if (!slot) return -1;
    slot->value = (int64_t)off;
    slot->aux = (uint32_t)n;
    return 0;
}

int fb_encode_text(fb_encoder *e, const uint8_t *s, size_t n, int pattern, fb_ids *out) {
    size_t i = 0;
    while (i < n) {
        size_t end = fb_next_chunk(s, n, i, pattern);
        if (fb_encode_chunk(e, s + i, end - i, out) < 0) return -1;
        i = end;
    }
    return 0;
}
