/* SPDX-License-Identifier: Apache-2.0 */
/*
 * test_client.c — the sans-IO client driven in memory on a virtual clock,
 * quinn-style: bytes in (the broker's frames, as hex, mostly the spec's own
 * examples), frames out (compared as hex), events polled. Scripted cases for
 * each behaviour, then a lossy, duplicating link to a small fake broker, and a
 * random drive under the sanitizers.
 */
#include <stdlib.h>
#include <string.h>

#include "test.h"

#define SIM_NAMES 4u
#define SIM_NAME_BYTES 32u
#define SIM_OUTGOING 4u
#define SIM_EVENTS 128u

typedef struct sim {
    perch_client_t client;
    perch_config_t config;
    perch_name_t names[SIM_NAMES];
    uint8_t name_bytes[PERCH_NAME_BYTES(SIM_NAMES, SIM_NAME_BYTES)];
    perch_outgoing_t outgoing[SIM_OUTGOING];
    uint32_t now;
    uint8_t rx[PERCH_FRAME_BYTES_MAX];
    perch_event_t events[SIM_EVENTS];
    char payloads[SIM_EVENTS][64];
    char subjects[SIM_EVENTS][64];
    unsigned events_count;
    unsigned events_read;
} sim_t;

static sim_t sims[2];

static void collect(sim_t *s)
{
    perch_event_t ev;
    while (perch_poll_event(&s->client, &ev)) {
        unsigned i = s->events_count;
        if (i == SIM_EVENTS) {
            CHECK(!"too many events");
            return;
        }
        s->events[i] = ev;
        if (ev.type == PERCH_EVENT_MESSAGE) {
            snprintf(s->payloads[i], sizeof s->payloads[i], "%.*s", (int)ev.payload_len,
                     (const char *)ev.payload);
            snprintf(s->subjects[i], sizeof s->subjects[i], "%.*s", (int)ev.subject_len,
                     ev.subject ? (const char *)ev.subject : "");
        }
        s->events_count++;
    }
}

static void default_config(perch_config_t *config)
{
    (void)config;
}

static sim_t *sim_new(int which, void (*tweak)(perch_config_t *))
{
    sim_t *s = &sims[which];
    memset(s, 0, sizeof *s);
    perch_config_init(&s->config, "dev1");
    s->config.keepalive_s = 0;
    s->config.names = s->names;
    s->config.names_max = SIM_NAMES;
    s->config.name_bytes = s->name_bytes;
    s->config.name_bytes_max = SIM_NAME_BYTES;
    s->config.outgoing = s->outgoing;
    s->config.outgoing_max = SIM_OUTGOING;
    (tweak ? tweak : default_config)(&s->config);
    CHECK_EQ(perch_client_init(&s->client, &s->config), PERCH_OK);
    s->now = 1000;
    return s;
}

static void expect_tx(sim_t *s, const char *hex, int line)
{
    uint8_t got[PERCH_FRAME_BYTES_MAX];
    uint8_t want[PERCH_FRAME_BYTES_MAX];
    size_t want_len = hex ? hex_to_bytes(hex, want, sizeof want) : 0;
    size_t len = perch_poll_transmit(&s->client, got, sizeof got);
    collect(s);
    if (len != want_len || memcmp(got, want, len) != 0) {
        char got_hex[2 * PERCH_FRAME_BYTES_MAX + 1];
        char message[2 * PERCH_FRAME_BYTES_MAX + 64];
        bytes_to_hex(got, len, got_hex, sizeof got_hex);
        snprintf(message, sizeof message, "sent [%s], want [%s]", got_hex, hex ? hex : "");
        test_failed(__FILE__, line, message);
    }
}
#define EXPECT_TX(s, hex) expect_tx((s), (hex), __LINE__)
#define EXPECT_NO_TX(s) expect_tx((s), NULL, __LINE__)

/* One frame from the broker, at the current time; events are polled. */
static void rx(sim_t *s, const char *hex)
{
    size_t len = hex_to_bytes(hex, s->rx, sizeof s->rx);
    CHECK_EQ(perch_handle_input(&s->client, s->rx, len, s->now), PERCH_OK);
    collect(s);
}

/* The same without polling events (the application is busy). */
static void rx_unpolled(sim_t *s, const char *hex)
{
    static uint8_t buffers[8][64];
    static unsigned next;
    uint8_t *buf = buffers[next++ % 8];
    size_t len = hex_to_bytes(hex, buf, 64);
    CHECK_EQ(perch_handle_input(&s->client, buf, len, s->now), PERCH_OK);
}

static void wait_ms(sim_t *s, uint32_t ms)
{
    s->now += ms;
    perch_handle_timeout(&s->client, s->now);
    collect(s);
}

static void expect_event(sim_t *s, uint8_t type, uint8_t code, uint8_t detail, uint32_t id,
                         int line)
{
    const perch_event_t *ev;
    char message[160];
    if (s->events_read == s->events_count) {
        snprintf(message, sizeof message, "no event, want type %u", type);
        test_failed(__FILE__, line, message);
        return;
    }
    ev = &s->events[s->events_read++];
    if (ev->type != type || ev->code != code || ev->detail != detail || ev->id != id) {
        snprintf(message, sizeof message,
                 "event type %u code %u detail %u id %u, want %u %u %u %u", ev->type, ev->code,
                 ev->detail, (unsigned)ev->id, type, code, detail, (unsigned)id);
        test_failed(__FILE__, line, message);
    }
}
#define EXPECT_EVENT(s, type, code, detail, id) \
    expect_event((s), (type), (code), (detail), (id), __LINE__)
#define EXPECT_NO_EVENT(s) CHECK_EQ((s)->events_count - (s)->events_read, 0)
#define LAST_PAYLOAD(s) ((s)->payloads[(s)->events_read - 1])
#define LAST_SUBJECT(s) ((s)->subjects[(s)->events_read - 1])

