/* SPDX-License-Identifier: Apache-2.0 */
/*
 * client.c — the device protocol client as a sans-IO state machine,
 * mirroring the Rust client (firmware-clients/rust/src/client.rs).
 *
 * What to send is derived from state rather than queued as bytes: every
 * pending request holds a perch_retry_t saying whether it is due and when it
 * times out. A retry is the same frame rebuilt with the same ids; a reconnect
 * marks every pending request due again. The requests live in three places,
 * walked in this order by one iterator (request_retry): the names table
 * (REGISTER, SUBSCRIBE, UNSUBSCRIBE: a name's `op` is the frame type to send,
 * and its answer is type + 1), the outgoing table (PUBLISH), and PING.
 * CONNECT/RESUME and the sleep DISCONNECT use connect_retry. Only the acks
 * owed to the broker and the events owed to the application are queued, in
 * two small rings whose overflow is counted.
 *
 * Owns no memory: the tables are the caller's (perch_config_t), received
 * payloads are views of the caller's input buffer, and time is an argument of
 * every input. Nothing here touches a socket or reads a clock.
 */
#include <stddef.h>
#include <string.h>

#include "perch_device.h"

enum state {
    S_IDLE,               /* before perch_connect */
    S_AWAITING_CONNACK,   /* CONNECT or RESUME (bits & B_RESUME) sent */
    S_ESTABLISHED,
    S_AWAITING_SLEEP_ACK, /* DISCONNECT(sleep) sent, awaiting the broker's */
    S_WAKING,             /* PING sent from sleep: buffered messages, PONG */
    S_ASLEEP,
    S_RECONNECTING,       /* waiting out the backoff */
    S_CLOSING,            /* DISCONNECT to send */
    S_CLOSED
};

/* client->bits */
#define B_RESUME 0x01u         /* AWAITING_CONNACK after RESUME, not CONNECT */
#define B_CONNECTED_ONCE 0x02u /* a CONNACK OK arrived: never clean again */
#define B_MESSAGE 0x04u        /* the message view is filled, not yet polled */
#define B_CLOCK 0x08u          /* now_ms holds a time the caller gave */

/* perch_retry_t.state */
#define R_IDLE 0u /* no request pending */
#define R_DUE 1u  /* send at the next perch_poll_transmit */
#define R_SENT 2u /* sent; due again at timeout_ms */

/* perch_name_t.kind */
#define N_FREE 0u
#define N_TOPIC 1u        /* a subject we publish to: registered again in a new session */
#define N_BROKER_TOPIC 2u /* registered by the broker: forgotten with the session */
#define N_FILTER 3u       /* a subscription */

/* perch_outgoing_t.kind; `target` is a names slot for O_SUBJECT, else an id.
 * The kind is also the index of its PUBLISH flags in publish_flags[]. */
#define O_FREE 0u
#define O_SUBJECT 1u
#define O_REGISTERED 2u
#define O_PREDEFINED 3u
#define O_REPLY 4u
static const uint8_t publish_flags[] = {0, 0, 0, PERCH_FLAG_PREDEFINED, PERCH_FLAG_REPLY};

#define NO_SLOT 0xFFu
/* Larger values could overflow uint32 time arithmetic (32x backoff). */
#define RETRY_INTERVAL_MS_MAX (1u << 25)
#define BACKOFF_MS_MAX (1u << 30)
#define KEEPALIVE_S_MAX 2000000u
/* The broker de-duplicates over the last 16 msg ids it accepted. While X is
 * unacknowledged, the ids it may accept after X are those in flight with X:
 * with every new id less than SPAN past the oldest unacknowledged one, they
 * lie in (X - SPAN, X + SPAN), at most 2 x SPAN - 2 of them. SPAN 8 keeps
 * that under 16, so a retry of X always meets X in the window and is passed
 * on once. (A bound on the count in flight alone, 16, does not: reordering
 * and lost PUBACKs can slide X out of the window.) */
#define MSG_ID_SPAN_MAX (PERCH_DEDUP_WINDOW_MSG_IDS / 2u)
typedef char span_fits_the_window[2u * MSG_ID_SPAN_MAX - 2u < PERCH_DEDUP_WINDOW_MSG_IDS ? 1 : -1];
/* A PUBLISH's header, topic and msg id at their largest. */
#define PUBLISH_OVERHEAD_BYTES_MAX (1u + 2u * PERCH_VARINT_BYTES_MAX)

/* ------------------------------------------------------------------ time */

static int reached(uint32_t now_ms, uint32_t at_ms)
{
    return (int32_t)(now_ms - at_ms) >= 0;
}

static void advance(perch_client_t *c, uint32_t now_ms)
{
    if (!(c->bits & B_CLOCK) || (int32_t)(now_ms - c->now_ms) > 0) {
        c->now_ms = now_ms;
    }
    c->bits |= B_CLOCK;
}

static void retry_now(perch_retry_t *retry)
{
    retry->state = R_DUE;
    retry->attempts = 0;
}

