/* SPDX-License-Identifier: Apache-2.0 */
/*
 * wire.c — bytes <-> perch_frame_t, and varints (docs/device-protocol.md
 * sections 1 and 2).
 *
 * Owns the byte layouts and nothing else: no state, no clock, no I/O. One
 * table of field layouts drives both the decoder and the encoder, so the two
 * cannot disagree about where a field is; the flag and direction rules are
 * the generated PERCH_VALID_FLAGS_FROM_* tables (perch-wire's own decoder
 * asked about every header byte). Every read is bounds-checked against the
 * end of the input; no arithmetic on peer values can overflow.
 */
#include <stddef.h>
#include <string.h>

#include "perch_device.h"

/* A layout is a string of ops, one byte each: a field, how it is read, and
 * which flag bit (if any) makes it present. */
enum field {
    F_VERSION,
    F_WILL_QOS,
    F_CODE,
    F_REF_TYPE, /* u8 fields end here */
    F_ID,
    F_TOPIC,
    F_REPLY_HANDLE,
    F_KEEPALIVE,
    F_SLEEP,
    F_TOKEN, /* u32 fields end here */
    F_CLIENT_ID,
    F_SUBJECT,
    F_PAYLOAD
};
#define FIELD_MASK 0x0Fu
/* u32 fields: a u32le instead of a varint; byte fields: every remaining byte
 * instead of a varint length and that many bytes. */
#define ALT 0x10u
#define IF_SHIFT 6
#define IF_B0 (1u << IF_SHIFT)
#define IF_B1 (2u << IF_SHIFT)
#define IF_B3 (3u << IF_SHIFT)

static const uint8_t field_offset[] = {
    offsetof(perch_frame_t, version),      offsetof(perch_frame_t, will_qos),
    offsetof(perch_frame_t, code),         offsetof(perch_frame_t, ref_type),
    offsetof(perch_frame_t, id),           offsetof(perch_frame_t, topic),
    offsetof(perch_frame_t, reply_handle), offsetof(perch_frame_t, keepalive_s),
    offsetof(perch_frame_t, sleep_s),      offsetof(perch_frame_t, session_token),
    offsetof(perch_frame_t, client_id),    offsetof(perch_frame_t, subject),
    offsetof(perch_frame_t, payload),
};

/* Layout indexes beyond the 16 frame types: PUBLISH's other two shapes. */
#define L_CONNECTIONLESS 16
#define L_DELIVER 17

static const uint8_t ops[] = {
    /* 0x1 CONNECT */
    F_VERSION, F_KEEPALIVE, F_CLIENT_ID, IF_B1 | F_WILL_QOS, IF_B1 | F_SUBJECT,
    IF_B1 | ALT | F_PAYLOAD,
    /* 0x2 CONNACK */
    F_CODE, ALT | F_TOKEN,
    /* 0x3 PUBLISH, device -> broker, qos 0/1 */
    F_TOPIC, IF_B0 | F_ID, ALT | F_PAYLOAD,
    /* 0x4 PUBACK */
    F_ID, F_CODE,
    /* 0x5 REGISTER */
    F_ID, ALT | F_SUBJECT,
    /* 0x6 REGACK */
    F_ID, F_TOPIC, F_CODE,
    /* 0x7 SUBSCRIBE */
    F_ID, ALT | F_SUBJECT,
    /* 0x8 SUBACK */
    F_ID, F_CODE,
    /* 0x9 UNSUBSCRIBE */
    F_ID, ALT | F_SUBJECT,
    /* 0xA UNSUBACK */
    F_ID, F_CODE,
    /* 0xB PING, 0xC PONG: empty */
    /* 0xD DISCONNECT */
    IF_B0 | F_SLEEP,
    /* 0xE RESUME */
    ALT | F_TOKEN,
    /* 0xF ERROR */
    F_CODE, F_REF_TYPE, F_ID,
    /* PUBLISH, connectionless (qos 3) */
    F_CLIENT_ID, F_TOPIC, ALT | F_PAYLOAD,
    /* PUBLISH, broker -> device */
    F_TOPIC, IF_B3 | F_REPLY_HANDLE, IF_B0 | F_ID, ALT | F_PAYLOAD,
};

