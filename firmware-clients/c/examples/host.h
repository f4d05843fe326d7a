/* SPDX-License-Identifier: Apache-2.0 */
/*
 * host.h — POSIX transports for the example programs: UDP (one frame per
 * datagram), TCP (varint length prefix) and a serial tty (COBS + CRC-16, raw
 * mode), each behind a perch_transport_t, plus the monotonic clock. What a
 * firmware writes for its radio or UART instead; the library knows none of it.
 */
#ifndef PERCH_EXAMPLE_HOST_H
#define PERCH_EXAMPLE_HOST_H

#include <stddef.h>
#include <stdint.h>

#include "perch_device.h"
#include "perch_protect.h"

/* Bytes a transport buffers: a frame plus its framing, with room to spare. */
#define HOST_STREAM_BYTES 4096

typedef enum { HOST_UDP, HOST_TCP, HOST_SERIAL } host_kind_t;

typedef struct host_transport {
    host_kind_t kind;
    int fd;
    /* TCP and serial: received bytes not yet split into frames. */
    uint8_t pending[HOST_STREAM_BYTES];
    size_t pending_len;
    /* Serial: the deframer's buffer, and the line buffer for encoding. */
    uint8_t deframe_buf[PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX];
    uint8_t line[PERCH_SERIAL_BYTES_MAX(PERCH_FRAME_BYTES_MAX)];
    perch_deframer_t deframer;
} host_transport_t;

/* Opens `kind` to HOST:PORT (UDP, TCP) or the tty at path HOST with baud
 * PORT (serial) and fills `transport` to drive a client over it. Returns 0,
 * or -1 with a message on stderr. */
int host_open(host_transport_t *host, host_kind_t kind, const char *host_name,
              const char *port, perch_transport_t *transport);

/* Parses "--transport udp|tcp|serial"-style names; -1 if unknown. */
int host_kind_from_name(const char *name);

/* Milliseconds of CLOCK_MONOTONIC (wraps; what the client takes). */
uint32_t host_now_ms(void);

/* Sleeps `ms` milliseconds. */
void host_sleep_ms(uint32_t ms);

/* Whether a DISCONNECTED event ends the program: the application closed the
 * session, or the broker refused it for good (not permitted, unsupported
 * version); other reasons are retried by the client. */
int host_disconnect_is_final(const perch_event_t *event);

/* A device key from the environment: PERCH_KEY_FILE names a file of 64 hex
 * digits (the broker's key_file); the next epoch is kept in that path with
 * ".epoch" appended. Returns 1 and fills `keyring` when set, 0 when not, -1
 * on a bad file. */
int host_keyring_from_env(perch_keyring_t *keyring);

/* perch_run, sealed when `keyring` is not NULL. */
int host_run(perch_client_t *client, perch_keyring_t *keyring,
             const perch_transport_t *transport, uint8_t *buf, size_t cap, uint32_t timeout_ms,
             perch_event_fn on_event, void *context);

#endif /* PERCH_EXAMPLE_HOST_H */