static void retry_sent(perch_retry_t *retry, uint32_t now_ms, uint32_t interval_ms)
{
    unsigned shift;
    retry->state = R_SENT;
    if (retry->attempts < 0xFFu) {
        retry->attempts++;
    }
    shift = retry->attempts - 1u < 5u ? retry->attempts - 1u : 5u;
    retry->timeout_ms = now_ms + (interval_ms << shift);
}

/* 1 when the last allowed transmission timed out; else makes a timed-out
 * request due again. */
static int retry_expired(perch_retry_t *retry, uint32_t now_ms, uint8_t retries_max)
{
    if (retry->state != R_SENT || !reached(now_ms, retry->timeout_ms)) {
        return 0;
    }
    if (retry->attempts > retries_max) {
        return 1;
    }
    retry->state = R_DUE;
    return 0;
}

static void earliest(uint32_t *best, int *have, uint8_t state, uint32_t at_ms)
{
    if (state == R_SENT && (!*have || (int32_t)(at_ms - *best) < 0)) {
        *best = at_ms;
        *have = 1;
    }
}

/* The retry of request `n`: the names, then the outgoing publishes, then
 * PING; NULL past them. */
static perch_retry_t *request_retry(perch_client_t *c, unsigned n)
{
    const perch_config_t *cfg = c->config;
    if (n < cfg->names_max) {
        return &cfg->names[n].retry;
    }
    n -= cfg->names_max;
    if (n < cfg->outgoing_max) {
        return &cfg->outgoing[n].retry;
    }
    return n == cfg->outgoing_max ? &c->ping : NULL;
}

/* ---------------------------------------------------------------- queues */

/* Queues an event (ack 0) or an ack owed to the broker (ack 1); `what` packs
 * the note's type, code and detail (NOTE) to keep calls to four arguments. */
#define NOTE(type, code, detail) \
    ((uint32_t)(type) | (uint32_t)(code) << 8 | (uint32_t)(detail) << 16)

static void push(perch_client_t *c, int ack, uint32_t what, uint32_t id)
{
    perch_note_t *notes = ack ? c->acks : c->events;
    perch_ring_t *ring = ack ? &c->acks_ring : &c->events_ring;
    unsigned max = ack ? PERCH_ACKS_MAX : PERCH_EVENTS_MAX;
    perch_note_t *note;
    if (ring->count == max) {
        c->stats.queue_dropped++;
        return;
    }
    note = &notes[(ring->head + ring->count) % max];
    note->type = (uint8_t)what;
    note->code = (uint8_t)(what >> 8);
    note->detail = (uint8_t)(what >> 16);
    note->id = id;
    ring->count++;
}

static void event(perch_client_t *c, uint32_t what, uint32_t id)
{
    push(c, 0, what, id);
}

static void ack(perch_client_t *c, uint8_t type, uint32_t id, uint8_t code)
{
    push(c, 1, NOTE(type, code, 0), id);
}

/* ----------------------------------------------------------------- names */

static uint8_t *name_slot(const perch_client_t *c, unsigned index)
{
    return c->config->name_bytes + (size_t)index * c->config->name_bytes_max;
}

static uint32_t next_id(uint32_t *counter)
{
    uint32_t id = *counter;
    *counter = id + 1 == 0 ? 1 : id + 1;
    return id;
}

static void request(perch_client_t *c, perch_name_t *name, uint8_t op)
{
    name->op = op;
    name->req_id = next_id(&c->next_req_id);
    retry_now(&name->retry);
}

static void answered(perch_name_t *name)
{
    name->op = 0;
    name->retry.state = R_IDLE;
}

/* A topic id usable now: bound (by either side) and not re-registering. */
static int topic_ready(const perch_name_t *name)
{
    return (name->kind == N_TOPIC || name->kind == N_BROKER_TOPIC) && name->op == 0;
}

/* The slot of the ready topic `id`, or -1. */
static int topic_by_id(const perch_client_t *c, uint32_t id)
{
    unsigned i;
    for (i = 0; i < c->config->names_max; i++) {
        if (topic_ready(&c->config->names[i]) && c->config->names[i].id == id) {
            return (int)i;
        }
    }
    return -1;
}

/* The slot of the name with these bytes (a filter when `filter`, else a
 * subject), else the first free slot with `*found` 0, else -1. */
static int name_for(perch_client_t *c, int filter, const uint8_t *bytes, size_t len,
                    int *found)
{
    int free_slot = -1;
    unsigned i;
    *found = 0;
    for (i = 0; i < c->config->names_max; i++) {
        const perch_name_t *name = &c->config->names[i];
        const uint8_t *stored = name_slot(c, i);
        size_t k = 0;
        if (name->kind == N_FREE) {
            if (free_slot < 0) {
                free_slot = (int)i;
            }
            continue;
        }
        if ((name->kind == N_FILTER) != filter || name->len != len) {
            continue;
        }
        while (k < len && stored[k] == bytes[k]) {
            k++;
        }
        if (k == len) {
            *found = 1;
            return (int)i;
        }
    }
    return free_slot;
}

