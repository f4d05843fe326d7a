/* SPDX-License-Identifier: Apache-2.0 */
/*
 * perch_device.h — the C client of the perch device protocol
 * (docs/device-protocol.md), for firmware.
 *
 * C99, no malloc, no global state, no I/O in the core. Three layers, each
 * usable alone:
 *
 *   1. Frames (wire.c): perch_decode / perch_encode between bytes and a
 *      perch_frame_t, plus varints. The layouts follow the spec; the flag and
 *      direction rules and every constant come from perch_wire_constants.h,
 *      which is generated from the Rust crate perch-wire.
 *   2. Framing (framing.c): CRC-16/IBM-3740 + COBS for serial lines with a
 *      resynchronising deframer, and the TCP varint length prefix.
 *   3. The client (client.c): a sans-IO state machine. Inputs take the time:
 *      perch_handle_input (one received frame), perch_handle_timeout, and the
 *      calls perch_connect, perch_publish, ...; outputs are polled:
 *      perch_poll_transmit (the next frame to send), perch_poll_event,
 *      perch_poll_timeout. It owns no socket, no clock and no buffer of its
 *      own: the caller supplies every table in perch_config_t.
 *
 * perch_run (run.c) is an optional blocking driver over a perch_transport_t
 * (send and receive function pointers and a millisecond clock).
 *
 * Conventions: every pointer argument must be non-NULL unless the function
 * says otherwise; lengths are bytes; times are milliseconds from any origin
 * of the caller's choice, as uint32_t that may wrap (intervals must stay
 * below 2^31 ms). Functions returning perch_status_t change nothing when they
 * return an error. Nothing here is thread-safe: one client, one caller.
 *
 * What it does not do: open sockets or drive radios (the application's
 * transport does), persist QoS 1 state across a reboot, discover the broker,
 * send a will, or check subject syntax (the broker answers INVALID_SUBJECT).
 */
#ifndef PERCH_DEVICE_H
#define PERCH_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "perch_wire_constants.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ status */

/** Results. Negative values are errors; each says whose fault it is. */
typedef enum perch_status {
    PERCH_OK = 0,
    /** The peer's bytes are not a valid frame (the peer's fault). */
    PERCH_ERR_MALFORMED = -1,
    /** A client id, subject, filter or payload is over its limit, or would
     *  not fit the caller's frame_bytes_max / name_bytes_max (the caller's). */
    PERCH_ERR_TOO_LARGE = -2,
    /** The output buffer is too small for the frame (the caller's). */
    PERCH_ERR_BUFFER = -3,
    /** A field holds a value the wire cannot carry, e.g. QoS 2 (the caller's). */
    PERCH_ERR_INVALID = -4,
    /** outgoing_max publishes are already queued or unacknowledged, or (QoS
     *  1) the next msg id would be 8 past the oldest unacknowledged one (what
     *  keeps the broker's 16-id de-duplication exact): wait for
     *  PERCH_EVENT_PUBLISH_ACKED / _FAILED or for the queue to drain. */
    PERCH_ERR_INFLIGHT_FULL = -5,
    /** names_max subjects and filters are already held (topic ids are kept
     *  for the session: use predefined ids for the long tail). */
    PERCH_ERR_NAMES_FULL = -6,
    /** The call needs a started client (publish) or an established or
     *  sleeping session (sleep, wake). */
    PERCH_ERR_NOT_CONNECTED = -7,
    /** The transport's send or receive failed (perch_run only). */
    PERCH_ERR_TRANSPORT = -8
} perch_status_t;

/* ------------------------------------------------------------------ frames */

/** Who sent the bytes: the PUBLISH layout and the valid flags depend on it. */
typedef enum perch_origin {
    PERCH_ORIGIN_DEVICE = 0,
    PERCH_ORIGIN_BROKER = 1
} perch_origin_t;

/** Bytes borrowed from a frame buffer (decode) or from the caller (encode). */
typedef struct perch_bytes {
    const uint8_t *ptr;
    size_t len;
} perch_bytes_t;

