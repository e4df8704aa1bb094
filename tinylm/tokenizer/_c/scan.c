/* Pre-tokenization by hand for the two built-in split regexes, on UTF-8 bytes.
 *
 * Each function follows its regex alternative by alternative (first alternative that matches
 * wins, possessive quantifiers never give back); tests check them against the `regex` package
 * on random and real text.
 *
 * gpt4: '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+
 *       |\s++$|\s*[\r\n]|\s+(?!\S)|\s
 * gpt2: '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
 */
#include "fastbpe.h"

const uint8_t *fb_classes = NULL;

/* The code point at byte i of valid UTF-8, and its length in bytes. */
static inline uint32_t utf8_at(const uint8_t *s, size_t i, size_t *len) {
    uint8_t c = s[i];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    if (c < 0xE0) {
        *len = 2;
        return ((uint32_t)(c & 0x1F) << 6) | (s[i + 1] & 0x3F);
    }
    if (c < 0xF0) {
        *len = 3;
        return ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    }
    *len = 4;
    return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
           ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
}

#define CLS(cp) (fb_classes[(cp)])
#define IS_OTHER(k) (((k) & (FB_L | FB_N | FB_S)) == 0)

/* End of the run of characters whose class has a bit of mask, from byte i. */
static inline size_t skip_class(const uint8_t *s, size_t n, size_t i, uint8_t mask) {
    while (i < n) {
        size_t l;
        uint32_t cp = utf8_at(s, i, &l);
        if (!(CLS(cp) & mask)) break;
        i += l;
    }
    return i;
}

/* End of the run of characters that are neither letter, number nor space, from byte i. */
static inline size_t skip_other(const uint8_t *s, size_t n, size_t i) {
    while (i < n) {
        size_t l;
        uint32_t cp = utf8_at(s, i, &l);
        if (!IS_OTHER(CLS(cp))) break;
        i += l;
    }
    return i;
}

static inline size_t skip_newlines(const uint8_t *s, size_t n, size_t i) {
    while (i < n && (s[i] == '\r' || s[i] == '\n')) i++;
    return i;
}

static inline uint32_t lower_ascii(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* The whitespace alternatives shared by both patterns, for a space run starting at i.
 * with_newline adds gpt4's \s*[\r\n] (the run up to its last line break). */
static size_t whitespace(const uint8_t *s, size_t n, size_t i, size_t first_len, int with_newline) {
    size_t e = i, last_start = i, last_newline_end = 0, count = 0;
    while (e < n) {
        size_t l;
        uint32_t cp = utf8_at(s, e, &l);
        if (!(CLS(cp) & FB_S)) break;
        if (cp == '\r' || cp == '\n') last_newline_end = e + l;
        last_start = e;
        e += l;
        count++;
    }
    if (e == n) return n;                                   /* \s++$ */
    if (with_newline && last_newline_end) return last_newline_end; /* \s*[\r\n] */
    if (count >= 2) return last_start;                      /* \s+(?!\S) */
    return i + first_len;                                   /* \s */
}

static size_t next_gpt4(const uint8_t *s, size_t n, size_t i) {
    size_t l0, l1, l2;
    uint32_t c0 = utf8_at(s, i, &l0);
    uint8_t k0 = CLS(c0);
    size_t j = i + l0;
    if (c0 == '\'' && j < n) {
        uint32_t d1 = lower_ascii(utf8_at(s, j, &l1));
        if (d1 == 0x17F) d1 = 's'; /* LATIN SMALL LETTER LONG S case-folds to s */
        if (d1 == 's' || d1 == 'd' || d1 == 'm' || d1 == 't') return j + l1;
        if (j + l1 < n) {
            uint32_t d2 = lower_ascii(utf8_at(s, j + l1, &l2));
            if ((d1 == 'l' && d2 == 'l') || (d1 == 'v' && d2 == 'e') || (d1 == 'r' && d2 == 'e'))
                return j + l1 + l2;
        }
    }
    if (k0 & FB_L) return skip_class(s, n, j, FB_L);
    if (!(k0 & FB_N) && c0 != '\r' && c0 != '\n' && j < n) {
        uint32_t c1 = utf8_at(s, j, &l1);
        if (CLS(c1) & FB_L) return skip_class(s, n, j + l1, FB_L);
    }
    if (k0 & FB_N) {
        size_t e = j;
        for (int k = 1; k < 3 && e < n; k++) {
            uint32_t cp = utf8_at(s, e, &l1);
            if (!(CLS(cp) & FB_N)) break;
            e += l1;
        }
        return e;
    }
    if (c0 == ' ' && j < n) {
        uint32_t c1 = utf8_at(s, j, &l1);
        if (IS_OTHER(CLS(c1))) return skip_newlines(s, n, skip_other(s, n, j + l1));
    }
    if (IS_OTHER(k0)) return skip_newlines(s, n, skip_other(s, n, j));
    return whitespace(s, n, i, l0, 1);
}

static size_t next_gpt2(const uint8_t *s, size_t n, size_t i) {
    size_t l0, l1;
    uint32_t c0 = utf8_at(s, i, &l0);
    uint8_t k0 = CLS(c0);
    size_t j = i + l0;
    if (c0 == '\'' && j < n) {
        uint8_t d1 = s[j];
        if (d1 == 's' || d1 == 'd' || d1 == 'm' || d1 == 't') return j + 1;
        if (j + 1 < n) {
            uint8_t d2 = s[j + 1];
            if ((d1 == 'l' && d2 == 'l') || (d1 == 'v' && d2 == 'e') || (d1 == 'r' && d2 == 'e'))
                return j + 2;
        }
    }
    if (c0 == ' ' && j < n) {
        uint8_t k1 = CLS(utf8_at(s, j, &l1));
        if (k1 & FB_L) return skip_class(s, n, j + l1, FB_L);
        if (k1 & FB_N) return skip_class(s, n, j + l1, FB_N);
        if (IS_OTHER(k1)) return skip_other(s, n, j + l1);
    }
    if (k0 & FB_L) return skip_class(s, n, j, FB_L);
    if (k0 & FB_N) return skip_class(s, n, j, FB_N);
    if (IS_OTHER(k0)) return skip_other(s, n, j);
    return whitespace(s, n, i, l0, 0);
}

size_t fb_next_chunk(const uint8_t *s, size_t n, size_t i, int pattern) {
    return pattern == FB_PATTERN_GPT4 ? next_gpt4(s, n, i) : next_gpt2(s, n, i);
}