/* Every unanswered request is sent again at once with fresh retries (after a
 * reconnect, RESUME or wake the old timeouts mean nothing); PING is dropped. */
static void rearm_requests(perch_client_t *c)
{
    perch_retry_t *retry;
    unsigned n;
    for (n = 0; (retry = request_retry(c, n)) != NULL; n++) {
        if (retry->state != R_IDLE) {
            retry_now(retry);
        }
    }
    c->ping.state = R_IDLE;
}

static void start_connect(perch_client_t *c, int resume)
{
    c->state = S_AWAITING_CONNACK;
    c->bits = (uint8_t)((c->bits & ~B_RESUME) | (resume ? B_RESUME : 0));
    retry_now(&c->connect_retry);
}

static void backoff(perch_client_t *c)
{
    uint32_t doubled = c->reconnect_backoff_ms * 2u;
    uint32_t max_ms = c->config->reconnect_backoff_max_ms;
    c->state = S_RECONNECTING;
    c->reconnect_at_ms = c->now_ms + c->reconnect_backoff_ms;
    c->reconnect_backoff_ms = doubled < max_ms ? doubled : max_ms;
    rearm_requests(c);
}

/* The connection is gone: tell the application, wait out the backoff, then
 * CONNECT without clean_session (it also finds a session the broker kept
 * across its own restart) and resend what was pending. */
static void lose(perch_client_t *c, uint8_t reason)
{
    c->stats.connections_lost++;
    event(c, NOTE(PERCH_EVENT_DISCONNECTED, 0, reason), 0);
    backoff(c);
}

/* ------------------------------------------------------------------- setup */

void perch_config_init(perch_config_t *config, const char *client_id)
{
    size_t len = 0;
    memset(config, 0, sizeof *config);
    while (client_id[len] != '\0' && len <= PERCH_CLIENT_ID_BYTES_MAX) {
        len++;
    }
    config->client_id = (const uint8_t *)client_id;
    config->client_id_len = (uint8_t)len;
    config->clean_session = 1;
    config->retries_max = 4;
    config->keepalive_s = 60;
    config->retry_interval_ms = 1000;
    config->reconnect_backoff_min_ms = 1000;
    config->reconnect_backoff_max_ms = 60000;
    config->frame_bytes_max = PERCH_FRAME_BYTES_MAX;
}

perch_status_t perch_client_init(perch_client_t *client, const perch_config_t *config)
{
    if (config->client_id_len == 0 || config->client_id_len > PERCH_CLIENT_ID_BYTES_MAX ||
        config->outgoing_max - 1u >= PERCH_DEDUP_WINDOW_MSG_IDS ||
        config->retry_interval_ms - 1u >= RETRY_INTERVAL_MS_MAX ||
        config->reconnect_backoff_max_ms > BACKOFF_MS_MAX ||
        config->reconnect_backoff_min_ms > config->reconnect_backoff_max_ms ||
        config->keepalive_s > KEEPALIVE_S_MAX || config->frame_bytes_max < 16u ||
        config->name_bytes_max + 1u + PERCH_VARINT_BYTES_MAX > config->frame_bytes_max) {
        return PERCH_ERR_INVALID;
    }
    memset(client, 0, sizeof *client);
    client->config = config;
    client->next_msg_id = 1;
    client->next_req_id = 1;
    client->reconnect_backoff_ms = config->reconnect_backoff_min_ms;
    if (config->names_max) {
        memset(config->names, 0, config->names_max * sizeof *config->names);
    }
    memset(config->outgoing, 0, config->outgoing_max * sizeof *config->outgoing);
    return PERCH_OK;
}

/* ----------------------------------------------------------- application */

void perch_connect(perch_client_t *client, uint32_t now_ms)
{
    advance(client, now_ms);
    start_connect(client, 0);
}

void perch_resume(perch_client_t *client, uint32_t now_ms)
{
    advance(client, now_ms);
    start_connect(client, client->session_token != 0);
}

/* Queues a publish after the checks every publish shares; `kind` O_SUBJECT
 * takes `target` = a names slot, found or created here from `subject`. */
