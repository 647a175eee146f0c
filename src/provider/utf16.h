/*
 * UTF-16 (WCHAR, the API's strings) to and from UTF-8 (Linux paths).
 */
#ifndef VD_PROVIDER_UTF16_H
#define VD_PROVIDER_UTF16_H

#include "virtdisk.h"

/* A malloc'd UTF-8 copy of a NUL-terminated UTF-16 string, or NULL when the
   string is not valid UTF-16 (unpaired surrogate) or memory runs out. */
char *vd_utf16_to_utf8(const WCHAR *text);

/* Encodes UTF-8 text as UTF-16 into out (capacity in WCHARs, NUL included).
   Returns the number of WCHARs the whole text needs, NUL included, whether or
   not it fitted; 0 when the text is not valid UTF-8. */
size_t vd_utf8_to_utf16(const char *text, WCHAR *out, size_t capacity);

#endif
