/*
 * Operations that run inside a server process (helper.h), which owns the
 * image and its BAT: the server's end of VD_MSG_OPERATION_START, _STATUS,
 * _CANCEL and VD_MSG_BREAK_MIRROR (serveproto.h), which its supervisor
 * forwards on a channel of their own.
 *
 * Promises:
 *   - One thread answers the channel, one request at a time, each with one
 *     message (RESULT, or OPERATION_STATE for STATUS); a malformed or
 *     unknown request is answered ERROR_INVALID_PARAMETER, never guessed at.
 *   - At most one operation at a time: a START while one is active answers
 *     ERROR_BUSY.  The last operation's state stays readable (STATUS) until
 *     the next START; STATUS before any answers kind VD_OPERATION_NONE.
 *   - Each START taken is numbered (its RESULT's loop field); a CANCEL
 *     naming a number stops only that operation (else ERROR_NOT_FOUND), so
 *     that a handle closing long after its mirror ended cannot stop a later
 *     operation.
 *   - When the session ends (fuseserve.h's end hook) the operation is ended
 *     before the served image is flushed and closed, and later requests are
 *     answered ERROR_NOT_READY.
 */
#ifndef VD_PROVIDER_SERVEOPS_H
#define VD_PROVIDER_SERVEOPS_H

#include "fuseserve.h"
#include "virtdisk.h"

/* Answers requests on channel (the server's end of the supervisor's
   socketpair) for server, on a thread of its own.  Takes the channel. */
DWORD vd_serve_ops_start(struct vd_fuse_server *server, int channel);

#endif