static uint32_t deadline(sim_t *s)
{
    uint32_t at = 0;
    return perch_poll_timeout(&s->client, &at) ? at - s->now : 0xFFFFFFFFu;
}
#define NO_DEADLINE 0xFFFFFFFFu

static const uint8_t *bytes(const char *text)
{
    return (const uint8_t *)text;
}

/* CONNECT (clean, keepalive 0, "dev1"), CONNACK OK token 0x12345678. */
static void sim_connect(sim_t *s)
{
    perch_connect(&s->client, s->now);
    EXPECT_TX(s, "11 01 00 04 64 65 76 31");
    rx(s, "20 00 78 56 34 12");
    EXPECT_EVENT(s, PERCH_EVENT_CONNECTED, 0, 0, 0);
    CHECK(perch_is_connected(&s->client));
}

/* --------------------------------------------------------------- cases */

static void registers_then_publishes_qos1_and_qos0(void)
{
    sim_t *s = sim_new(0, NULL);
    uint32_t msg_id = 0;
    sim_connect(s);
    CHECK_EQ(perch_publish(&s->client, bytes("sensors.temp"), 12, bytes("21.5"), 4, 1, s->now,
                           &msg_id),
             PERCH_OK);
    CHECK_EQ(msg_id, 1);
    EXPECT_TX(s, "50 01 73 65 6e 73 6f 72 73 2e 74 65 6d 70"); /* spec: REGISTER */
    EXPECT_NO_TX(s);                                              /* waits for REGACK */
    rx(s, "60 01 05 00");                                         /* spec: REGACK topic 5 */
    EXPECT_TX(s, "31 05 01 32 31 2e 35");                         /* spec: PUBLISH QoS 1 */
    EXPECT_NO_TX(s);
    CHECK_EQ(perch_pending_publishes(&s->client), 1);
    rx(s, "40 01 00"); /* spec: PUBACK */
    EXPECT_EVENT(s, PERCH_EVENT_PUBLISH_ACKED, 0, 0, 1);
    CHECK_EQ(perch_pending_publishes(&s->client), 0);
    rx(s, "40 01 00"); /* a duplicate PUBACK changes nothing */
    EXPECT_NO_EVENT(s);
    CHECK_EQ(perch_publish(&s->client, bytes("sensors.temp"), 12, bytes("21.5"), 4, 0, s->now,
                           &msg_id),
             PERCH_OK);
    CHECK_EQ(msg_id, 0);
    EXPECT_TX(s, "30 05 32 31 2e 35"); /* spec: the 6-byte publish, no REGISTER again */
    CHECK_EQ(perch_pending_publishes(&s->client), 0);
    CHECK_EQ(perch_publish_id(&s->client, 1, 1, bytes("\x01\x2c"), 2, 0, s->now, NULL),
             PERCH_OK);
    EXPECT_TX(s, "34 01 01 2c"); /* spec: predefined topic 1 */
    EXPECT_NO_TX(s);
}

static void few_retries(perch_config_t *config)
{
    config->retries_max = 2;
    config->reconnect_backoff_min_ms = 500;
    config->reconnect_backoff_max_ms = 1500;
}

static void qos1_retries_keep_the_msg_id_back_off_then_reconnect(void)
{
    sim_t *s = sim_new(0, few_retries);
    sim_connect(s);
    CHECK_EQ(perch_publish_id(&s->client, 1, 1, bytes("x"), 1, 1, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "35 01 01 78");
    CHECK_EQ(deadline(s), 1000);
    wait_ms(s, 999);
    EXPECT_NO_TX(s);
    wait_ms(s, 1);
    EXPECT_TX(s, "35 01 01 78"); /* the same msg id */
    CHECK_EQ(deadline(s), 2000); /* backoff doubles */
    wait_ms(s, 2000);
    EXPECT_TX(s, "35 01 01 78");
    CHECK_EQ(deadline(s), 4000);
    wait_ms(s, 4000); /* retries_max 2: three sends, then the connection is lost */
    EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, 0, PERCH_REASON_TIMEOUT, 0);
    EXPECT_NO_TX(s);
    CHECK(!perch_is_connected(&s->client));
    CHECK_EQ(deadline(s), 500);
    wait_ms(s, 500);
    EXPECT_TX(s, "10 01 00 04 64 65 76 31"); /* reconnects never clean */
    rx(s, "21 00 78 56 34 12");              /* session present */
    EXPECT_EVENT(s, PERCH_EVENT_CONNECTED, 0, 1, 0);
    EXPECT_TX(s, "35 01 01 78"); /* pending publishes go again, same id */
    rx(s, "40 01 00");
    EXPECT_EVENT(s, PERCH_EVENT_PUBLISH_ACKED, 0, 0, 1);
    CHECK_EQ(s->client.stats.connections_lost, 1);
}

static void reconnect_backoff_doubles_up_to_its_max(void)
{
    sim_t *s = sim_new(0, few_retries);
    static const uint32_t backoffs[] = {500, 1000, 1500, 1500};
    size_t i;
    perch_connect(&s->client, s->now);
    for (i = 0; i < sizeof backoffs / sizeof backoffs[0]; i++) {
        EXPECT_TX(s, i == 0 ? "11 01 00 04 64 65 76 31" : "11 01 00 04 64 65 76 31");
        wait_ms(s, 1000);
        EXPECT_TX(s, "11 01 00 04 64 65 76 31");
        wait_ms(s, 2000);
        EXPECT_TX(s, "11 01 00 04 64 65 76 31");
        wait_ms(s, 4000);
        EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, 0, PERCH_REASON_TIMEOUT, 0);
        CHECK_EQ(deadline(s), backoffs[i]);
        wait_ms(s, backoffs[i]);
    }
    /* Never connected: the CONNECT stays clean. */
    EXPECT_TX(s, "11 01 00 04 64 65 76 31");
}