/**
 * One frame. `type` and `flags` are the header's two nibbles as on the wire
 * (PERCH_TYPE_*, PERCH_FLAG_*); the other fields are used by the types named
 * beside them and are 0 / empty otherwise:
 *
 *   version       CONNECT
 *   will_qos      CONNECT with PERCH_FLAG_WILL (0 or 1)
 *   code          CONNACK PUBACK REGACK SUBACK UNSUBACK ERROR (PERCH_CODE_*)
 *   ref_type      ERROR: the refused frame's type, 0 if unknown (0..15)
 *   id            msg_id: PUBLISH with PERCH_FLAG_QOS1, PUBACK;
 *                 req_id: REGISTER (device), REGACK, SUBSCRIBE, SUBACK,
 *                 UNSUBSCRIBE, UNSUBACK; the topic of a broker REGISTER;
 *                 ref_id: ERROR
 *   topic         PUBLISH (a reply handle when a device sets PERCH_FLAG_REPLY),
 *                 REGACK
 *   reply_handle  PUBLISH from the broker with PERCH_FLAG_REPLY
 *   keepalive_s   CONNECT
 *   sleep_s       DISCONNECT with PERCH_FLAG_SLEEP
 *   session_token CONNACK, RESUME
 *   client_id     CONNECT, connectionless PUBLISH (qos bits = 3)
 *   subject       REGISTER subject, SUBSCRIBE/UNSUBSCRIBE filter,
 *                 CONNECT will subject
 *   payload       PUBLISH payload, CONNECT will payload
 */
typedef struct perch_frame {
    uint8_t type;
    uint8_t flags;
    uint8_t version;
    uint8_t will_qos;
    uint8_t code;
    uint8_t ref_type;
    uint32_t id;
    uint32_t topic;
    uint32_t reply_handle;
    uint32_t keepalive_s;
    uint32_t sleep_s;
    uint32_t session_token;
    perch_bytes_t client_id;
    perch_bytes_t subject;
    perch_bytes_t payload;
} perch_frame_t;

/**
 * Decodes exactly one frame: a UDP datagram, a TCP frame without its prefix,
 * or a deframed serial frame without its CRC.
 * Pre: `bytes` readable for `len` bytes (may be NULL when len is 0).
 * Post: PERCH_OK and `*frame` filled, its byte fields pointing into `bytes`;
 * or PERCH_ERR_MALFORMED / PERCH_ERR_TOO_LARGE (an over-long client id or
 * subject), `*frame` then unspecified. Never reads outside `bytes`.
 */
perch_status_t perch_decode(const uint8_t *bytes, size_t len, perch_origin_t origin,
                            perch_frame_t *frame);

/**
 * Encodes `frame` as sent by `origin` at the start of `out`.
 * Pre: the byte fields the type uses are readable; `out` writable for `cap`.
 * Returns the frame's length (> 0), PERCH_ERR_INVALID (flags or a field the
 * wire cannot carry from that origin), PERCH_ERR_TOO_LARGE (client id over 64
 * bytes, subject over 255) or PERCH_ERR_BUFFER (cap too small; `out` then
 * holds garbage). What it accepts, perch_decode returns unchanged.
 */
int32_t perch_encode(const perch_frame_t *frame, perch_origin_t origin, uint8_t *out,
                     size_t cap);

/**
 * Encodes a connectionless PUBLISH (qos 3): no session needed, the broker
 * never answers. `topic` is a predefined id. Returns the length or an error
 * as perch_encode. Pre: client_id 1..64 bytes.
 */
int32_t perch_encode_connectionless(const uint8_t *client_id, size_t client_id_len,
                                    uint32_t topic, const uint8_t *payload,
                                    size_t payload_len, uint8_t *out, size_t cap);