static perch_status_t enqueue(perch_client_t *c, uint8_t kind, uint32_t target,
                              const uint8_t *subject, size_t subject_len,
                              const uint8_t *payload, size_t payload_len, uint8_t qos,
                              uint32_t now_ms, uint32_t *msg_id)
{
    const perch_config_t *cfg = c->config;
    perch_outgoing_t *out = NULL;
    unsigned i;
    advance(c, now_ms);
    if (kind != O_REPLY && (c->state == S_IDLE || c->state == S_CLOSED)) {
        return PERCH_ERR_NOT_CONNECTED;
    }
    if (qos > 1 || (kind == O_SUBJECT && subject_len == 0)) {
        return PERCH_ERR_INVALID;
    }
    if (subject_len > cfg->name_bytes_max ||
        payload_len > cfg->frame_bytes_max - PUBLISH_OVERHEAD_BYTES_MAX) {
        return PERCH_ERR_TOO_LARGE;
    }
    for (i = cfg->outgoing_max; i-- > 0;) {
        const perch_outgoing_t *o = &cfg->outgoing[i];
        if (o->kind == O_FREE) {
            out = &cfg->outgoing[i];
        } else if (qos && o->qos && c->next_msg_id - o->msg_id >= MSG_ID_SPAN_MAX) {
            return PERCH_ERR_INFLIGHT_FULL;
        }
    }
    if (out == NULL) {
        return PERCH_ERR_INFLIGHT_FULL;
    }
    if (kind == O_SUBJECT) {
        int found;
        int slot = name_for(c, 0, subject, subject_len, &found);
        perch_name_t *name;
        if (slot < 0) {
            return PERCH_ERR_NAMES_FULL;
        }
        name = &cfg->names[slot];
        if (!found) {
            name->len = (uint8_t)subject_len;
            memcpy(name_slot(c, (unsigned)slot), subject, subject_len);
            request(c, name, PERCH_TYPE_REGISTER);
        }
        /* We publish there: keep it (registered again) in a new session. */
        name->kind = N_TOPIC;
        target = (uint32_t)slot;
    }
    out->kind = kind;
    out->target = target;
    out->qos = qos;
    /* Counting up from 1; every id in flight is one of the 7 before it. */
    out->msg_id = qos ? next_id(&c->next_msg_id) : 0;
    out->payload = payload;
    out->payload_len = (uint16_t)payload_len;
    retry_now(&out->retry);
    if (msg_id) {
        *msg_id = out->msg_id;
    }
    return PERCH_OK;
}

perch_status_t perch_publish(perch_client_t *client, const uint8_t *subject,
                             size_t subject_len, const uint8_t *payload, size_t payload_len,
                             uint8_t qos, uint32_t now_ms, uint32_t *msg_id)
{
    return enqueue(client, O_SUBJECT, 0, subject, subject_len, payload, payload_len, qos,
                   now_ms, msg_id);
}

perch_status_t perch_publish_id(perch_client_t *client, uint8_t predefined,
                                uint32_t topic_id, const uint8_t *payload,
                                size_t payload_len, uint8_t qos, uint32_t now_ms,
                                uint32_t *msg_id)
{
    return enqueue(client, predefined ? O_PREDEFINED : O_REGISTERED, topic_id, NULL, 0,
                   payload, payload_len, qos, now_ms, msg_id);
}

perch_status_t perch_reply(perch_client_t *client, uint32_t reply_handle,
                           const uint8_t *payload, size_t payload_len, uint32_t now_ms)
{
    return enqueue(client, O_REPLY, reply_handle, NULL, 0, payload, payload_len, 0, now_ms,
                   NULL);
}

static perch_status_t subscription(perch_client_t *c, const uint8_t *filter, size_t len,
                                   uint8_t max_qos, uint8_t op, uint32_t now_ms,
                                   uint32_t *req_id)
{
    perch_name_t *name;
    int found;
    int slot;
    advance(c, now_ms);
    if (max_qos > 1) {
        return PERCH_ERR_INVALID;
    }
    if (len > c->config->name_bytes_max) {
        return PERCH_ERR_TOO_LARGE;
    }
    slot = name_for(c, 1, filter, len, &found);
    if (slot < 0) {
        return PERCH_ERR_NAMES_FULL;
    }
    name = &c->config->names[slot];
    if (!found) {
        name->kind = N_FILTER;
        name->len = (uint8_t)len;
        name->max_qos = 0;
        memcpy(name_slot(c, (unsigned)slot), filter, len);
    }
    if (op == PERCH_TYPE_SUBSCRIBE) {
        name->max_qos = max_qos;
    }
    request(c, name, op);
    if (req_id) {
        *req_id = name->req_id;
    }
    return PERCH_OK;
}

perch_status_t perch_subscribe(perch_client_t *client, const uint8_t *filter, size_t len,
                               uint8_t max_qos, uint32_t now_ms, uint32_t *req_id)
{
    return subscription(client, filter, len, max_qos, PERCH_TYPE_SUBSCRIBE, now_ms, req_id);
}

perch_status_t perch_unsubscribe(perch_client_t *client, const uint8_t *filter, size_t len,
                                 uint32_t now_ms, uint32_t *req_id)
{
    return subscription(client, filter, len, 0, PERCH_TYPE_UNSUBSCRIBE, now_ms, req_id);
}

perch_status_t perch_sleep(perch_client_t *client, uint32_t sleep_s, uint32_t now_ms)
{
    advance(client, now_ms);
    if (client->state != S_ESTABLISHED) {
        return PERCH_ERR_NOT_CONNECTED;
    }
    client->state = S_AWAITING_SLEEP_ACK;
    client->sleep_s = sleep_s;
    retry_now(&client->connect_retry);
    return PERCH_OK;
}