static void unknown_session_resumes_or_connects_again(void)
{
    sim_t *s = sim_new(0, NULL);
    sim_connect(s);
    CHECK_EQ(perch_session_token(&s->client), 0x12345678u);
    CHECK_EQ(perch_publish_id(&s->client, 1, 1, bytes("x"), 1, 1, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "35 01 01 78");
    rx(s, "f0 05 03 00");             /* ERROR UNKNOWN_SESSION: NAT rebinding */
    EXPECT_TX(s, "e0 78 56 34 12");   /* spec: RESUME */
    rx(s, "21 00 78 56 34 12");       /* the session moved here */
    EXPECT_EVENT(s, PERCH_EVENT_CONNECTED, 0, 1, 0);
    EXPECT_TX(s, "35 01 01 78");
    rx(s, "f0 05 03 00");             /* the broker restarted: no such session */
    EXPECT_TX(s, "e0 78 56 34 12");
    rx(s, "20 05 00 00 00 00");       /* CONNACK UNKNOWN_SESSION to the RESUME */
    EXPECT_TX(s, "10 01 00 04 64 65 76 31");
    rx(s, "20 00 9a 00 00 00");
    EXPECT_EVENT(s, PERCH_EVENT_CONNECTED, 0, 0, 0);
    EXPECT_TX(s, "35 01 01 78");
    CHECK_EQ(perch_session_token(&s->client), 0x9a);
    perch_resume(&s->client, s->now); /* the application saw the address change */
    EXPECT_TX(s, "e0 9a 00 00 00");
    rx(s, "f0 01 03 09"); /* spec: ERROR UNKNOWN_TOPIC, another code: an event */
    EXPECT_EVENT(s, PERCH_EVENT_ERROR, PERCH_CODE_UNKNOWN_TOPIC, PERCH_TYPE_PUBLISH, 9);
}

static void a_new_session_registers_and_subscribes_again(void)
{
    sim_t *s = sim_new(0, few_retries);
    uint32_t req_id = 0;
    sim_connect(s);
    CHECK_EQ(perch_subscribe(&s->client, bytes("dev1.cmd.>"), 10, 1, s->now, &req_id), PERCH_OK);
    CHECK_EQ(req_id, 1);
    EXPECT_TX(s, "71 01 64 65 76 31 2e 63 6d 64 2e 3e");
    rx(s, "80 01 00");
    EXPECT_EVENT(s, PERCH_EVENT_SUBSCRIBED, 0, 0, 1);
    CHECK_EQ(perch_publish(&s->client, bytes("t.a"), 3, bytes("1"), 1, 0, s->now, NULL),
             PERCH_OK);
    EXPECT_TX(s, "50 02 74 2e 61");
    rx(s, "60 02 07 00");
    EXPECT_TX(s, "30 07 31");
    rx(s, "50 09 64 65 76 31 2e 63 6d 64 2e 78"); /* the broker registers topic 9 */
    EXPECT_TX(s, "60 09 09 00");
    rx(s, "d0"); /* the broker ends the session */
    EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, 0, PERCH_REASON_BY_BROKER, 0);
    CHECK_EQ(perch_reply(&s->client, 3, bytes("ok"), 2, s->now), PERCH_OK);
    wait_ms(s, 500);
    EXPECT_TX(s, "10 01 00 04 64 65 76 31");
    rx(s, "20 00 11 00 00 00"); /* a new session: nothing kept */
    EXPECT_EVENT(s, PERCH_EVENT_PUBLISH_FAILED, PERCH_CODE_UNKNOWN_SESSION, 0, 0); /* reply */
    EXPECT_EVENT(s, PERCH_EVENT_CONNECTED, 0, 0, 0);
    EXPECT_TX(s, "71 03 64 65 76 31 2e 63 6d 64 2e 3e"); /* subscribed again */
    EXPECT_TX(s, "50 04 74 2e 61");                      /* registered again */
    EXPECT_NO_TX(s);
    rx(s, "80 03 00");
    EXPECT_EVENT(s, PERCH_EVENT_SUBSCRIBED, 0, 0, 3);
    rx(s, "60 04 0b 00");
    CHECK_EQ(perch_publish(&s->client, bytes("t.a"), 3, bytes("2"), 1, 0, s->now, NULL),
             PERCH_OK);
    EXPECT_TX(s, "30 0b 32");
    rx(s, "30 09 61"); /* the broker's old topic 9 was forgotten */
    EXPECT_NO_EVENT(s);
    CHECK_EQ(s->client.stats.messages_dropped, 1);
}

