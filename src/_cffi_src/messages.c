/*
 * The project's table of error codes (errors.def): names and message texts,
 * used by the Linux provider for every message and by the Windows shim when
 * the system has no text for a code.
 */
#include "messages.h"

#include <string.h>

struct vd_error_entry {
    DWORD code;
    const char *name;
    const char *text;
};

static const struct vd_error_entry vd_error_table[] = {
#define VD_ERROR(name, code, text) {code, #name, text},
#include "errors.def"
#undef VD_ERROR
};

static const struct vd_error_entry *vd_error_lookup(DWORD code)
{
    for (size_t i = 0; i < sizeof vd_error_table / sizeof vd_error_table[0]; i++)
        if (vd_error_table[i].code == code)
            return &vd_error_table[i];
    return NULL;
}

const char *vd_error_name(DWORD code)
{
    const struct vd_error_entry *entry = vd_error_lookup(code);
    return entry ? entry->name : NULL;
}

const char *vd_error_table_text(DWORD code)
{
    const struct vd_error_entry *entry = vd_error_lookup(code);
    return entry ? entry->text : NULL;
}

size_t vd_error_table_size(void)
{
    return sizeof vd_error_table / sizeof vd_error_table[0];
}

DWORD vd_error_table_code(size_t index)
{
    return index < vd_error_table_size() ? vd_error_table[index].code : 0;
}

size_t vd_copy_message(const char *text, char *buffer, size_t size)
{
    size_t length = strlen(text);
    if (size > 0) {
        size_t n = length < size - 1 ? length : size - 1;
        memcpy(buffer, text, n);
        buffer[n] = '\0';
    }
    return length;
}
