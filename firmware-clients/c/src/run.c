/* SPDX-License-Identifier: Apache-2.0 */
/*
 * run.c — an optional blocking driver: the sans-IO client over a
 * perch_transport_t (frame send/receive function pointers and a clock).
 *
 * The only code of the library that calls out: everything it does is the
 * loop a firmware's main would write, so a firmware with its own scheduler
 * (an RTOS task, an event loop) can leave this file out.
 */
#include <stddef.h>

#include "perch_device.h"
#include "perch_protect.h"

/* Hands out every queued event; 1 when on_event asked to stop. */
static int drain_events(perch_client_t *client, perch_event_fn on_event, void *context)
{
    perch_event_t event;
    while (perch_poll_event(client, &event)) {
        if (on_event && on_event(context, client, &event)) {
            return 1;
        }
    }
    return 0;
}

/* One frame to send, sealed when the client has a keyring. */
static size_t transmit(perch_client_t *client, perch_keyring_t *keyring, uint8_t *buf, size_t cap)
{
    return keyring ? perch_poll_transmit_sealed(client, keyring, buf, cap)
                   : perch_poll_transmit(client, buf, cap);
}

static int run(perch_client_t *client, perch_keyring_t *keyring,
               const perch_transport_t *transport, uint8_t *buf, size_t cap,
               uint32_t timeout_ms, perch_event_fn on_event, void *context)
{
    void *io = transport->context;
    uint32_t start_ms = transport->now_ms(io);
    for (;;) {
        uint32_t now_ms;
        uint32_t elapsed_ms;
        uint32_t wait_ms;
        uint32_t deadline_ms;
        int32_t received;
        size_t len;
        while ((len = transmit(client, keyring, buf, cap)) > 0) {
            if (transport->send(io, buf, len) < 0) {
                return PERCH_ERR_TRANSPORT;
            }
        }
        if (drain_events(client, on_event, context)) {
            return 1;
        }
        /* Handlers may have queued frames (publishes, replies): send them
         * before waiting. */
        if ((len = transmit(client, keyring, buf, cap)) > 0) {
            if (transport->send(io, buf, len) < 0) {
                return PERCH_ERR_TRANSPORT;
            }
            continue;
        }
        now_ms = transport->now_ms(io);
        elapsed_ms = now_ms - start_ms;
        if (elapsed_ms >= timeout_ms) {
            return 0;
        }
        wait_ms = timeout_ms - elapsed_ms;
        if (perch_poll_timeout(client, &deadline_ms)) {
            uint32_t until_ms = (int32_t)(deadline_ms - now_ms) > 0 ? deadline_ms - now_ms : 0;
            wait_ms = until_ms < wait_ms ? until_ms : wait_ms;
        }
        received = transport->recv(io, buf, cap, wait_ms);
        if (received < 0) {
            return PERCH_ERR_TRANSPORT;
        }
        if (received > 0) {
            /* A malformed frame is counted in the stats and dropped. */
            if (keyring) {
                (void)perch_handle_sealed_input(client, keyring, buf, (size_t)received,
                                                transport->now_ms(io));
            } else {
                (void)perch_handle_input(client, buf, (size_t)received, transport->now_ms(io));
            }
            /* Before anything reuses `buf`: a message event points into it. */
            if (drain_events(client, on_event, context)) {
                return 1;
            }
        }
        perch_handle_timeout(client, transport->now_ms(io));
    }
}

int perch_run(perch_client_t *client, const perch_transport_t *transport, uint8_t *buf,
              size_t cap, uint32_t timeout_ms, perch_event_fn on_event, void *context)
{
    return run(client, NULL, transport, buf, cap, timeout_ms, on_event, context);
}

int perch_run_sealed(perch_client_t *client, perch_keyring_t *keyring,
                     const perch_transport_t *transport, uint8_t *buf, size_t cap,
                     uint32_t timeout_ms, perch_event_fn on_event, void *context)
{
    return run(client, keyring, transport, buf, cap, timeout_ms, on_event, context);
}