/* Where each layout starts in `ops`; layout i ends where i + 1 starts. */
static const uint8_t layout_start[] = {
    0, 0, 6, 8, 11, 13, 15, 18, 20, 22, 24, 26, 26, 26, 27, 28, 31, 34, 38,
};

/* 38 ops: a layout edited without its start table fails to compile. */
typedef char ops_match_layout_start[sizeof ops == 38 && sizeof layout_start == 19 ? 1 : -1];

static const uint16_t valid_flags[2][16] = {
    PERCH_VALID_FLAGS_FROM_DEVICE,
    PERCH_VALID_FLAGS_FROM_BROKER,
};

/* The layout of a header, or -1 when the type may not come from `origin`
 * with these flags. */
static int layout_of(uint8_t type, uint8_t flags, perch_origin_t origin)
{
    if (type > 15 || flags > 15 || !((valid_flags[origin][type] >> flags) & 1u)) {
        return -1;
    }
    if (type == PERCH_TYPE_PUBLISH) {
        if ((flags & PERCH_FLAG_QOS_MASK) == PERCH_QOS_CONNECTIONLESS) {
            return L_CONNECTIONLESS;
        }
        if (origin == PERCH_ORIGIN_BROKER) {
            return L_DELIVER;
        }
    }
    return type;
}

static int flag_condition_holds(uint8_t op, uint8_t flags)
{
    static const uint8_t condition_bit[4] = {0, 1u, 2u, 8u};
    uint8_t bit = condition_bit[op >> IF_SHIFT];
    return bit == 0 || (flags & bit) != 0;
}

/* Longest value a byte field may hold (payloads: no protocol limit). */
static size_t bytes_max_of(uint8_t field)
{
    if (field == F_CLIENT_ID) {
        return PERCH_CLIENT_ID_BYTES_MAX;
    }
    if (field == F_SUBJECT) {
        return PERCH_SUBJECT_BYTES_MAX;
    }
    return (size_t)-1;
}

size_t perch_varint_len(uint32_t value)
{
    size_t len = 1;
    while (value >= 0x80u) {
        value >>= 7;
        len++;
    }
    return len;
}

size_t perch_varint_encode(uint32_t value, uint8_t *out, size_t cap)
{
    size_t len = perch_varint_len(value);
    size_t i;
    if (cap < len) {
        return 0;
    }
    for (i = 0; i + 1 < len; i++) {
        out[i] = (uint8_t)(value | 0x80u);
        value >>= 7;
    }
    out[i] = (uint8_t)value;
    return len;
}

size_t perch_varint_decode(const uint8_t *in, size_t len, uint32_t *value)
{
    uint32_t result = 0;
    size_t i;
    for (i = 0; i < len && i < PERCH_VARINT_BYTES_MAX; i++) {
        uint8_t byte = in[i];
        /* The fifth byte carries the top 4 bits and no continuation. */
        if (i == PERCH_VARINT_BYTES_MAX - 1 && byte > 0x0Fu) {
            return 0;
        }
        result |= (uint32_t)(byte & 0x7Fu) << (7 * i);
        if ((byte & 0x80u) == 0) {
            if (byte == 0 && i > 0) {
                return 0; /* padded: not the one encoding of this value */
            }
            *value = result;
            return i + 1;
        }
    }
    return 0;
}

/* One walk of a layout for both directions: `writing` encodes `*frame` into
 * `buf`, else decodes `buf` into `*frame` (and never writes `buf` or reads
 * `*frame`'s old contents). Returns the frame's length or an error. */