perch_status_t perch_wake(perch_client_t *client, uint32_t now_ms)
{
    advance(client, now_ms);
    if (client->state != S_ASLEEP) {
        return PERCH_ERR_NOT_CONNECTED;
    }
    client->state = S_WAKING;
    rearm_requests(client);
    retry_now(&client->ping);
    return PERCH_OK;
}

void perch_disconnect(perch_client_t *client, uint32_t now_ms)
{
    advance(client, now_ms);
    client->state = S_CLOSING;
}

/* ------------------------------------------------------ frames from broker */

/* The broker has no state for us: drop what it registered, register and
 * subscribe again, fail replies (their handles died with the session). */
static void forget_session(perch_client_t *c)
{
    const perch_config_t *cfg = c->config;
    unsigned i;
    c->seen_count = 0;
    for (i = 0; i < cfg->names_max; i++) {
        perch_name_t *name = &cfg->names[i];
        if (name->kind == N_BROKER_TOPIC ||
            (name->kind == N_FILTER && name->op == PERCH_TYPE_UNSUBSCRIBE)) {
            if (name->kind == N_FILTER) {
                event(c, NOTE(PERCH_EVENT_UNSUBSCRIBED, PERCH_CODE_OK, 0), name->req_id);
            }
            memset(name, 0, sizeof *name);
        } else if (name->kind == N_TOPIC) {
            name->id = 0;
            request(c, name, PERCH_TYPE_REGISTER);
        } else if (name->kind == N_FILTER && name->op == 0) {
            /* (A SUBSCRIBE still pending keeps its id: it was rearmed.) */
            request(c, name, PERCH_TYPE_SUBSCRIBE);
        }
    }
    for (i = 0; i < cfg->outgoing_max; i++) {
        perch_outgoing_t *out = &cfg->outgoing[i];
        if (out->kind == O_REPLY) {
            event(c, NOTE(PERCH_EVENT_PUBLISH_FAILED, PERCH_CODE_UNKNOWN_SESSION, 0), out->msg_id);
            memset(out, 0, sizeof *out);
        }
    }
}

static void on_connack(perch_client_t *c, const perch_frame_t *f)
{
    if (c->state != S_AWAITING_CONNACK) {
        return;
    }
    if (f->code != PERCH_CODE_OK) {
        if (f->code == PERCH_CODE_UNKNOWN_SESSION && (c->bits & B_RESUME)) {
            start_connect(c, 0);
            return;
        }
        event(c, NOTE(PERCH_EVENT_DISCONNECTED, f->code, PERCH_REASON_REFUSED), 0);
        if (f->code == PERCH_CODE_NOT_PERMITTED || f->code == PERCH_CODE_UNSUPPORTED_VERSION) {
            c->state = S_CLOSED;
        } else {
            backoff(c);
        }
        return;
    }
    c->state = S_ESTABLISHED;
    c->bits |= B_CONNECTED_ONCE;
    c->session_token = f->session_token;
    c->reconnect_backoff_ms = c->config->reconnect_backoff_min_ms;
    c->last_sent_ms = c->now_ms;
    rearm_requests(c);
    if (!(f->flags & PERCH_FLAG_SESSION_PRESENT)) {
        forget_session(c);
    }
    event(c, NOTE(PERCH_EVENT_CONNECTED, 0, (uint8_t)(f->flags & PERCH_FLAG_SESSION_PRESENT)), 0);
}

static void on_deliver(perch_client_t *c, const perch_frame_t *f)
{
    uint8_t qos1 = (uint8_t)(f->flags & PERCH_FLAG_QOS1);
    int slot = NO_SLOT;
    unsigned i;
    if (!(f->flags & PERCH_FLAG_PREDEFINED)) {
        slot = topic_by_id(c, f->topic);
        if (slot < 0) {
            if (qos1) {
                ack(c, PERCH_TYPE_PUBACK, f->id, PERCH_CODE_UNKNOWN_TOPIC);
            } else {
                c->stats.messages_dropped++;
            }
            return;
        }
    }
    for (i = 0; qos1 && i < c->seen_count; i++) {
        if (c->seen_msg_ids[i] == f->id) {
            c->stats.duplicates++;
            ack(c, PERCH_TYPE_PUBACK, f->id, PERCH_CODE_OK);
            return;
        }
    }
    if ((c->bits & B_MESSAGE) || c->events_ring.count == PERCH_EVENTS_MAX) {
        /* No room: QoS 0 is dropped; QoS 1 stays unacknowledged and the
         * broker retransmits it. */
        if (!qos1) {
            c->stats.messages_dropped++;
        }
        return;
    }
    c->bits |= B_MESSAGE;
    c->message_topic = f->topic;
    c->message_reply_handle = f->reply_handle;
    c->message_flags = (uint8_t)(f->flags & (PERCH_FLAG_PREDEFINED | PERCH_FLAG_REPLY));
    c->message_slot = (uint8_t)slot;
    c->message_payload = f->payload.ptr;
    c->message_payload_len = (uint16_t)f->payload.len;
    event(c, NOTE(PERCH_EVENT_MESSAGE, 0, 0), 0);
    if (qos1) {
        c->seen_msg_ids[c->seen_next] = f->id;
        c->seen_next = (uint8_t)((c->seen_next + 1u) % PERCH_DEDUP_WINDOW_MSG_IDS);
        if (c->seen_count < PERCH_DEDUP_WINDOW_MSG_IDS) {
            c->seen_count++;
        }
        ack(c, PERCH_TYPE_PUBACK, f->id, PERCH_CODE_OK);
    }
}

