/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sensor_pub — publishes PAYLOAD COUNT times on one session and exits 0 only
 * if every publish was sent (and, for QoS 1, acknowledged OK).
 *
 *   sensor_pub [options] HOST PORT CLIENT_ID SUBJECT PAYLOAD COUNT [QOS]
 *
 * SUBJECT "#N" is the predefined topic id N. QOS is 0 (default), 1, or 3: the
 * connectionless publish (a predefined id, no session, never answered).
 * "{n}" in PAYLOAD becomes the publish's number, 1..COUNT.
 *
 * Options (before the positional arguments):
 *   --transport udp|tcp|serial  udp by default; serial: HOST is the tty's
 *                               path and PORT its baud rate
 *   --interval-ms N             wait N ms between publishes (default 0)
 *   --timeout-ms N              give up after N ms (default 30000)
 *   --retry-ms N                first retransmission timeout (default 1000)
 *   --keepalive-s N             keepalive (default 30)
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"
#include "perch_device.h"

#define OUTGOING_MAX 16u
#define NAMES_MAX 4u
#define NAME_BYTES_MAX 128u
#define PAYLOAD_BYTES_MAX 900u

typedef struct pub_state {
    unsigned acked;
    unsigned failed;
    int closed;
} pub_state_t;

static int on_event(void *context, perch_client_t *client, const perch_event_t *event)
{
    pub_state_t *state = context;
    (void)client;
    switch (event->type) {
    case PERCH_EVENT_CONNECTED:
        fprintf(stderr, "connected (session_present=%u)\n", event->detail);
        return 1;
    case PERCH_EVENT_PUBLISH_ACKED:
        state->acked++;
        return 1;
    case PERCH_EVENT_PUBLISH_FAILED:
        state->failed++;
        fprintf(stderr, "publish %u refused: code %u\n", (unsigned)event->id, event->code);
        return 1;
    case PERCH_EVENT_ERROR:
        fprintf(stderr, "broker ERROR code %u for type %u id %u\n", event->code, event->detail,
                (unsigned)event->id);
        return 0;
    case PERCH_EVENT_DISCONNECTED:
        fprintf(stderr, "disconnected (reason %u, code %u)\n", event->detail, event->code);
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
    fprintf(stderr, "usage: sensor_pub [--transport udp|tcp|serial] [--interval-ms N] "
                    "[--timeout-ms N] [--retry-ms N] [--keepalive-s N]\n"
                    "       HOST PORT CLIENT_ID SUBJECT PAYLOAD COUNT [QOS]\n");
    exit(2);
}

/* PAYLOAD with "{n}" replaced by `number`; returns the length. */
static size_t render(const char *pattern, unsigned number, uint8_t *out, size_t cap)
{
    const char *mark = strstr(pattern, "{n}");
    int n;
    if (mark == NULL) {
        n = snprintf((char *)out, cap, "%s", pattern);
    } else {
        n = snprintf((char *)out, cap, "%.*s%u%s", (int)(mark - pattern), pattern, number,
                     mark + 3);
    }
    if (n < 0 || (size_t)n >= cap) {
        fprintf(stderr, "payload too large\n");
        exit(2);
    }
    return (size_t)n;
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
    /* Each publish's payload stays put until it has left the client's queue
     * (acknowledged, for QoS 1): one buffer per publish (host code may
     * allocate; firmware would keep its readings in its own buffers). */
    uint8_t *payloads;
    size_t payload_cap;
    perch_transport_t transport;
    pub_state_t state = {0, 0, 0};
    int kind = HOST_UDP;
    uint32_t interval_ms = 0;
    uint32_t timeout_ms = 30000;
    uint32_t retry_ms = 1000;
    uint32_t keepalive_s = 30;
    const char *subject;
    const char *pattern;
    unsigned count;
    unsigned qos = 0;
    unsigned published = 0;
    uint32_t start_ms;
    uint32_t next_publish_ms;
    int arg = 1;
    int predefined;
    uint32_t topic_id = 0;

    while (arg < argc && strncmp(argv[arg], "--", 2) == 0) {
        if (arg + 1 >= argc) {
            usage();
        }
        if (strcmp(argv[arg], "--transport") == 0) {
            kind = host_kind_from_name(argv[arg + 1]);
        } else if (strcmp(argv[arg], "--interval-ms") == 0) {
            interval_ms = (uint32_t)strtoul(argv[arg + 1], NULL, 10);
        } else if (strcmp(argv[arg], "--timeout-ms") == 0) {
            timeout_ms = (uint32_t)strtoul(argv[arg + 1], NULL, 10);
        } else if (strcmp(argv[arg], "--retry-ms") == 0) {
            retry_ms = (uint32_t)strtoul(argv[arg + 1], NULL, 10);
        } else if (strcmp(argv[arg], "--keepalive-s") == 0) {
            keepalive_s = (uint32_t)strtoul(argv[arg + 1], NULL, 10);
        } else {
            usage();
        }
        arg += 2;
    }
    if (kind < 0 || argc - arg < 6 || argc - arg > 7) {
        usage();
    }
    subject = argv[arg + 3];
    pattern = argv[arg + 4];
    count = (unsigned)strtoul(argv[arg + 5], NULL, 10);
    if (argc - arg == 7) {
        qos = (unsigned)strtoul(argv[arg + 6], NULL, 10);
    }
    predefined = subject[0] == '#';
    if (predefined) {
        topic_id = (uint32_t)strtoul(subject + 1, NULL, 10);
    }
    if ((qos != 0 && qos != 1 && qos != 3) || (qos == 3 && !predefined)) {
        fprintf(stderr, "QOS is 0, 1 or 3 (3 needs a predefined SUBJECT #N)\n");
        return 2;
    }
    payload_cap = strlen(pattern) + 12;
    if (payload_cap > PAYLOAD_BYTES_MAX) {
        fprintf(stderr, "payload too large\n");
        return 2;
    }
    payloads = calloc(count ? count : 1, payload_cap);
    if (payloads == NULL) {
        perror("calloc");
        return 1;
    }
    if (host_open(&host, (host_kind_t)kind, argv[arg], argv[arg + 1], &transport) != 0) {
        return 1;
    }

    if (qos == 3) {
        /* Connectionless: no session, nothing comes back. */
        for (published = 0; published < count; published++) {
            size_t len = render(pattern, published + 1, payloads, payload_cap);
            const char *id = argv[arg + 2];
            int32_t n = perch_encode_connectionless((const uint8_t *)id, strlen(id), topic_id,
                                                    payloads, len, buf, sizeof buf);
            if (n < 0 || transport.send(transport.context, buf, (size_t)n) != 0) {
                fprintf(stderr, "connectionless publish failed (%d)\n", (int)n);
                return 1;
            }
            if (interval_ms) {
                host_sleep_ms(interval_ms);
            }
        }
        fprintf(stderr, "sent %u connectionless\n", published);
        return 0;
    }

    perch_config_init(&config, argv[arg + 2]);
    config.keepalive_s = keepalive_s;
    config.retry_interval_ms = retry_ms;
    config.retries_max = 5;
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
    next_publish_ms = start_ms;
    perch_connect(&client, start_ms);
    for (;;) {
        uint32_t now_ms = host_now_ms();
        uint32_t slice_ms = 50;
        int rc;
        while (published < count && (int32_t)(now_ms - next_publish_ms) >= 0) {
            uint8_t *payload = payloads + (size_t)published * payload_cap;
            size_t len = render(pattern, published + 1, payload, payload_cap);
            perch_status_t status;
            if (predefined) {
                status = perch_publish_id(&client, 1, topic_id, payload, len, (uint8_t)qos,
                                          now_ms, NULL);
            } else {
                status = perch_publish(&client, (const uint8_t *)subject, strlen(subject),
                                       payload, len, (uint8_t)qos, now_ms, NULL);
            }
            if (status == PERCH_ERR_INFLIGHT_FULL) {
                break;
            }
            if (status != PERCH_OK) {
                fprintf(stderr, "publish refused locally: %d\n", (int)status);
                return 1;
            }
            published++;
            next_publish_ms = now_ms + interval_ms;
        }
        if (published == count && perch_pending_publishes(&client) == 0) {
            break;
        }
        if (state.closed) {
            fprintf(stderr, "the broker refused the session for good\n");
            return 1;
        }
        if ((uint32_t)(now_ms - start_ms) >= timeout_ms) {
            fprintf(stderr, "timed out: %u of %u published, %u acked, %u pending\n", published,
                    count, state.acked, perch_pending_publishes(&client));
            return 1;
        }
        if (interval_ms && published < count) {
            uint32_t until_ms = next_publish_ms - now_ms;
            if ((int32_t)until_ms > 0 && until_ms < slice_ms) {
                slice_ms = until_ms;
            }
        }
        rc = host_run(&client, keyring, &transport, buf, sizeof buf, slice_ms, on_event, &state);
        if (rc < 0) {
            fprintf(stderr, "transport failed\n");
            return 1;
        }
    }
    perch_disconnect(&client, host_now_ms());
    (void)host_run(&client, keyring, &transport, buf, sizeof buf, 1000, on_event, &state);
    fprintf(stderr, "published %u, acked %u, refused %u, reconnects %u\n", published,
            state.acked, state.failed, (unsigned)client.stats.connections_lost);
    free(payloads);
    if (state.failed != 0 || (qos == 1 && state.acked != count)) {
        return 1;
    }
    return 0;
}