static void messages_acks_duplicates_and_replies(void)
{
    sim_t *s = sim_new(0, NULL);
    sim_connect(s);
    CHECK_EQ(perch_subscribe(&s->client, bytes("dev1.cmd.>"), 10, 1, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "71 01 64 65 76 31 2e 63 6d 64 2e 3e");
    rx(s, "80 01 00");
    EXPECT_EVENT(s, PERCH_EVENT_SUBSCRIBED, 0, 0, 1);
    rx(s, "50 06 64 65 76 31 2e 63 6d 64 2e 72 65 62 6f 6f 74"); /* spec: broker REGISTER */
    EXPECT_TX(s, "60 06 06 00");                                 /* spec: the device's REGACK */
    rx(s, "39 06 03 01 6e 6f 77"); /* spec: a request, QoS 1, reply handle 3 */
    EXPECT_EVENT(s, PERCH_EVENT_MESSAGE, 0, PERCH_FLAG_REPLY, 6);
    CHECK(strcmp(LAST_PAYLOAD(s), "now") == 0);
    CHECK(strcmp(LAST_SUBJECT(s), "dev1.cmd.reboot") == 0);
    CHECK_EQ(s->events[s->events_read - 1].reply_handle, 3);
    EXPECT_TX(s, "40 01 00"); /* spec: the device's PUBACK */
    CHECK_EQ(perch_reply(&s->client, 3, bytes("ok"), 2, s->now), PERCH_OK);
    EXPECT_TX(s, "38 03 6f 6b"); /* spec: the reply */
    rx(s, "39 06 03 01 6e 6f 77"); /* a retransmission: acked, not delivered again */
    EXPECT_NO_EVENT(s);
    EXPECT_TX(s, "40 01 00");
    CHECK_EQ(s->client.stats.duplicates, 1);
    rx(s, "34 01 01 2c"); /* a predefined id: no subject */
    EXPECT_EVENT(s, PERCH_EVENT_MESSAGE, 0, PERCH_FLAG_PREDEFINED, 1);
    CHECK_EQ(s->events[s->events_read - 1].subject == NULL, 1);
    CHECK_EQ(s->events[s->events_read - 1].payload_len, 2);
    rx(s, "31 63 05 78"); /* QoS 1 on an unknown topic: refused */
    EXPECT_NO_EVENT(s);
    EXPECT_TX(s, "40 05 01");
    rx(s, "30 63 78"); /* QoS 0 on an unknown topic: dropped, counted */
    EXPECT_NO_EVENT(s);
    CHECK_EQ(s->client.stats.messages_dropped, 1);
    CHECK_EQ(perch_handle_input(&s->client, bytes("\x00\x01"), 2, s->now), PERCH_ERR_MALFORMED);
    CHECK_EQ(perch_handle_input(&s->client, bytes("\xb0"), 1, s->now), PERCH_ERR_MALFORMED);
    CHECK_EQ(s->client.stats.malformed_frames, 2);
}

static void an_unpolled_message_holds_the_next_one(void)
{
    sim_t *s = sim_new(0, NULL);
    sim_connect(s);
    rx_unpolled(s, "34 01 61");  /* QoS 0, predefined: "a" */
    rx_unpolled(s, "34 01 62");  /* no room: dropped */
    rx_unpolled(s, "35 01 07 63"); /* QoS 1, no room: left unacknowledged */
    CHECK_EQ(s->client.stats.messages_dropped, 1);
    EXPECT_NO_TX(s); /* polls the events too: the "a" message */
    EXPECT_EVENT(s, PERCH_EVENT_MESSAGE, 0, PERCH_FLAG_PREDEFINED, 1);
    CHECK(strcmp(LAST_PAYLOAD(s), "a") == 0);
    rx(s, "35 01 07 63"); /* the broker's retransmission now fits */
    EXPECT_EVENT(s, PERCH_EVENT_MESSAGE, 0, PERCH_FLAG_PREDEFINED, 1);
    CHECK(strcmp(LAST_PAYLOAD(s), "c") == 0);
    EXPECT_TX(s, "40 07 00");
}

static void sleeps_wakes_and_collects_buffered_messages(void)
{
    sim_t *s = sim_new(0, NULL);
    sim_connect(s);
    CHECK_EQ(perch_wake(&s->client, s->now), PERCH_ERR_NOT_CONNECTED);
    CHECK_EQ(perch_subscribe(&s->client, bytes("cmd"), 3, 0, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "70 01 63 6d 64");
    rx(s, "80 01 00");
    EXPECT_EVENT(s, PERCH_EVENT_SUBSCRIBED, 0, 0, 1);
    CHECK_EQ(perch_sleep(&s->client, 600, s->now), PERCH_OK);
    EXPECT_TX(s, "d1 d8 04"); /* spec: DISCONNECT, sleep 600 s */
    wait_ms(s, 1000);
    EXPECT_TX(s, "d1 d8 04"); /* unanswered: sent again */
    rx(s, "d0");              /* spec: the broker's DISCONNECT confirms */
    EXPECT_EVENT(s, PERCH_EVENT_ASLEEP, 0, 0, 0);
    CHECK_EQ(deadline(s), NO_DEADLINE); /* no timers while asleep */
    rx(s, "d0");                        /* a duplicate confirmation changes nothing */
    EXPECT_NO_EVENT(s);
    wait_ms(s, 300000);
    EXPECT_NO_TX(s);
    CHECK_EQ(perch_sleep(&s->client, 600, s->now), PERCH_ERR_NOT_CONNECTED);
    CHECK_EQ(perch_wake(&s->client, s->now), PERCH_OK);
    EXPECT_TX(s, "b0");              /* spec: PING wakes the session */
    rx(s, "50 02 63 6d 64");         /* buffered: the broker registers "cmd" */
    EXPECT_TX(s, "60 02 02 00");
    rx(s, "30 02 61");
    EXPECT_EVENT(s, PERCH_EVENT_MESSAGE, 0, 0, 2);
    CHECK(strcmp(LAST_SUBJECT(s), "cmd") == 0);
    rx(s, "c0"); /* spec: PONG ends the wake */
    EXPECT_EVENT(s, PERCH_EVENT_WAKE_DONE, 0, 0, 0);
    CHECK_EQ(deadline(s), NO_DEADLINE);
    rx(s, "30 02 62"); /* released after the PONG (held for the REGACK): still heard */
    EXPECT_EVENT(s, PERCH_EVENT_MESSAGE, 0, 0, 2);
    CHECK(strcmp(LAST_PAYLOAD(s), "b") == 0);
    CHECK_EQ(perch_wake(&s->client, s->now), PERCH_OK);
    EXPECT_TX(s, "b0");
    wait_ms(s, 1000);
    EXPECT_TX(s, "b0"); /* an unanswered wake PING is retried */
    rx(s, "c0");
    EXPECT_EVENT(s, PERCH_EVENT_WAKE_DONE, 0, 0, 0);
    perch_connect(&s->client, s->now); /* ends sleeping for good */
    EXPECT_TX(s, "10 01 00 04 64 65 76 31");
    rx(s, "21 00 78 56 34 12");
    EXPECT_EVENT(s, PERCH_EVENT_CONNECTED, 0, 1, 0);
    CHECK(perch_is_connected(&s->client));
}

static void keepalive_60(perch_config_t *config)
{
    config->keepalive_s = 60;
    config->retries_max = 1;
}

static void keepalive_pings_when_idle(void)
{
    sim_t *s = sim_new(0, keepalive_60);
    perch_connect(&s->client, s->now);
    EXPECT_TX(s, "11 01 3c 04 64 65 76 31"); /* spec: keepalive 60 s */
    rx(s, "20 00 78 56 34 12");
    EXPECT_EVENT(s, PERCH_EVENT_CONNECTED, 0, 0, 0);
    CHECK_EQ(deadline(s), 60000);
    wait_ms(s, 59999);
    EXPECT_NO_TX(s);
    wait_ms(s, 1);
    EXPECT_TX(s, "b0");
    rx(s, "c0");
    EXPECT_NO_EVENT(s);
    CHECK_EQ(deadline(s), 60000);
    wait_ms(s, 30000);
    CHECK_EQ(perch_publish_id(&s->client, 1, 1, bytes("x"), 1, 0, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "34 01 78"); /* any frame counts as a sign of life */
    CHECK_EQ(deadline(s), 60000);
    wait_ms(s, 60000);
    EXPECT_TX(s, "b0");
    wait_ms(s, 1000);
    EXPECT_TX(s, "b0"); /* unanswered: retried */
    wait_ms(s, 2000);
    EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, 0, PERCH_REASON_TIMEOUT, 0);
}

static void refused_connacks(void)
{
    sim_t *s = sim_new(0, few_retries);
    perch_connect(&s->client, s->now);
    EXPECT_TX(s, "11 01 00 04 64 65 76 31");
    rx(s, "20 09 00 00 00 00"); /* NO_RESOURCES: retried after the backoff */
    EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, PERCH_CODE_NO_RESOURCES, PERCH_REASON_REFUSED, 0);
    CHECK_EQ(deadline(s), 500);
    wait_ms(s, 500);
    EXPECT_TX(s, "11 01 00 04 64 65 76 31");
    rx(s, "20 02 00 00 00 00"); /* NOT_PERMITTED: final */
    EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, PERCH_CODE_NOT_PERMITTED, PERCH_REASON_REFUSED, 0);
    CHECK_EQ(deadline(s), NO_DEADLINE);
    wait_ms(s, 100000);
    EXPECT_NO_TX(s);
    CHECK_EQ(perch_publish_id(&s->client, 1, 1, bytes("x"), 1, 0, s->now, NULL),
             PERCH_ERR_NOT_CONNECTED);
    perch_connect(&s->client, s->now); /* the application may try again */
    EXPECT_TX(s, "11 01 00 04 64 65 76 31");
    rx(s, "20 07 00 00 00 00"); /* spec: UNSUPPORTED_VERSION, final too */
    EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, PERCH_CODE_UNSUPPORTED_VERSION,
                 PERCH_REASON_REFUSED, 0);
    EXPECT_NO_TX(s);
}