/* The broker binds `id` to a subject and holds its messages until our
 * REGACK OK. A subject longer than a name slot is still accepted: its
 * messages then arrive with the topic id and no subject. */
static void on_broker_register(perch_client_t *c, const perch_frame_t *f)
{
    uint8_t code = PERCH_CODE_OK;
    if (topic_by_id(c, f->id) < 0) {
        int found;
        int slot = name_for(c, 0, f->subject.ptr, f->subject.len, &found);
        if (slot < 0) {
            code = PERCH_CODE_NO_RESOURCES;
        } else if (!found) {
            perch_name_t *name = &c->config->names[slot];
            name->kind = N_BROKER_TOPIC;
            name->id = f->id;
            name->len = 0;
            if (f->subject.len <= c->config->name_bytes_max) {
                name->len = (uint8_t)f->subject.len;
                memcpy(name_slot(c, (unsigned)slot), f->subject.ptr, f->subject.len);
            }
        }
    }
    ack(c, PERCH_TYPE_REGACK, f->id, code);
}

/* REGACK, SUBACK, UNSUBACK: the answer to a name's pending request. */
static void on_request_answer(perch_client_t *c, const perch_frame_t *f)
{
    const perch_config_t *cfg = c->config;
    uint8_t op = (uint8_t)(f->type - 1u);
    unsigned i;
    for (i = 0; i < cfg->names_max; i++) {
        perch_name_t *name = &cfg->names[i];
        unsigned k;
        if (name->op != op || name->req_id != f->id) {
            continue;
        }
        answered(name);
        if (op == PERCH_TYPE_REGISTER) {
            if (f->code == PERCH_CODE_OK && f->topic != 0) {
                name->id = f->topic;
                return;
            }
            for (k = 0; k < cfg->outgoing_max; k++) {
                perch_outgoing_t *out = &cfg->outgoing[k];
                if (out->kind == O_SUBJECT && out->target == i) {
                    event(c, NOTE(PERCH_EVENT_PUBLISH_FAILED, f->code, 0), out->msg_id);
                    memset(out, 0, sizeof *out);
                }
            }
        } else {
            event(c, NOTE(op == PERCH_TYPE_SUBSCRIBE ? PERCH_EVENT_SUBSCRIBED
                                             : PERCH_EVENT_UNSUBSCRIBED, f->code, 0), f->id);
            if (op == PERCH_TYPE_SUBSCRIBE && f->code == PERCH_CODE_OK) {
                return;
            }
        }
        memset(name, 0, sizeof *name);
        return;
    }
}

static void on_puback(perch_client_t *c, const perch_frame_t *f)
{
    unsigned i;
    for (i = 0; i < c->config->outgoing_max; i++) {
        perch_outgoing_t *out = &c->config->outgoing[i];
        if (out->qos && out->msg_id == f->id && out->retry.attempts) {
            memset(out, 0, sizeof *out);
            event(c, NOTE(f->code == PERCH_CODE_OK ? PERCH_EVENT_PUBLISH_ACKED
                                           : PERCH_EVENT_PUBLISH_FAILED, f->code, 0), f->id);
            return;
        }
    }
}

perch_status_t perch_handle_input(perch_client_t *client, const uint8_t *bytes, size_t len,
                                  uint32_t now_ms)
{
    perch_frame_t f;
    uint8_t state = client->state;
    advance(client, now_ms);
    if (perch_decode(bytes, len, PERCH_ORIGIN_BROKER, &f) != PERCH_OK) {
        client->stats.malformed_frames++;
        return PERCH_ERR_MALFORMED;
    }
    if (f.type == PERCH_TYPE_CONNACK) {
        on_connack(client, &f);
    } else if (f.type == PERCH_TYPE_ERROR) {
        if (f.code != PERCH_CODE_UNKNOWN_SESSION) {
            event(client, NOTE(PERCH_EVENT_ERROR, f.code, f.ref_type), f.id);
        } else if (state >= S_ESTABLISHED && state <= S_ASLEEP) {
            /* Our address is unknown to the broker (NAT rebinding, or the
             * broker restarted): resume if we can, else connect afresh. */
            start_connect(client, client->session_token != 0);
        }
    } else if (state < S_ESTABLISHED || state > S_ASLEEP) {
        /* Not in a session: nothing else means anything. (Asleep counts: a
         * sleeper that still listens gets what the broker releases after
         * the PONG, e.g. messages held for a REGACK sent in the wake.) */
    } else if (f.type == PERCH_TYPE_PUBLISH) {
        on_deliver(client, &f);
    } else if (f.type == PERCH_TYPE_REGISTER) {
        on_broker_register(client, &f);
    } else if (f.type == PERCH_TYPE_PUBACK) {
        on_puback(client, &f);
    } else if (f.type == PERCH_TYPE_PONG) {
        client->ping.state = R_IDLE;
        if (state == S_WAKING) {
            client->state = S_ASLEEP;
            event(client, NOTE(PERCH_EVENT_WAKE_DONE, 0, 0), 0);
        }
    } else if (f.type == PERCH_TYPE_DISCONNECT) {
        if (state == S_AWAITING_SLEEP_ACK) {
            client->state = S_ASLEEP;
            client->ping.state = R_IDLE;
            event(client, NOTE(PERCH_EVENT_ASLEEP, 0, 0), 0);
        } else if (state != S_ASLEEP) {
            /* (Asleep: a duplicate of the sleep's answer.) */
            lose(client, PERCH_REASON_BY_BROKER);
        }
    } else {
        on_request_answer(client, &f); /* REGACK, SUBACK, UNSUBACK */
    }
    return PERCH_OK;
}

