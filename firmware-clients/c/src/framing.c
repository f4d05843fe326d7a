/* SPDX-License-Identifier: Apache-2.0 */
/*
 * framing.c — the serial line's COBS(frame || crc16_le) || 0x00 framing with
 * a resynchronising deframer, and the TCP varint length prefix
 * (docs/device-protocol.md section 5).
 *
 * Owns no buffer: the deframer works in the caller's, and drops (and counts)
 * a run longer than it rather than growing. The CRC is computed bit by bit:
 * a table would cost 512 bytes of flash for speed a UART does not need.
 */
#include <stddef.h>
#include <string.h>

#include "perch_device.h"

uint16_t perch_crc16(const uint8_t *data, size_t len)
{
    uint16_t crc = PERCH_CRC16_INIT;
    size_t i;
    for (i = 0; i < len; i++) {
        uint8_t bit;
        crc = (uint16_t)(crc ^ (uint16_t)data[i] << 8);
        for (bit = 0; bit < 8; bit++) {
            crc = (uint16_t)((crc & 0x8000u) ? (unsigned)(crc << 1) ^ PERCH_CRC16_POLY : (unsigned)(crc << 1));
        }
    }
    return (uint16_t)(crc ^ PERCH_CRC16_XOROUT);
}

int32_t perch_serial_encode(const uint8_t *frame, size_t len, uint8_t *out, size_t cap)
{
    /* COBS runs forward over frame || crc; the CRC bytes are read from `crc`
     * rather than appended to `frame`, so the frame's buffer needs no room
     * after it. Writing runs at most HEADROOM bytes ahead of reading, which
     * is what makes the in-place use safe. */
    uint16_t crc;
    size_t raw_len = len + 2;
    size_t code_at = 0;
    size_t write = 1;
    size_t read;
    uint8_t code = 1;
    if (cap < PERCH_SERIAL_BYTES_MAX(len) || len > PERCH_TCP_FRAME_BYTES_MAX) {
        return PERCH_ERR_BUFFER;
    }
    crc = perch_crc16(frame, len);
    for (read = 0; read < raw_len; read++) {
        uint8_t byte = read < len ? frame[read] : (uint8_t)(crc >> (8 * (read - len)));
        if (byte == 0) {
            out[code_at] = code;
            code_at = write++;
            code = 1;
            continue;
        }
        out[write++] = byte;
        if (++code == 0xFFu) {
            out[code_at] = code;
            code = 1;
            if (read + 1 == raw_len) {
                /* A full block at the very end needs no trailing block. */
                out[write] = PERCH_SERIAL_DELIMITER;
                return (int32_t)(write + 1);
            }
            code_at = write++;
        }
    }
    out[code_at] = code;
    out[write] = PERCH_SERIAL_DELIMITER;
    return (int32_t)(write + 1);
}

void perch_deframer_init(perch_deframer_t *deframer, uint8_t *buf, size_t cap)
{
    memset(deframer, 0, sizeof *deframer);
    deframer->buf = buf;
    deframer->cap = cap;
}

/* Decodes COBS in place (the output is never longer than the input); the
 * decoded length, or -1 when a code points past the end. The buffer holds no
 * 0x00 (the deframer splits at them). */
static long cobs_decode_in_place(uint8_t *buf, size_t len)
{
    size_t read = 0;
    size_t write = 0;
    while (read < len) {
        uint8_t code = buf[read++];
        size_t run = (size_t)code - 1u;
        if (run > len - read) {
            return -1;
        }
        /* Forward, byte by byte: `write` never passes `read` (and the
         * library links no memmove). */
        while (run-- > 0) {
            buf[write++] = buf[read++];
        }
        if (code != 0xFFu && read < len) {
            buf[write++] = 0;
        }
    }
    return (long)write;
}

size_t perch_deframer_feed(perch_deframer_t *deframer, const uint8_t *in, size_t len,
                           size_t *consumed, const uint8_t **frame)
{
    size_t i;
    for (i = 0; i < len; i++) {
        uint8_t byte = in[i];
        size_t encoded_len;
        long raw_len;
        if (byte != PERCH_SERIAL_DELIMITER) {
            if (deframer->discarding) {
                continue;
            }
            if (deframer->len == deframer->cap) {
                deframer->discarding = 1;
                deframer->len = 0;
                deframer->oversize_dropped++;
                continue;
            }
            deframer->buf[deframer->len++] = byte;
            continue;
        }
        encoded_len = deframer->len;
        deframer->len = 0;
        if (deframer->discarding || encoded_len == 0) {
            deframer->discarding = 0;
            continue;
        }
        raw_len = cobs_decode_in_place(deframer->buf, encoded_len);
        if (raw_len >= 3) {
            size_t frame_len = (size_t)raw_len - 2;
            const uint8_t *crc = deframer->buf + frame_len;
            uint16_t want = perch_crc16(deframer->buf, frame_len);
            if (crc[0] == (uint8_t)want && crc[1] == (uint8_t)(want >> 8)) {
                deframer->frames++;
                *consumed = i + 1;
                *frame = deframer->buf;
                return frame_len;
            }
        }
        deframer->corrupt_dropped++;
    }
    *consumed = len;
    return 0;
}

size_t perch_tcp_prefix(size_t frame_len, uint8_t *out)
{
    if (frame_len == 0 || frame_len > PERCH_TCP_FRAME_BYTES_MAX) {
        return 0;
    }
    return perch_varint_encode((uint32_t)frame_len, out, PERCH_TCP_PREFIX_BYTES_MAX);
}

int32_t perch_tcp_split(const uint8_t *buf, size_t len, size_t *frame_offset,
                        size_t *frame_len)
{
    uint32_t value = 0;
    size_t i;
    for (i = 0; i < PERCH_TCP_PREFIX_BYTES_MAX; i++) {
        if (i == len) {
            return 0; /* the prefix is not complete yet */
        }
        value |= (uint32_t)(buf[i] & 0x7Fu) << (7 * i);
        if ((buf[i] & 0x80u) == 0) {
            if (value == 0 || value > PERCH_TCP_FRAME_BYTES_MAX || (buf[i] == 0 && i > 0)) {
                return PERCH_ERR_MALFORMED;
            }
            if (len - (i + 1) < value) {
                return 0;
            }
            *frame_offset = i + 1;
            *frame_len = value;
            return (int32_t)(i + 1 + value);
        }
    }
    return PERCH_ERR_MALFORMED; /* a prefix is at most 3 bytes */
}