static void small_frames(perch_config_t *config)
{
    config->frame_bytes_max = 64;
}

static void calls_refused_without_side_effects(void)
{
    sim_t *s = sim_new(0, small_frames);
    static uint8_t big[100];
    perch_config_t bad;
    perch_client_t other;
    unsigned i;
    CHECK_EQ(perch_publish(&s->client, bytes("a"), 1, bytes("x"), 1, 0, s->now, NULL),
             PERCH_ERR_NOT_CONNECTED);
    sim_connect(s);
    CHECK_EQ(perch_publish(&s->client, bytes("a"), 1, bytes("x"), 1, 2, s->now, NULL),
             PERCH_ERR_INVALID);
    CHECK_EQ(perch_publish(&s->client, bytes("a"), 0, bytes("x"), 1, 0, s->now, NULL),
             PERCH_ERR_INVALID);
    CHECK_EQ(perch_publish(&s->client, bytes("a"), 1, big, 54, 0, s->now, NULL),
             PERCH_ERR_TOO_LARGE);
    CHECK_EQ(perch_publish(&s->client, big, SIM_NAME_BYTES + 1, bytes("x"), 1, 0, s->now, NULL),
             PERCH_ERR_TOO_LARGE);
    CHECK_EQ(perch_subscribe(&s->client, big, SIM_NAME_BYTES + 1, 0, s->now, NULL),
             PERCH_ERR_TOO_LARGE);
    CHECK_EQ(perch_subscribe(&s->client, bytes("f"), 1, 2, s->now, NULL), PERCH_ERR_INVALID);
    EXPECT_NO_TX(s);
    for (i = 0; i < SIM_NAMES; i++) {
        char subject[8];
        snprintf(subject, sizeof subject, "s%u", i);
        CHECK_EQ(perch_publish(&s->client, bytes(subject), 2, big, 53, 0, s->now, NULL),
                 PERCH_OK);
    }
    CHECK_EQ(perch_publish(&s->client, bytes("s9"), 2, bytes("x"), 1, 0, s->now, NULL),
             PERCH_ERR_INFLIGHT_FULL);
    CHECK_EQ(perch_subscribe(&s->client, bytes("f"), 1, 0, s->now, NULL), PERCH_ERR_NAMES_FULL);
    CHECK_EQ(perch_pending_publishes(&s->client), SIM_OUTGOING);
    /* Bad configurations. */
    bad = s->config;
    bad.outgoing_max = 0;
    CHECK_EQ(perch_client_init(&other, &bad), PERCH_ERR_INVALID);
    bad.outgoing_max = PERCH_DEDUP_WINDOW_MSG_IDS + 1;
    CHECK_EQ(perch_client_init(&other, &bad), PERCH_ERR_INVALID);
    bad = s->config;
    bad.client_id_len = 0;
    CHECK_EQ(perch_client_init(&other, &bad), PERCH_ERR_INVALID);
    bad = s->config;
    bad.name_bytes_max = 60; /* a REGISTER of it would not fit 64-byte frames */
    CHECK_EQ(perch_client_init(&other, &bad), PERCH_ERR_INVALID);
    bad = s->config;
    bad.retry_interval_ms = 0;
    CHECK_EQ(perch_client_init(&other, &bad), PERCH_ERR_INVALID);
    perch_config_init(&bad, "an-id-longer-than-sixty-four-bytes-is-refused-by-the-client-init-x");
    CHECK_EQ(bad.client_id_len, 65);
}