/* ------------------------------------------------------------------- time */

void perch_handle_timeout(perch_client_t *client, uint32_t now_ms)
{
    const perch_config_t *cfg = client->config;
    perch_retry_t *retry;
    uint32_t now;
    int lost = 0;
    unsigned n;
    advance(client, now_ms);
    now = client->now_ms;
    switch (client->state) {
    case S_RECONNECTING:
        if (reached(now, client->reconnect_at_ms)) {
            start_connect(client, 0);
        }
        return;
    case S_AWAITING_CONNACK:
    case S_AWAITING_SLEEP_ACK:
        lost = retry_expired(&client->connect_retry, now, cfg->retries_max);
        break;
    case S_ESTABLISHED:
    case S_WAKING:
        for (n = 0; (retry = request_retry(client, n)) != NULL; n++) {
            lost |= retry_expired(retry, now, cfg->retries_max);
        }
        if (client->state == S_ESTABLISHED && client->ping.state == R_IDLE &&
            cfg->keepalive_s &&
            reached(now, client->last_sent_ms + cfg->keepalive_s * 1000u)) {
            retry_now(&client->ping);
        }
        break;
    default:
        return;
    }
    if (lost) {
        lose(client, PERCH_REASON_TIMEOUT);
    }
}

int perch_poll_timeout(const perch_client_t *client, uint32_t *deadline_ms)
{
    const perch_config_t *cfg = client->config;
    /* request_retry takes a mutable client for its other callers; nothing
     * is written through it here. */
    perch_client_t *c = (perch_client_t *)(uintptr_t)client;
    const perch_retry_t *retry;
    uint32_t best = 0;
    int have = 0;
    unsigned n;
    switch (client->state) {
    case S_RECONNECTING:
        best = client->reconnect_at_ms;
        have = 1;
        break;
    case S_AWAITING_CONNACK:
    case S_AWAITING_SLEEP_ACK:
        earliest(&best, &have, client->connect_retry.state, client->connect_retry.timeout_ms);
        break;
    case S_ESTABLISHED:
    case S_WAKING:
        for (n = 0; (retry = request_retry(c, n)) != NULL; n++) {
            earliest(&best, &have, retry->state, retry->timeout_ms);
        }
        if (client->state == S_ESTABLISHED && client->ping.state == R_IDLE &&
            cfg->keepalive_s) {
            earliest(&best, &have, R_SENT, client->last_sent_ms + cfg->keepalive_s * 1000u);
        }
        break;
    default:
        break;
    }
    *deadline_ms = best;
    return have;
}

/* ---------------------------------------------------------------- outputs */