/** Bytes `value` takes as a varint: 1 to 5. */
size_t perch_varint_len(uint32_t value);
/** Writes `value` as a minimal varint; returns its length, 0 if cap is short. */
size_t perch_varint_encode(uint32_t value, uint8_t *out, size_t cap);
/** Reads a varint from the start of `in`: its length (1..5), or 0 when it is
 *  truncated, over 5 bytes, over UINT32_MAX or padded (non-minimal). */
size_t perch_varint_decode(const uint8_t *in, size_t len, uint32_t *value);

/* ----------------------------------------------------------------- framing */

/** CRC-16/IBM-3740 (poly 0x1021, init 0xFFFF, unreflected) of `data`. */
uint16_t perch_crc16(const uint8_t *data, size_t len);

/** Bytes to leave free before a frame to COBS-encode it in place. */
#define PERCH_SERIAL_HEADROOM(len) (1u + ((len) + 2u) / 254u)

/**
 * Serial framing: writes COBS(frame || crc16_le) and the 0x00 delimiter.
 * Pre: `out` holds cap >= PERCH_SERIAL_BYTES_MAX(len) bytes. `out` may not
 * overlap `frame`, except for in-place use with
 * `out + PERCH_SERIAL_HEADROOM(len) == frame`.
 * Returns the bytes written, or PERCH_ERR_BUFFER.
 */
int32_t perch_serial_encode(const uint8_t *frame, size_t len, uint8_t *out, size_t cap);

/** A streaming serial decoder over the caller's buffer. Fields are private
 *  except the three counters, which wrap. */
typedef struct perch_deframer {
    uint8_t *buf;
    size_t cap;
    size_t len;
    uint8_t discarding;
    /** Frames returned with a good CRC. */
    uint32_t frames;
    /** Runs dropped: COBS or CRC failed, or shorter than a header + CRC. */
    uint32_t corrupt_dropped;
    /** Runs longer than `cap`, dropped up to the next 0x00. */
    uint32_t oversize_dropped;
} perch_deframer_t;

/** Pre: `buf` holds `cap` bytes (PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX holds any
 *  frame up to PERCH_FRAME_BYTES_MAX) and outlives the deframer. */
void perch_deframer_init(perch_deframer_t *deframer, uint8_t *buf, size_t cap);

/**
 * Consumes `in` up to and including the next good frame's delimiter.
 * Returns that frame's length (> 0) with `*frame` pointing at it (CRC
 * removed, in the deframer's buffer, valid until the next feed), or 0 once
 * all of `in` was consumed without completing a good frame. `*consumed` is
 * the number of input bytes used; feed the rest again. Corrupt and oversize
 * runs are dropped and counted; empty runs (0x00 0x00) are idle filler.
 */
size_t perch_deframer_feed(perch_deframer_t *deframer, const uint8_t *in, size_t len,
                           size_t *consumed, const uint8_t **frame);

/** Writes the TCP length prefix of a `frame_len`-byte frame (1..65535) into
 *  `out` (PERCH_TCP_PREFIX_BYTES_MAX bytes); returns its length, 0 if out of
 *  range. */
size_t perch_tcp_prefix(size_t frame_len, uint8_t *out);

/**
 * Splits the first frame off a received TCP byte stream. Returns the bytes to
 * drop (prefix + frame, > 0) and sets `*frame_offset`/`*frame_len`; 0 when
 * `buf` does not hold a whole frame yet; PERCH_ERR_MALFORMED when the prefix
 * is 0, over 65535 or padded: the stream cannot resynchronise, close it.
 */
int32_t perch_tcp_split(const uint8_t *buf, size_t len, size_t *frame_offset,
                        size_t *frame_len);

/* ------------------------------------------------------------------ client */

/** Retransmission state of one request. Private. */
typedef struct perch_retry {
    uint32_t timeout_ms;
    uint8_t attempts;
    uint8_t state;
} perch_retry_t;

/** One subject (a topic id, registered by either side) or one subscription
 *  filter. Caller-allocated, private. */
typedef struct perch_name {
    uint32_t id;
    uint32_t req_id;
    perch_retry_t retry;
    uint8_t kind;
    uint8_t op;
    uint8_t len;
    uint8_t max_qos;
} perch_name_t;

