/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sensor_sub — subscribes to SUBJECT (a NATS filter) and prints each
 * message's payload on its own line until COUNT arrived.
 *
 *   sensor_sub [options] HOST PORT CLIENT_ID SUBJECT COUNT
 *
 * Options (before the positional arguments):
 *   --transport udp|tcp|serial  as sensor_pub
 *   --timeout-ms N              give up after N ms (default 60000)
 *   --qos 0|1                   the subscription's max QoS (default 1)
 *   --reply TEXT                answer requests (messages with a reply
 *                               handle) with TEXT
 *   --sleep-s N                 after subscribing, sleep (DISCONNECT with
 *                               sleep_s N) and wake every --wake-ms to collect
 *                               the buffered messages
 *   --wake-ms N                 (default 1000)
 *
 * stderr says "subscribed to SUBJECT" once the broker confirmed, and
 * "asleep" / "waking" / "wake done" around each sleep.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"
#include "perch_device.h"

#define OUTGOING_MAX 4u
#define NAMES_MAX 8u
#define NAME_BYTES_MAX 128u

typedef struct sub_state {
    const char *filter;
    const char *reply;
    unsigned count;
    unsigned received;
    uint32_t sleep_s;
    int asleep;
    int failed;
    int closed;
} sub_state_t;

static int on_event(void *context, perch_client_t *client, const perch_event_t *event)
{
    sub_state_t *state = context;
    uint32_t now_ms = host_now_ms();
    switch (event->type) {
    case PERCH_EVENT_SUBSCRIBED:
        if (event->code != PERCH_CODE_OK) {
            fprintf(stderr, "subscription refused: code %u\n", event->code);
            state->failed = 1;
            return 1;
        }
        fprintf(stderr, "subscribed to %s\n", state->filter);
        if (state->sleep_s && perch_sleep(client, state->sleep_s, now_ms) != PERCH_OK) {
            fprintf(stderr, "cannot sleep now\n");
        }
        return 0;
    case PERCH_EVENT_MESSAGE:
        fwrite(event->payload, 1, event->payload_len, stdout);
        fputc('\n', stdout);
        fflush(stdout);
        if ((event->detail & PERCH_FLAG_REPLY) && state->reply) {
            (void)perch_reply(client, event->reply_handle, (const uint8_t *)state->reply,
                              strlen(state->reply), now_ms);
        }
        state->received++;
        return state->received >= state->count;
    case PERCH_EVENT_ASLEEP:
        fprintf(stderr, "asleep\n");
        state->asleep = 1;
        return 1;
    case PERCH_EVENT_WAKE_DONE:
        fprintf(stderr, "wake done\n");
        state->asleep = 1;
        return 1;
    case PERCH_EVENT_CONNECTED:
        fprintf(stderr, "connected (session_present=%u)\n", event->detail);
        return 0;
    case PERCH_EVENT_DISCONNECTED:
        fprintf(stderr, "disconnected (reason %u, code %u)\n", event->detail, event->code);
        state->asleep = 0;
        if (host_disconnect_is_final(event)) {
            state->closed = 1;
            return 1;
        }
        return 0;
    default:
        return 0;
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: sensor_sub [--transport udp|tcp|serial] [--timeout-ms N] "
                    "[--qos 0|1] [--reply TEXT] [--sleep-s N] [--wake-ms N]\n"
                    "       HOST PORT CLIENT_ID SUBJECT COUNT\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static host_transport_t host;
    static perch_client_t client;
    static perch_config_t config;
    static perch_name_t names[NAMES_MAX];
    static uint8_t name_bytes[PERCH_NAME_BYTES(NAMES_MAX, NAME_BYTES_MAX)];
    static perch_outgoing_t outgoing[OUTGOING_MAX];
    static uint8_t buf[PERCH_FRAME_BYTES_MAX + PERCH_DEVICE_OVERHEAD_BYTES_MAX];
    static perch_keyring_t keyring_storage;
    perch_keyring_t *keyring = NULL;
    perch_transport_t transport;
    sub_state_t state;
    int kind = HOST_UDP;
    uint32_t timeout_ms = 60000;
    uint32_t wake_ms = 1000;
    uint32_t start_ms;
    uint32_t wake_at_ms = 0;
    unsigned qos = 1;
    int arg = 1;
    int was_asleep = 0;

    memset(&state, 0, sizeof state);
    while (arg < argc && strncmp(argv[arg], "--", 2) == 0) {
        if (arg + 1 >= argc) {
            usage();
        }
        if (strcmp(argv[arg], "--transport") == 0) {
            kind = host_kind_from_name(argv[arg + 1]);
        } else if (strcmp(argv[arg], "--timeout-ms") == 0) {
            timeout_ms = (uint32_t)strtoul(argv[arg + 1], NULL, 10);
        } else if (strcmp(argv[arg], "--qos") == 0) {
            qos = (unsigned)strtoul(argv[arg + 1], NULL, 10);
        } else if (strcmp(argv[arg], "--reply") == 0) {
            state.reply = argv[arg + 1];
        } else if (strcmp(argv[arg], "--sleep-s") == 0) {
            state.sleep_s = (uint32_t)strtoul(argv[arg + 1], NULL, 10);
        } else if (strcmp(argv[arg], "--wake-ms") == 0) {
            wake_ms = (uint32_t)strtoul(argv[arg + 1], NULL, 10);
        } else {
            usage();
        }
        arg += 2;
    }
    if (kind < 0 || argc - arg != 5 || qos > 1) {
        usage();
    }
    state.filter = argv[arg + 3];
    state.count = (unsigned)strtoul(argv[arg + 4], NULL, 10);
    if (host_open(&host, (host_kind_t)kind, argv[arg], argv[arg + 1], &transport) != 0) {
        return 1;
    }
    perch_config_init(&config, argv[arg + 2]);
    config.keepalive_s = 30;
    config.reconnect_backoff_min_ms = 200;
    config.reconnect_backoff_max_ms = 2000;
    config.names = names;
    config.names_max = NAMES_MAX;
    config.name_bytes = name_bytes;
    config.name_bytes_max = NAME_BYTES_MAX;
    config.outgoing = outgoing;
    config.outgoing_max = OUTGOING_MAX;
    switch (host_keyring_from_env(&keyring_storage)) {
    case 1:
        keyring = &keyring_storage; /* PERCH_KEY_FILE: every frame sealed */
        break;
    case 0:
        break;
    default:
        fprintf(stderr, "PERCH_KEY_FILE: not a file of 64 hex digits\n");
        return 2;
    }
    if (perch_client_init(&client, &config) != PERCH_OK) {
        fprintf(stderr, "bad client configuration (client id 1..64 bytes?)\n");
        return 2;
    }
    start_ms = host_now_ms();
    perch_connect(&client, start_ms);
    if (perch_subscribe(&client, (const uint8_t *)state.filter, strlen(state.filter),
                        (uint8_t)qos, start_ms, NULL) != PERCH_OK) {
        fprintf(stderr, "filter too long\n");
        return 2;
    }
    while (state.received < state.count) {
        uint32_t now_ms = host_now_ms();
        int rc;
        if (state.failed || state.closed) {
            return 1;
        }
        if ((uint32_t)(now_ms - start_ms) >= timeout_ms) {
            fprintf(stderr, "timed out after %u of %u messages\n", state.received, state.count);
            return 1;
        }
        if (state.asleep && !was_asleep) {
            wake_at_ms = now_ms + wake_ms;
        }
        was_asleep = state.asleep;
        if (state.asleep && (int32_t)(now_ms - wake_at_ms) >= 0) {
            /* A real device would power the radio up here. */
            state.asleep = 0;
            was_asleep = 0;
            fprintf(stderr, "waking\n");
            if (perch_wake(&client, now_ms) != PERCH_OK) {
                fprintf(stderr, "cannot wake now\n");
            }
        }
        rc = host_run(&client, keyring, &transport, buf, sizeof buf, 50, on_event, &state);
        if (rc < 0) {
            fprintf(stderr, "transport failed\n");
            return 1;
        }
    }
    /* Replies still queued go out before the goodbye. */
    start_ms = host_now_ms();
    while (perch_pending_publishes(&client) > 0 && host_now_ms() - start_ms < 1000u) {
        (void)host_run(&client, keyring, &transport, buf, sizeof buf, 20, NULL, NULL);
    }
    perch_disconnect(&client, host_now_ms());
    (void)host_run(&client, keyring, &transport, buf, sizeof buf, 1000, on_event, &state);
    return 0;
}