static int32_t codec(perch_frame_t *frame, uint8_t *buf, size_t len, perch_origin_t origin,
                     int writing)
{
    /* Running out of bytes is the peer's fault when reading, the caller's
     * buffer when writing. */
    int32_t short_of_bytes = writing ? PERCH_ERR_BUFFER : PERCH_ERR_MALFORMED;
    size_t at = 1;
    int layout;
    uint8_t i;
    if (len == 0) {
        return short_of_bytes;
    }
    if (!writing) {
        memset(frame, 0, sizeof *frame);
        frame->type = (uint8_t)(buf[0] >> 4);
        frame->flags = (uint8_t)(buf[0] & 0x0Fu);
    }
    layout = layout_of(frame->type, frame->flags, origin);
    if (layout < 0) {
        return writing ? PERCH_ERR_INVALID : PERCH_ERR_MALFORMED;
    }
    if (writing) {
        if (frame->will_qos > 1 || frame->ref_type > 15) {
            return PERCH_ERR_INVALID;
        }
        buf[0] = (uint8_t)(frame->type << 4 | frame->flags);
    }
    for (i = layout_start[layout]; i < layout_start[layout + 1]; i++) {
        uint8_t op = ops[i];
        uint8_t field = (uint8_t)(op & FIELD_MASK);
        uint8_t *slot = (uint8_t *)frame + field_offset[field];
        size_t left = len - at;
        size_t used;
        if (!flag_condition_holds(op, frame->flags)) {
            continue;
        }
        if (field <= F_REF_TYPE) {
            if (left == 0) {
                return short_of_bytes;
            }
            if (writing) {
                buf[at] = *slot;
            } else {
                *slot = buf[at];
            }
            at++;
        } else if (field <= F_TOKEN) {
            uint32_t value = 0;
            if (writing) {
                memcpy(&value, slot, sizeof value);
            }
            if (op & ALT) {
                uint8_t k;
                if (left < 4) {
                    return short_of_bytes;
                }
                for (k = 0; k < 4; k++) {
                    if (writing) {
                        buf[at + k] = (uint8_t)(value >> (8 * k));
                    } else {
                        value |= (uint32_t)buf[at + k] << (8 * k);
                    }
                }
                used = 4;
            } else {
                used = writing ? perch_varint_encode(value, buf + at, left)
                               : perch_varint_decode(buf + at, left, &value);
                if (used == 0) {
                    return short_of_bytes;
                }
            }
            at += used;
            if (!writing) {
                memcpy(slot, &value, sizeof value);
            }
        } else {
            perch_bytes_t value;
            memcpy(&value, slot, sizeof value);
            if (!writing) {
                value.len = left;
            }
            if (!(op & ALT)) {
                uint32_t value_len = (uint32_t)value.len;
                used = writing ? perch_varint_encode(value_len, buf + at, left)
                               : perch_varint_decode(buf + at, left, &value_len);
                if (used == 0) {
                    return short_of_bytes;
                }
                at += used;
                left -= used;
                if (!writing) {
                    value.len = value_len;
                }
            }
            if (value.len > bytes_max_of(field)) {
                return PERCH_ERR_TOO_LARGE;
            }
            if (value.len > left) {
                return short_of_bytes;
            }
            if (writing) {
                if (value.len > 0) {
                    memcpy(buf + at, value.ptr, value.len);
                }
            } else {
                value.ptr = buf + at;
                memcpy(slot, &value, sizeof value);
            }
            at += value.len;
        }
    }
    if (!writing && (at != len || frame->will_qos > 1 || frame->ref_type > 15)) {
        return PERCH_ERR_MALFORMED;
    }
    return at > 0x7FFFFFFFu ? PERCH_ERR_TOO_LARGE : (int32_t)at;
}

perch_status_t perch_decode(const uint8_t *bytes, size_t len, perch_origin_t origin,
                            perch_frame_t *frame)
{
    /* The cast is for the shared walk: reading never writes `bytes`. */
    int32_t result = codec(frame, (uint8_t *)(uintptr_t)bytes, len, origin, 0);
    return result < 0 ? (perch_status_t)result : PERCH_OK;
}

int32_t perch_encode(const perch_frame_t *frame, perch_origin_t origin, uint8_t *out,
                     size_t cap)
{
    /* The cast is for the shared walk: writing never writes `*frame`. */
    return codec((perch_frame_t *)(uintptr_t)frame, out, cap, origin, 1);
}

int32_t perch_encode_connectionless(const uint8_t *client_id, size_t client_id_len,
                                    uint32_t topic, const uint8_t *payload,
                                    size_t payload_len, uint8_t *out, size_t cap)
{
    perch_frame_t frame;
    memset(&frame, 0, sizeof frame);
    frame.type = PERCH_TYPE_PUBLISH;
    frame.flags = PERCH_FLAG_PREDEFINED | PERCH_QOS_CONNECTIONLESS;
    frame.client_id.ptr = client_id;
    frame.client_id.len = client_id_len;
    frame.topic = topic;
    frame.payload.ptr = payload;
    frame.payload.len = payload_len;
    return perch_encode(&frame, PERCH_ORIGIN_DEVICE, out, cap);
}