/** One queued or unacknowledged publish. Caller-allocated, private. */
typedef struct perch_outgoing {
    const uint8_t *payload;
    uint32_t msg_id;
    uint32_t target;
    perch_retry_t retry;
    uint16_t payload_len;
    uint8_t kind;
    uint8_t qos;
} perch_outgoing_t;

/** Bytes of `name_bytes` for `names_max` slots of `name_bytes_max`. */
#define PERCH_NAME_BYTES(names_max, name_bytes_max) \
    ((size_t)(names_max) * (size_t)(name_bytes_max))

/**
 * Settings and the caller's storage. The client keeps a pointer to this
 * struct: it must stay valid and unchanged for the client's life.
 * perch_config_init fills the defaults; the storage fields are the caller's.
 */
typedef struct perch_config {
    /** 1..PERCH_CLIENT_ID_BYTES_MAX bytes, valid for the client's life. */
    const uint8_t *client_id;
    uint8_t client_id_len;
    /** Start with a fresh session on the first connect (reconnects never
     *  clean: they find the session if the broker still has it). Default 1. */
    uint8_t clean_session;
    /** Retransmissions of one request before the connection counts as lost.
     *  Default 4. */
    uint8_t retries_max;
    /** 0 disables keepalive; else PING when nothing was sent this long
     *  (<= 2000000). Default 60. */
    uint32_t keepalive_s;
    /** The first retransmission timeout (1..2^25); doubles per retry up to
     *  32x. Default 1000. */
    uint32_t retry_interval_ms;
    /** The first wait before reconnecting, doubling per failed attempt up to
     *  reconnect_backoff_max_ms (<= 2^30). Defaults 1000 and 60000. */
    uint32_t reconnect_backoff_min_ms;
    uint32_t reconnect_backoff_max_ms;
    /** The size (>= 16) of the buffers given to perch_poll_transmit and of
     *  received frames: publishes that would not fit are refused
     *  (TOO_LARGE). Default PERCH_FRAME_BYTES_MAX. */
    uint16_t frame_bytes_max;
    /** Subjects published to (registered once per session, by us or by the
     *  broker) and subscription filters share one table; the subjects and
     *  filters are copied into `name_bytes`, one slot of name_bytes_max
     *  (<= 255, and <= frame_bytes_max - 6) bytes per entry: PERCH_NAME_BYTES(names_max, name_bytes_max). */
    perch_name_t *names;
    uint8_t names_max;
    uint8_t name_bytes_max;
    uint8_t *name_bytes;
    /** Publishes queued or awaiting PUBACK: 1..PERCH_DEDUP_WINDOW_MSG_IDS. */
    perch_outgoing_t *outgoing;
    uint8_t outgoing_max;
} perch_config_t;

/** Why a connection ended (PERCH_EVENT_DISCONNECTED's `detail`). */
typedef enum perch_reason {
    /** A request went unanswered through every retry: reconnecting. */
    PERCH_REASON_TIMEOUT = 1,
    /** The broker sent DISCONNECT: reconnecting. */
    PERCH_REASON_BY_BROKER = 2,
    /** CONNACK refused (`code`). NOT_PERMITTED and UNSUPPORTED_VERSION are
     *  final (the client is closed); other codes are retried with backoff. */
    PERCH_REASON_REFUSED = 3,
    /** perch_disconnect. */
    PERCH_REASON_CLOSED = 4
} perch_reason_t;