static void subscriptions_refused_dropped_and_retried(void)
{
    sim_t *s = sim_new(0, NULL);
    unsigned i;
    sim_connect(s);
    CHECK_EQ(perch_subscribe(&s->client, bytes("a"), 1, 0, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "70 01 61");
    rx(s, "80 01 08"); /* INVALID_SUBJECT: the subscription is dropped */
    EXPECT_EVENT(s, PERCH_EVENT_SUBSCRIBED, PERCH_CODE_INVALID_SUBJECT, 0, 1);
    CHECK_EQ(perch_subscribe(&s->client, bytes("b"), 1, 1, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "71 02 62");
    wait_ms(s, 1000);
    EXPECT_TX(s, "71 02 62"); /* no SUBACK: the same request again */
    rx(s, "80 02 00");
    EXPECT_EVENT(s, PERCH_EVENT_SUBSCRIBED, 0, 0, 2);
    CHECK_EQ(perch_subscribe(&s->client, bytes("b"), 1, 0, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "70 03 62"); /* the held filter, its QoS updated */
    rx(s, "80 03 00");
    EXPECT_EVENT(s, PERCH_EVENT_SUBSCRIBED, 0, 0, 3);
    CHECK_EQ(perch_unsubscribe(&s->client, bytes("b"), 1, s->now, NULL), PERCH_OK);
    EXPECT_TX(s, "90 04 62");
    rx(s, "a0 04 00");
    EXPECT_EVENT(s, PERCH_EVENT_UNSUBSCRIBED, 0, 0, 4);
    rx(s, "a0 04 00"); /* a duplicate: nothing */
    EXPECT_NO_EVENT(s);
    for (i = 0; i < SIM_NAMES; i++) { /* every slot is free again */
        char filter[4];
        snprintf(filter, sizeof filter, "f%u", i);
        CHECK_EQ(perch_subscribe(&s->client, bytes(filter), 2, 0, s->now, NULL), PERCH_OK);
    }
}

static void a_refused_registration_fails_its_publishes(void)
{
    sim_t *s = sim_new(0, NULL);
    uint32_t first = 0;
    uint32_t second = 0;
    sim_connect(s);
    CHECK_EQ(perch_publish(&s->client, bytes("bad.*"), 5, bytes("1"), 1, 1, s->now, &first),
             PERCH_OK);
    CHECK_EQ(perch_publish(&s->client, bytes("bad.*"), 5, bytes("2"), 1, 1, s->now, &second),
             PERCH_OK);
    EXPECT_TX(s, "50 01 62 61 64 2e 2a");
    EXPECT_NO_TX(s);
    rx(s, "60 01 00 08");
    EXPECT_EVENT(s, PERCH_EVENT_PUBLISH_FAILED, PERCH_CODE_INVALID_SUBJECT, 0, first);
    EXPECT_EVENT(s, PERCH_EVENT_PUBLISH_FAILED, PERCH_CODE_INVALID_SUBJECT, 0, second);
    CHECK_EQ(perch_pending_publishes(&s->client), 0);
    rx(s, "40 01 00"); /* no such publish any more */
    EXPECT_NO_EVENT(s);
}

/* The broker de-duplicates over the last 16 ids it accepted, so the ids in
 * flight span fewer than 8 (see MSG_ID_SPAN_MAX): else a long-unacknowledged
 * publish could slide out of the window and its retry be passed on twice. */
static void unacknowledged_msg_ids_span_fewer_than_8(void)
{
    sim_t *s = sim_new(0, NULL);
    uint32_t id = 0;
    unsigned sent = 0;
    sim_connect(s);
    CHECK_EQ(perch_publish_id(&s->client, 1, 1, bytes("x"), 1, 1, s->now, &id), PERCH_OK);
    CHECK_EQ(id, 1); /* this one is never acknowledged */
    EXPECT_TX(s, "35 01 01 78");
    for (;;) {
        char ack[16];
        perch_status_t status =
            perch_publish_id(&s->client, 1, 1, bytes("x"), 1, 1, s->now, &id);
        if (status != PERCH_OK) {
            CHECK_EQ(status, PERCH_ERR_INFLIGHT_FULL);
            break;
        }
        sent++;
        snprintf(ack, sizeof ack, "40 %02x 00", (unsigned)id);
        (void)perch_poll_transmit(&s->client, s->rx, sizeof s->rx);
        rx(s, ack);
        EXPECT_EVENT(s, PERCH_EVENT_PUBLISH_ACKED, 0, 0, id);
    }
    CHECK_EQ(sent, 7); /* ids 2..8: 9 waits for id 1 */
    CHECK_EQ(perch_pending_publishes(&s->client), 1);
    rx(s, "40 01 00");
    EXPECT_EVENT(s, PERCH_EVENT_PUBLISH_ACKED, 0, 0, 1);
    CHECK_EQ(perch_publish_id(&s->client, 1, 1, bytes("x"), 1, 1, s->now, &id), PERCH_OK);
    CHECK_EQ(id, 9);
}

static void disconnect_ends_the_session(void)
{
    sim_t *s = sim_new(0, NULL);
    sim_connect(s);
    perch_disconnect(&s->client, s->now);
    EXPECT_TX(s, "d0");
    EXPECT_EVENT(s, PERCH_EVENT_DISCONNECTED, 0, PERCH_REASON_CLOSED, 0);
    EXPECT_NO_TX(s);
    rx(s, "d0"); /* the broker's answer */
    EXPECT_NO_EVENT(s);
    CHECK_EQ(deadline(s), NO_DEADLINE);
    CHECK(!perch_is_connected(&s->client));
}

/* ------------------------------------------------- lossy link, fake broker */

#define LINK_FRAMES_MAX 64u

typedef struct link_frame {
    uint32_t at_ms;
    size_t len;
    uint8_t bytes[64];
} link_frame_t;

typedef struct fake_broker {
    int has_session;
    uint32_t window[PERCH_DEDUP_WINDOW_MSG_IDS];
    unsigned window_next;
    unsigned routed[64]; /* per payload number: times passed on */
    link_frame_t to_device[LINK_FRAMES_MAX];
    unsigned to_device_count;
} fake_broker_t;

static void broker_send(fake_broker_t *b, uint64_t *rng, uint32_t now, const perch_frame_t *f)
{
    uint64_t r = test_rng_next(rng);
    unsigned copies = r % 100 < 25 ? 0 : r % 100 < 35 ? 2 : 1; /* 25% lost, 10% twice */
    while (copies-- > 0 && b->to_device_count < LINK_FRAMES_MAX) {
        link_frame_t *out = &b->to_device[b->to_device_count++];
        int32_t len = perch_encode(f, PERCH_ORIGIN_BROKER, out->bytes, sizeof out->bytes);
        CHECK(len > 0);
        out->len = (size_t)len;
        out->at_ms = now + 20 + (uint32_t)(test_rng_next(rng) % 30);
    }
}

static void broker_handle(fake_broker_t *b, uint64_t *rng, uint32_t now, const uint8_t *bytes_in,
                          size_t len)
{
    perch_frame_t in;
    perch_frame_t out;
    unsigned i;
    CHECK_EQ(perch_decode(bytes_in, len, PERCH_ORIGIN_DEVICE, &in), PERCH_OK);
    memset(&out, 0, sizeof out);
    switch (in.type) {
    case PERCH_TYPE_CONNECT:
        out.type = PERCH_TYPE_CONNACK;
        out.flags = b->has_session && !(in.flags & PERCH_FLAG_CLEAN_SESSION);
        out.session_token = 7;
        b->has_session = 1;
        break;
    case PERCH_TYPE_REGISTER:
        out.type = PERCH_TYPE_REGACK;
        out.id = in.id;
        out.topic = 5;
        break;
    case PERCH_TYPE_PUBLISH: {
        int seen = 0;
        for (i = 0; i < PERCH_DEDUP_WINDOW_MSG_IDS; i++) {
            seen |= b->window[i] == in.id;
        }
        if (!seen) {
            unsigned number = 0;
            size_t k;
            for (k = 1; k < in.payload.len; k++) { /* "m<number>" */
                number = number * 10u + (unsigned)(in.payload.ptr[k] - '0');
            }
            b->window[b->window_next++ % PERCH_DEDUP_WINDOW_MSG_IDS] = in.id;
            if (number < 64) {
                b->routed[number]++;
            }
        }
        out.type = PERCH_TYPE_PUBACK;
        out.id = in.id;
        break;
    }
    case PERCH_TYPE_PING:
        out.type = PERCH_TYPE_PONG;
        break;
    default:
        return;
    }
    broker_send(b, rng, now, &out);
}

static void lossy_links(perch_config_t *config)
{
    config->retries_max = 8;
    config->retry_interval_ms = 200;
    config->reconnect_backoff_min_ms = 100;
    config->reconnect_backoff_max_ms = 1000;
    config->keepalive_s = 2;
}

static void every_qos1_publish_arrives_once_over_a_lossy_link(void)
{
    uint64_t seed;
    for (seed = 1; seed <= 20; seed++) {
        static fake_broker_t broker;
        static char payloads[24][8];
        sim_t *s = sim_new(0, lossy_links);
        uint64_t rng = seed * 0x9E3779B97F4A7C15ull;
        unsigned published = 0;
        unsigned acked = 0;
        unsigned step;
        unsigned i;
        memset(&broker, 0, sizeof broker);
        perch_connect(&s->client, s->now);
        for (step = 0; step < 20000 && acked < 24; step++) {
            uint8_t frame[PERCH_FRAME_BYTES_MAX];
            size_t len;
            while (published < 24) {
                snprintf(payloads[published], sizeof payloads[published], "m%u", published);
                if (perch_publish(&s->client, bytes("lossy"), 5, bytes(payloads[published]),
                                  strlen(payloads[published]), 1, s->now,
                                  NULL) != PERCH_OK) {
                    break;
                }
                published++;
            }
            while ((len = perch_poll_transmit(&s->client, frame, sizeof frame)) > 0) {
                if (test_rng_next(&rng) % 100 >= 25) { /* 25% lost on the way up */
                    broker_handle(&broker, &rng, s->now, frame, len);
                }
            }
            for (i = 0; i < broker.to_device_count;) {
                link_frame_t *f = &broker.to_device[i];
                if ((int32_t)(s->now - f->at_ms) >= 0) {
                    CHECK_EQ(perch_handle_input(&s->client, f->bytes, f->len, s->now), PERCH_OK);
                    *f = broker.to_device[--broker.to_device_count];
                    collect(s);
                } else {
                    i++;
                }
            }
            for (; s->events_read < s->events_count; s->events_read++) {
                const perch_event_t *ev = &s->events[s->events_read];
                CHECK(ev->type != PERCH_EVENT_PUBLISH_FAILED);
                acked += ev->type == PERCH_EVENT_PUBLISH_ACKED;
            }
            if (s->events_count > SIM_EVENTS - 8) {
                s->events_count = s->events_read = 0;
            }
            wait_ms(s, 10);
        }
        if (acked != 24) {
            fprintf(stderr, "  seed %llu: %u of 24 acked\n", (unsigned long long)seed, acked);
        }
        CHECK_EQ(acked, 24);
        for (i = 0; i < 24; i++) {
            CHECK_EQ(broker.routed[i], 1); /* at least once (retries), at most once (de-dup) */
        }
    }
}

/* ---------------------------------------------------------- random drive */

static void a_random_drive_never_breaks_the_client(void)
{
    static const char *frames[] = {
        "20 00 78 56 34 12", "21 00 78 56 34 12", "20 05 00 00 00 00", "20 09 00 00 00 00",
        "60 01 05 00", "60 02 06 00", "60 01 00 08", "40 01 00", "40 02 04", "80 01 00",
        "80 02 08", "a0 03 00", "50 06 61 2e 62", "50 07 63", "30 06 78", "31 06 01 79",
        "39 06 03 02 7a", "34 01 01 2c", "c0", "d0", "f0 05 03 00", "f0 01 03 09", "ff",
    };
    uint64_t rng = 42;
    unsigned step;
    sim_t *s = sim_new(1, lossy_links);
    for (step = 0; step < 60000; step++) {
        uint64_t r = test_rng_next(&rng);
        uint8_t frame[PERCH_FRAME_BYTES_MAX];
        perch_frame_t decoded;
        size_t len;
        perch_event_t ev;
        switch (r % 12) {
        case 0:
            perch_connect(&s->client, s->now);
            break;
        case 1:
            (void)perch_publish(&s->client, bytes(r & 256 ? "a.b" : "c"), r & 256 ? 3 : 1,
                                bytes("p"), 1, (uint8_t)((r >> 9) & 1), s->now, NULL);
            break;
        case 2:
            (void)perch_subscribe(&s->client, bytes("a.>"), 3, (uint8_t)((r >> 9) & 1), s->now,
                                  NULL);
            break;
        case 3:
            (void)perch_unsubscribe(&s->client, bytes("a.>"), 3, s->now, NULL);
            break;
        case 4:
            (void)perch_sleep(&s->client, 60, s->now);
            (void)perch_wake(&s->client, s->now);
            break;
        case 5:
            (void)perch_reply(&s->client, 3, bytes("r"), 1, s->now);
            break;
        case 6:
            if ((r >> 12) % 50 == 0) {
                perch_disconnect(&s->client, s->now);
            } else if ((r >> 12) % 50 == 1) {
                perch_resume(&s->client, s->now);
            }
            break;
        default: {
            uint8_t *buf = s->rx;
            len = hex_to_bytes(frames[(r >> 8) % (sizeof frames / sizeof frames[0])], buf,
                               sizeof s->rx);
            (void)perch_handle_input(&s->client, buf, len, s->now);
            break;
        }
        }
        while (perch_poll_event(&s->client, &ev)) {
            CHECK(ev.type >= PERCH_EVENT_CONNECTED && ev.type <= PERCH_EVENT_DISCONNECTED);
        }
        while ((len = perch_poll_transmit(&s->client, frame, sizeof frame)) > 0) {
            CHECK_EQ(perch_decode(frame, len, PERCH_ORIGIN_DEVICE, &decoded), PERCH_OK);
        }
        s->now += (uint32_t)((r >> 20) % 700);
        perch_handle_timeout(&s->client, s->now);
        CHECK(perch_pending_publishes(&s->client) <= SIM_OUTGOING);
    }
}

const test_case_t client_tests[] = {
    {"client: registers, then publishes QoS 1 and QoS 0", registers_then_publishes_qos1_and_qos0},
    {"client: QoS 1 retries keep the msg id, back off, reconnect",
     qos1_retries_keep_the_msg_id_back_off_then_reconnect},
    {"client: reconnect backoff doubles up to its max", reconnect_backoff_doubles_up_to_its_max},
    {"client: UNKNOWN_SESSION resumes, or connects again", unknown_session_resumes_or_connects_again},
    {"client: a new session registers and subscribes again",
     a_new_session_registers_and_subscribes_again},
    {"client: messages, acks, duplicates and replies", messages_acks_duplicates_and_replies},
    {"client: an unpolled message holds the next one", an_unpolled_message_holds_the_next_one},
    {"client: sleeps, wakes, collects buffered messages",
     sleeps_wakes_and_collects_buffered_messages},
    {"client: keepalive pings when idle", keepalive_pings_when_idle},
    {"client: refused CONNACKs", refused_connacks},
    {"client: refused calls change nothing", calls_refused_without_side_effects},
    {"client: subscriptions refused, dropped, retried", subscriptions_refused_dropped_and_retried},
    {"client: a refused registration fails its publishes",
     a_refused_registration_fails_its_publishes},
    {"client: unacknowledged msg ids span fewer than 8",
     unacknowledged_msg_ids_span_fewer_than_8},
    {"client: disconnect ends the session", disconnect_ends_the_session},
    {"client: every QoS 1 publish arrives once over a lossy link",
     every_qos1_publish_arrives_once_over_a_lossy_link},
    {"client: a random drive never breaks it", a_random_drive_never_breaks_the_client},
};
const size_t client_tests_count = sizeof client_tests / sizeof client_tests[0];
