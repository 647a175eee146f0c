/*
 * Linux only: the provider's serving helper (src/provider/helper.h), which
 * runs as `python -I -m virtdisk._serve FD`.  Like shim.h this file is both a
 * cffi cdef and a C header, so it holds prototypes only.
 */

/* The interpreter that runs the serving helper (the facade passes
   sys.executable at import); copied. */
void vd_serve_set_program(const char *python);

/* The serving helper's main, on control channel fd (inherited from the
   attaching process).  Never returns. */
void vd_serve_main(int control_fd);

/* The image (UTF-8 path) of the served attachment on /dev/loopN, from the
   provider's records, trusted only while that device is still bound to the
   record's FUSE file and its helper lives: the path's length (written
   NUL-terminated, truncated to size), or 0 when none. */
size_t vd_served_image_of(int number, char *path, size_t size);