typedef enum perch_event_type {
    PERCH_EVENT_NONE = 0,
    /** CONNACK OK; `detail` = session_present. When 0 the client registers
     *  and subscribes again by itself. */
    PERCH_EVENT_CONNECTED,
    /** A message: `id` = topic id, `detail` = its PERCH_FLAG_PREDEFINED /
     *  PERCH_FLAG_REPLY bits, `reply_handle`, `subject` (NULL for predefined
     *  ids or a subject longer than name_bytes_max) and `payload`. */
    PERCH_EVENT_MESSAGE,
    /** A QoS 1 publish was acknowledged OK: `id` = its msg id. */
    PERCH_EVENT_PUBLISH_ACKED,
    /** A publish was refused: `id` = msg id (0 for QoS 0), `code`. */
    PERCH_EVENT_PUBLISH_FAILED,
    /** SUBACK: `id` = req_id, `code` (not OK: the subscription is dropped). */
    PERCH_EVENT_SUBSCRIBED,
    /** UNSUBACK: `id` = req_id, `code`. */
    PERCH_EVENT_UNSUBSCRIBED,
    /** ERROR from the broker (not UNKNOWN_SESSION, which the client answers
     *  with RESUME): `code`, `detail` = ref_type, `id` = ref_id. */
    PERCH_EVENT_ERROR,
    /** The broker confirmed the sleep: the radio may go off. */
    PERCH_EVENT_ASLEEP,
    /** After perch_wake: the buffered messages were delivered (PONG). */
    PERCH_EVENT_WAKE_DONE,
    /** The connection ended: `detail` = perch_reason_t, `code` if refused. */
    PERCH_EVENT_DISCONNECTED
} perch_event_type_t;

typedef struct perch_event {
    uint8_t type;
    uint8_t code;
    uint8_t detail;
    uint32_t id;
    uint32_t reply_handle;
    /** MESSAGE only. `payload` points into the buffer given to
     *  perch_handle_input, `subject` into config->name_bytes: valid until the
     *  next call that takes the client. */
    const uint8_t *subject;
    size_t subject_len;
    const uint8_t *payload;
    size_t payload_len;
} perch_event_t;

/** Counters of what the client dropped or absorbed; they wrap. */
typedef struct perch_stats {
    /** Frames that did not decode. */
    uint32_t malformed_frames;
    /** QoS 1 deliveries seen again (acknowledged, not delivered twice). */
    uint32_t duplicates;
    /** QoS 0 deliveries dropped: a message not yet polled, or an unknown
     *  topic. (A QoS 1 delivery is left unacknowledged instead.) */
    uint32_t messages_dropped;
    /** Events or acks dropped because PERCH_EVENTS_MAX / PERCH_ACKS_MAX
     *  were waiting. */
    uint32_t queue_dropped;
    /** Connections lost (timeouts and broker disconnects). */
    uint32_t connections_lost;
} perch_stats_t;

/** Non-message events held until perch_poll_event. */
#define PERCH_EVENTS_MAX 6u
/** PUBACKs/REGACKs held until perch_poll_transmit. When full an ack is
 *  dropped: the broker retransmits and the client acks the copy. */
#define PERCH_ACKS_MAX 4u

/** A queued event or ack. Private. */
typedef struct perch_note {
    uint8_t type;
    uint8_t code;
    uint8_t detail;
    uint32_t id;
} perch_note_t;

/** The position of a ring of notes. Private. */
typedef struct perch_ring {
    uint8_t head;
    uint8_t count;
} perch_ring_t;

/** The client. Caller-allocated (any storage class); every field is private
 *  except `stats`. Use only through the functions below. */
typedef struct perch_client {
    /* Small, hot fields first: Thumb's 16-bit loads reach only the first
     * 32 (bytes) / 128 (words) bytes of a struct. */
    const perch_config_t *config;
    uint8_t state;
    uint8_t bits;
    perch_ring_t events_ring;
    perch_ring_t acks_ring;
    uint8_t seen_count;
    uint8_t seen_next;
    uint32_t now_ms;
    perch_retry_t connect_retry;
    perch_retry_t ping;
    uint32_t reconnect_at_ms;
    uint32_t reconnect_backoff_ms;
    uint32_t session_token;
    uint32_t last_sent_ms;
    uint32_t sleep_s;
    uint32_t next_msg_id;
    uint32_t next_req_id;
    /* The one message not yet polled: a view of the input buffer. */
    const uint8_t *message_payload;
    uint32_t message_topic;
    uint32_t message_reply_handle;
    uint16_t message_payload_len;
    uint8_t message_flags;
    uint8_t message_slot;
    perch_stats_t stats;
    perch_note_t events[PERCH_EVENTS_MAX];
    perch_note_t acks[PERCH_ACKS_MAX];
    uint32_t seen_msg_ids[PERCH_DEDUP_WINDOW_MSG_IDS];
} perch_client_t;

