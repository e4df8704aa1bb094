/* Open-addressing hash maps: byte strings -> values (chunk counts, the encode cache) and
 * token pairs -> values (merge ranks, pair indices while training). */
#include <stdlib.h>
#include <string.h>

#include "fastbpe.h"

int fb_ids_reserve(fb_ids *a, size_t extra) {
    if (a->n + extra <= a->cap) return 0;
    size_t cap = a->cap ? a->cap : 64;
    while (cap < a->n + extra) cap *= 2;
    uint32_t *v = realloc(a->v, cap * sizeof(uint32_t));
    if (!v) return -1;
    a->v = v;
    a->cap = cap;
    return 0;
}

uint64_t fb_hash_bytes(const uint8_t *key, size_t len) {
    /* FNV-1a with a final mix; never 0, which marks an empty slot. */
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) h = (h ^ key[i]) * 0x100000001b3ULL;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 32;
    return h ? h : 1;
}

int fb_bmap_init(fb_bmap *m, size_t cap) {
    size_t c = 16;
    while (c < cap) c *= 2;
    m->slots = calloc(c, sizeof(fb_slot));
    m->cap = c;
    m->size = 0;
    m->arena = NULL;
    m->arena_len = m->arena_cap = 0;
    return m->slots ? 0 : -1;
}

void fb_bmap_free(fb_bmap *m) {
    free(m->slots);
    free(m->arena);
    m->slots = NULL;
    m->arena = NULL;
    m->cap = m->size = m->arena_len = m->arena_cap = 0;
}

void fb_bmap_clear(fb_bmap *m) {
    memset(m->slots, 0, m->cap * sizeof(fb_slot));
    m->size = 0;
    m->arena_len = 0;
}

fb_slot *fb_bmap_lookup(fb_bmap *m, const uint8_t *key, uint32_t len, uint64_t h) {
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    for (;;) {
        fb_slot *s = &m->slots[i];
        if (s->hash == 0) return s;
        if (s->hash == h && s->key_len == len && memcmp(m->arena + s->key_off, key, len) == 0)
            return s;
        i = (i + 1) & mask;
    }
}

static int bmap_grow(fb_bmap *m) {
    size_t cap = m->cap * 2, mask = cap - 1;
    fb_slot *slots = calloc(cap, sizeof(fb_slot));
    if (!slots) return -1;
    for (size_t k = 0; k < m->cap; k++) {
        fb_slot *s = &m->slots[k];
        if (s->hash == 0) continue;
        size_t i = (size_t)s->hash & mask;
        while (slots[i].hash) i = (i + 1) & mask;
        slots[i] = *s;
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return 0;
}

fb_slot *fb_bmap_insert(fb_bmap *m, fb_slot *slot, const uint8_t *key, uint32_t len, uint64_t h) {
    if (m->arena_len + len > m->arena_cap) {
        size_t cap = m->arena_cap ? m->arena_cap : 4096;
        while (cap < m->arena_len + len) cap *= 2;
        uint8_t *arena = realloc(m->arena, cap);
        if (!arena) return NULL;
        m->arena = arena;
        m->arena_cap = cap;
    }
    memcpy(m->arena + m->arena_len, key, len);
    slot->hash = h;
    slot->key_off = m->arena_len;
    slot->key_len = len;
    slot->aux = 0;
    slot->value = 0;
    m->arena_len += len;
    m->size++;
    if (m->size * 4 >= m->cap * 3) {
        if (bmap_grow(m) < 0) return NULL;
        return fb_bmap_lookup(m, key, len, h);
    }
    return slot;
}

static inline size_t pair_slot(uint64_t key, size_t mask) {
    uint64_t x = key + 0x9e3779b97f4a7c15ULL; /* splitmix64 finalizer */
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return (size_t)(x ^ (x >> 31)) & mask;
}

int fb_pmap_init(fb_pmap *m, size_t cap) {
    size_t c = 16;
    while (c < cap) c *= 2;
    m->keys = malloc(c * sizeof(uint64_t));
    m->vals = malloc(c * sizeof(int64_t));
    m->cap = c;
    m->size = 0;
    if (!m->keys || !m->vals) return -1;
    memset(m->keys, 0xFF, c * sizeof(uint64_t));
    return 0;
}

void fb_pmap_free(fb_pmap *m) {
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
    m->cap = m->size = 0;
}

int64_t *fb_pmap_get(const fb_pmap *m, uint64_t key) {
    size_t mask = m->cap - 1, i = pair_slot(key, mask);
    for (;;) {
        if (m->keys[i] == key) return &m->vals[i];
        if (m->keys[i] == FB_EMPTY_KEY) return NULL;
        i = (i + 1) & mask;
    }
}

static int pmap_grow(fb_pmap *m) {
    fb_pmap bigger;
    if (fb_pmap_init(&bigger, m->cap * 2) < 0) {
        fb_pmap_free(&bigger);
        return -1;
    }
    size_t mask = bigger.cap - 1;
    for (size_t k = 0; k < m->cap; k++) {
        if (m->keys[k] == FB_EMPTY_KEY) continue;
        size_t i = pair_slot(m->keys[k], mask);
        while (bigger.keys[i] != FB_EMPTY_KEY) i = (i + 1) & mask;
        bigger.keys[i] = m->keys[k];
        bigger.vals[i] = m->vals[k];
    }
    bigger.size = m->size;
    fb_pmap_free(m);
    *m = bigger;
    return 0;
}

int64_t *fb_pmap_put(fb_pmap *m, uint64_t key, int64_t init, int *inserted) {
    if ((m->size + 1) * 4 >= m->cap * 3 && pmap_grow(m) < 0) return NULL;
    size_t mask = m->cap - 1, i = pair_slot(key, mask);
    for (;;) {
        if (m->keys[i] == key) {
            if (inserted) *inserted = 0;
            return &m->vals[i];
        }
        if (m->keys[i] == FB_EMPTY_KEY) {
            m->keys[i] = key;
            m->vals[i] = init;
            m->size++;
            if (inserted) *inserted = 1;
            return &m->vals[i];
        }
        i = (i + 1) & mask;
    }
}
