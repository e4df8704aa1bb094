/* Shared declarations of tinylm's optional C accelerator for byte-level BPE.
 *
 * The Python package gives identical results without it (tinylm/tokenizer/bpe.py and
 * pretokenize.py); tests compare the two paths. */
#ifndef TINYLM_FASTBPE_H
#define TINYLM_FASTBPE_H

#include <stddef.h>
#include <stdint.h>

/* Built-in split patterns (see tinylm/tokenizer/pretokenize.py for the regexes). */
enum { FB_PATTERN_GPT4 = 1, FB_PATTERN_GPT2 = 2 };

/* Character classes, one byte per code point: letter (\p{L}), number (\p{N}), space (\s). */
enum { FB_L = 1, FB_N = 2, FB_S = 4 };
extern const uint8_t *fb_classes;

/* End (byte offset) of the pre-token that starts at byte i of the UTF-8 text s[0..n). */
size_t fb_next_chunk(const uint8_t *s, size_t n, size_t i, int pattern);

/* A growable array of token ids. */
typedef struct {
    uint32_t *v;
    size_t n, cap;
} fb_ids;
int fb_ids_reserve(fb_ids *a, size_t extra);

/* Byte-string keys -> (value, aux); keys live in an arena. */
typedef struct {
    uint64_t hash; /* 0 marks an empty slot */
    uint64_t key_off;
    uint32_t key_len;
    uint32_t aux;
    int64_t value;
} fb_slot;

typedef struct {
    fb_slot *slots;
    size_t cap, size;
    uint8_t *arena;
    size_t arena_len, arena_cap;
} fb_bmap;

uint64_t fb_hash_bytes(const uint8_t *key, size_t len);
int fb_bmap_init(fb_bmap *m, size_t cap);
void fb_bmap_free(fb_bmap *m);
void fb_bmap_clear(fb_bmap *m);
/* The slot holding key, or the empty slot where it would go (slot->hash == 0). */
fb_slot *fb_bmap_lookup(fb_bmap *m, const uint8_t *key, uint32_t len, uint64_t h);
/* Fill the empty slot returned by fb_bmap_lookup; returns the slot (it may move) or NULL. */
fb_slot *fb_bmap_insert(fb_bmap *m, fb_slot *slot, const uint8_t *key, uint32_t len, uint64_t h);

/* Pair (a, b) -> int64 value. */
typedef struct {
    uint64_t *keys; /* FB_EMPTY_KEY marks an empty slot */
    int64_t *vals;
    size_t cap, size;
} fb_pmap;

#define FB_EMPTY_KEY UINT64_MAX
#define FB_PAIR(a, b) (((uint64_t)(a) << 32) | (uint64_t)(b))

int fb_pmap_init(fb_pmap *m, size_t cap);
void fb_pmap_free(fb_pmap *m);
/* Pointer to the value of key, or NULL when absent. */
int64_t *fb_pmap_get(const fb_pmap *m, uint64_t key);
/* Pointer to the value of key, inserting it with value init when absent; NULL on no memory. */
int64_t *fb_pmap_put(fb_pmap *m, uint64_t key, int64_t init, int *inserted);

#endif

#ifndef TINYLM_FASTBPE_ENCODER
#define TINYLM_FASTBPE_ENCODER
/* The encoder: merges by rank, and a cache from chunk bytes to ids. */
typedef struct {
    uint32_t byte_ids[256];
    fb_pmap merges; /* FB_PAIR(left, right) -> (rank << 32) | new id */
    fb_bmap cache;  /* chunk -> (value: offset in cache_ids, aux: number of ids) */
    fb_ids cache_ids;
    fb_ids scratch; /* working space for one chunk */
    size_t max_cache_entries;
} fb_encoder;

int fb_encoder_init(fb_encoder *e, size_t n_merges);
void fb_encoder_free(fb_encoder *e);
/* Append the ids of one chunk (merges applied, through the cache) to out; -1 on no memory. */
int fb_encode_chunk(fb_encoder *e, const uint8_t *s, size_t len, fb_ids *out);
/* Pre-tokenize UTF-8 text with a built-in pattern and append the ids of every chunk. */
int fb_encode_text(fb_encoder *e, const uint8_t *s, size_t n, int pattern, fb_ids *out);
#endif