/** Fills `config` with the defaults above for `client_id` (a NUL-terminated
 *  string valid for the client's life); the storage fields are zeroed. */
void perch_config_init(perch_config_t *config, const char *client_id);

/**
 * Prepares `client` (no I/O) and clears the tables. Pre: `config` filled
 * and valid for the client's life; `outgoing` (and `names`, `name_bytes`
 * when their sizes are not 0) point at tables of the declared sizes. Returns
 * PERCH_OK, or PERCH_ERR_INVALID for a config out of the ranges above.
 */
perch_status_t perch_client_init(perch_client_t *client, const perch_config_t *config);

/** Starts connecting: CONNECT at the next perch_poll_transmit. Also
 *  restarts a closed client, and ends sleeping for good (CONNECT without
 *  clean_session finds the sleeping session). */
void perch_connect(perch_client_t *client, uint32_t now_ms);

/** The source address changed (modem re-attached): continue the session with
 *  RESUME (CONNECT if there is no session token yet). */
void perch_resume(perch_client_t *client, uint32_t now_ms);

/**
 * Queues a publish to `subject` (copied; registered once by REGISTER, then
 * sent by id). Pre: the client was connected (perch_connect); `qos` 0 or 1;
 * `payload` stays valid and unchanged until the publish leaves the queue:
 * PERCH_EVENT_PUBLISH_ACKED / _FAILED for QoS 1, the perch_poll_transmit
 * that sends it for QoS 0. `*msg_id` (may be NULL) gets the QoS 1 msg id or 0.
 */
perch_status_t perch_publish(perch_client_t *client, const uint8_t *subject,
                             size_t subject_len, const uint8_t *payload, size_t payload_len,
                             uint8_t qos, uint32_t now_ms, uint32_t *msg_id);

/** Like perch_publish to a topic id: a predefined one (`predefined` 1) or
 *  one known to be registered in this session (0; e.g. a message's id). */
perch_status_t perch_publish_id(perch_client_t *client, uint8_t predefined,
                                uint32_t topic_id, const uint8_t *payload,
                                size_t payload_len, uint8_t qos, uint32_t now_ms,
                                uint32_t *msg_id);

/** Answers a request (a message with PERCH_FLAG_REPLY) at QoS 0. Same
 *  payload precondition as perch_publish. A reply still queued when the
 *  session is lost fails with UNKNOWN_SESSION. */
perch_status_t perch_reply(perch_client_t *client, uint32_t reply_handle,
                           const uint8_t *payload, size_t payload_len, uint32_t now_ms);

/** Subscribes to a NATS filter (copied); `*req_id` (may be NULL) is the id of
 *  its PERCH_EVENT_SUBSCRIBED. Subscribing to a held filter updates its QoS.
 *  Subscriptions are resent by the client when a session is not kept. */
perch_status_t perch_subscribe(perch_client_t *client, const uint8_t *filter, size_t len,
                               uint8_t max_qos, uint32_t now_ms, uint32_t *req_id);

/** Drops a subscription; `*req_id` (may be NULL) names its
 *  PERCH_EVENT_UNSUBSCRIBED. A filter not held is sent anyway (OK). */
perch_status_t perch_unsubscribe(perch_client_t *client, const uint8_t *filter, size_t len,
                                 uint32_t now_ms, uint32_t *req_id);

/** Asks the broker to keep the session asleep for `sleep_s` seconds and
 *  buffer its messages; PERCH_EVENT_ASLEEP follows. Call perch_wake before
 *  1.5 x sleep_s. Pre: connected (else PERCH_ERR_NOT_CONNECTED). */
