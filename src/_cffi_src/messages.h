/*
 * The project's error table (messages.c), as the platform code sees it.
 */
#ifndef VD_MESSAGES_H
#define VD_MESSAGES_H

#ifdef _WIN32
#include <windows.h>
#else
#include "virtdisk.h"
#endif

#include <stddef.h>

const char *vd_error_name(DWORD code);
size_t vd_error_table_size(void);
DWORD vd_error_table_code(size_t index);

/* The table's message for code, or NULL. */
const char *vd_error_table_text(DWORD code);

/* Copies text into buffer (size bytes, NUL included, truncating) and returns
   strlen(text), the vd_error_message() contract. */
size_t vd_copy_message(const char *text, char *buffer, size_t size);

#endif
