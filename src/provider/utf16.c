/*
 * UTF-16 <-> UTF-8 for the API's WCHAR strings (see utf16.h).
 */
#include "utf16.h"

#include <stdlib.h>

char *vd_utf16_to_utf8(const WCHAR *text)
{
    size_t units = 0;
    while (text[units])
        units++;
    /* Each UTF-16 unit becomes at most 3 UTF-8 bytes (a surrogate pair, two
       units, becomes 4). */
    char *out = malloc(units * 3 + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < units; i++) {
        uint32_t c = text[i];
        if (c >= 0xD800 && c <= 0xDBFF) {
            if (i + 1 >= units || text[i + 1] < 0xDC00 || text[i + 1] > 0xDFFF)
                goto invalid;
            c = 0x10000 + ((c - 0xD800) << 10) + (text[++i] - 0xDC00);
        } else if (c >= 0xDC00 && c <= 0xDFFF) {
            goto invalid;
        }
        if (c < 0x80) {
            out[o++] = (char)c;
        } else if (c < 0x800) {
            out[o++] = (char)(0xC0 | c >> 6);
            out[o++] = (char)(0x80 | (c & 0x3F));
        } else if (c < 0x10000) {
            out[o++] = (char)(0xE0 | c >> 12);
            out[o++] = (char)(0x80 | (c >> 6 & 0x3F));
            out[o++] = (char)(0x80 | (c & 0x3F));
        } else {
            out[o++] = (char)(0xF0 | c >> 18);
            out[o++] = (char)(0x80 | (c >> 12 & 0x3F));
            out[o++] = (char)(0x80 | (c >> 6 & 0x3F));
            out[o++] = (char)(0x80 | (c & 0x3F));
        }
    }
    out[o] = '\0';
    return out;
invalid:
    free(out);
    return NULL;
}

size_t vd_utf8_to_utf16(const char *text, WCHAR *out, size_t capacity)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t needed = 0;
    while (*s) {
        uint32_t c;
        int extra;
        if (*s < 0x80) {
            c = *s;
            extra = 0;
        } else if ((*s & 0xE0) == 0xC0) {
            c = *s & 0x1F;
            extra = 1;
        } else if ((*s & 0xF0) == 0xE0) {
            c = *s & 0x0F;
            extra = 2;
        } else if ((*s & 0xF8) == 0xF0) {
            c = *s & 0x07;
            extra = 3;
        } else {
            return 0;
        }
        s++;
        for (int k = 0; k < extra; k++, s++) {
            if ((*s & 0xC0) != 0x80)
                return 0;
            c = c << 6 | (*s & 0x3F);
        }
        if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
            return 0;
        if (c >= 0x10000) {
            if (needed + 2 < capacity) {
                out[needed] = (WCHAR)(0xD800 + ((c - 0x10000) >> 10));
                out[needed + 1] = (WCHAR)(0xDC00 + ((c - 0x10000) & 0x3FF));
            }
            needed += 2;
        } else {
            if (needed + 1 < capacity)
                out[needed] = (WCHAR)c;
            needed += 1;
        }
    }
    if (capacity > 0)
        out[needed < capacity ? needed : capacity - 1] = 0;
    return needed + 1;
}