perch_status_t perch_sleep(perch_client_t *client, uint32_t sleep_s, uint32_t now_ms);

/** Wakes a sleeping session: PING, the buffered messages, then
 *  PERCH_EVENT_WAKE_DONE; the session is asleep again afterwards
 *  (perch_connect ends sleeping). Pre: asleep (else NOT_CONNECTED). */
perch_status_t perch_wake(perch_client_t *client, uint32_t now_ms);

/** Ends the session: DISCONNECT at the next perch_poll_transmit, then
 *  PERCH_EVENT_DISCONNECTED (CLOSED). */
void perch_disconnect(perch_client_t *client, uint32_t now_ms);

/**
 * One frame from the broker (a UDP datagram, a TCP frame without prefix, a
 * deframed serial frame). Pre: after it, poll every event before `bytes` is
 * reused: a MESSAGE event points into it. Returns PERCH_OK or
 * PERCH_ERR_MALFORMED (dropped and counted).
 */
perch_status_t perch_handle_input(perch_client_t *client, const uint8_t *bytes, size_t len,
                                  uint32_t now_ms);

/** Time passed: retransmits, keepalive PINGs, reconnects. Call it at (or
 *  after) perch_poll_timeout's deadline; calling it early is harmless. */
void perch_handle_timeout(perch_client_t *client, uint32_t now_ms);

/**
 * Writes the next frame to send into `out` and returns its length, or 0 when
 * there is nothing to send. Pre: cap >= config->frame_bytes_max (a frame that
 * does not fit stays queued and 0 is returned). Call it until it returns 0
 * after every input.
 */
size_t perch_poll_transmit(perch_client_t *client, uint8_t *out, size_t cap);

/** The next event, 1 if one was written to `*event`, else 0. */
int perch_poll_event(perch_client_t *client, perch_event_t *event);

/** 1 and the earliest time perch_handle_timeout has work in `*deadline_ms`,
 *  or 0 when nothing is scheduled (idle, asleep or closed). */
int perch_poll_timeout(const perch_client_t *client, uint32_t *deadline_ms);

/** 1 while publishes flow: established, or awake from sleep. */
int perch_is_connected(const perch_client_t *client);

/** Publishes queued or awaiting their PUBACK. */
unsigned perch_pending_publishes(const perch_client_t *client);

/** The session token (0 before the first CONNACK). */
uint32_t perch_session_token(const perch_client_t *client);

/* --------------------------------------------------------------- transport */

/** Frames in and out, and a clock: what perch_run drives the client over. */
typedef struct perch_transport {
    void *context;
    /** Sends one frame. 0 on success (a lost frame is the retries' business),
     *  negative on a failure that should stop perch_run. */
    int32_t (*send)(void *context, const uint8_t *frame, size_t len);
    /** Waits up to timeout_ms for one frame and writes it to `buf`: its
     *  length, 0 when none came, negative on failure. */
    int32_t (*recv)(void *context, uint8_t *buf, size_t cap, uint32_t timeout_ms);
    /** Milliseconds since any fixed origin; may wrap. */
    uint32_t (*now_ms)(void *context);
} perch_transport_t;

/** Called by perch_run for every event; non-zero stops the run. */
typedef int (*perch_event_fn)(void *context, perch_client_t *client,
                              const perch_event_t *event);

/**
 * Drives `client` over `transport` until `on_event` (may be NULL) returns
 * non-zero (returns 1) or `timeout_ms` passes (returns 0): sends what the
 * client has, hands out events, waits for a frame or the client's next timer.
 * `buf` (cap >= config->frame_bytes_max) serves both directions. Returns
 * PERCH_ERR_TRANSPORT when the transport fails.
 */
int perch_run(perch_client_t *client, const perch_transport_t *transport, uint8_t *buf,
              size_t cap, uint32_t timeout_ms, perch_event_fn on_event, void *context);

#ifdef __cplusplus
}
#endif

#endif /* PERCH_DEVICE_H */