size_t perch_poll_transmit(perch_client_t *client, uint8_t *out, size_t cap)
{
    const perch_config_t *cfg = client->config;
    perch_frame_t f;
    perch_retry_t *retry = NULL;
    perch_outgoing_t *sent_once = NULL;
    uint8_t state = client->state;
    int popped_ack = 0;
    int32_t len;
    unsigned n;
    memset(&f, 0, sizeof f);
    if (state == S_AWAITING_CONNACK || state == S_AWAITING_SLEEP_ACK) {
        if (client->connect_retry.state != R_DUE) {
            return 0;
        }
        retry = &client->connect_retry;
        if (state == S_AWAITING_SLEEP_ACK) {
            f.type = PERCH_TYPE_DISCONNECT;
            f.flags = PERCH_FLAG_SLEEP;
            f.sleep_s = client->sleep_s;
        } else if (client->bits & B_RESUME) {
            f.type = PERCH_TYPE_RESUME;
            f.session_token = client->session_token;
        } else {
            f.type = PERCH_TYPE_CONNECT;
            if (cfg->clean_session && !(client->bits & B_CONNECTED_ONCE)) {
                f.flags = PERCH_FLAG_CLEAN_SESSION;
            }
            f.version = PERCH_PROTOCOL_VERSION;
            f.keepalive_s = cfg->keepalive_s;
            f.client_id.ptr = cfg->client_id;
            f.client_id.len = cfg->client_id_len;
        }
    } else if (state == S_CLOSING) {
        f.type = PERCH_TYPE_DISCONNECT;
    } else if (state < S_ESTABLISHED || state > S_ASLEEP) {
        return 0;
    } else if (client->acks_ring.count) {
        const perch_note_t *note = &client->acks[client->acks_ring.head];
        f.type = note->type;
        f.id = note->id;
        f.code = note->code;
        if (note->type == PERCH_TYPE_REGACK && note->code == PERCH_CODE_OK) {
            f.topic = note->id;
        }
        popped_ack = 1;
    } else if (state == S_ASLEEP) {
        return 0;
    } else {
        /* The first due request whose frame can be built. */
        for (n = 0; f.type == 0 && (retry = request_retry(client, n)) != NULL; n++) {
            unsigned k = n - cfg->names_max;
            if (retry->state != R_DUE) {
                continue;
            }
            if (n < cfg->names_max) {
                const perch_name_t *name = &cfg->names[n];
                f.type = name->op;
                if (name->op == PERCH_TYPE_SUBSCRIBE) {
                    f.flags = name->max_qos;
                }
                f.id = name->req_id;
                f.subject.ptr = name_slot(client, n);
                f.subject.len = name->len;
            } else if (k < cfg->outgoing_max) {
                perch_outgoing_t *o = &cfg->outgoing[k];
                f.topic = o->target;
                if (o->kind == O_SUBJECT) {
                    const perch_name_t *name = &cfg->names[o->target];
                    if (!topic_ready(name)) {
                        continue; /* sent once its REGISTER is answered */
                    }
                    f.topic = name->id;
                }
                f.type = PERCH_TYPE_PUBLISH;
                f.flags = (uint8_t)(publish_flags[o->kind] | o->qos);
                f.id = o->msg_id;
                f.payload.ptr = o->payload;
                f.payload.len = o->payload_len;
                if (!o->qos) {
                    sent_once = o;
                }
            } else {
                f.type = PERCH_TYPE_PING;
            }
        }
        if (f.type == 0) {
            return 0;
        }
    }
    len = perch_encode(&f, PERCH_ORIGIN_DEVICE, out, cap);
    if (len <= 0) {
        return 0; /* cap below frame_bytes_max: stays queued */
    }
    client->last_sent_ms = client->now_ms;
    if (sent_once) {
        memset(sent_once, 0, sizeof *sent_once); /* QoS 0: sent once, done */
    } else if (retry) {
        retry_sent(retry, client->now_ms, cfg->retry_interval_ms);
    }
    if (popped_ack) {
        client->acks_ring.head = (uint8_t)((client->acks_ring.head + 1u) % PERCH_ACKS_MAX);
        client->acks_ring.count--;
    }
    if (state == S_CLOSING) {
        client->state = S_CLOSED;
        event(client, NOTE(PERCH_EVENT_DISCONNECTED, 0, PERCH_REASON_CLOSED), 0);
    }
    return (size_t)len;
}

int perch_poll_event(perch_client_t *client, perch_event_t *ev)
{
    const perch_note_t *note = &client->events[client->events_ring.head];
    if (client->events_ring.count == 0) {
        return 0;
    }
    client->events_ring.head = (uint8_t)((client->events_ring.head + 1u) % PERCH_EVENTS_MAX);
    client->events_ring.count--;
    memset(ev, 0, sizeof *ev);
    ev->type = note->type;
    ev->code = note->code;
    ev->detail = note->detail;
    ev->id = note->id;
    if (note->type == PERCH_EVENT_MESSAGE) {
        unsigned slot = client->message_slot;
        /* Handed out: the next delivery may overwrite the view. */
        client->bits &= (uint8_t)~B_MESSAGE;
        ev->id = client->message_topic;
        ev->detail = client->message_flags;
        ev->reply_handle = client->message_reply_handle;
        ev->payload = client->message_payload;
        ev->payload_len = client->message_payload_len;
        if (slot != NO_SLOT && client->config->names[slot].kind != N_FREE &&
            client->config->names[slot].len) {
            ev->subject = name_slot(client, slot);
            ev->subject_len = client->config->names[slot].len;
        }
    }
    return 1;
}

int perch_is_connected(const perch_client_t *client)
{
    return client->state == S_ESTABLISHED || client->state == S_WAKING;
}

unsigned perch_pending_publishes(const perch_client_t *client)
{
    unsigned i;
    unsigned pending = 0;
    for (i = 0; i < client->config->outgoing_max; i++) {
        pending += client->config->outgoing[i].kind != O_FREE;
    }
    return pending;
}

uint32_t perch_session_token(const perch_client_t *client)
{
    return client->session_token;
}
