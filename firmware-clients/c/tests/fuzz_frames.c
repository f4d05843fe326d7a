/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fuzz_frames.c — libFuzzer target (clang -fsanitize=fuzzer,address,undefined)
 * over everything that reads peer bytes. The first input byte picks a mode:
 *
 *   0, 1  decode as sent by a device / the broker; whatever decodes must
 *         re-encode to exactly the input
 *   2     the serial deframer over the input as a byte stream; each frame it
 *         returns is decoded and, re-framed, deframes to itself
 *   3     the TCP splitter over the input as a byte stream
 *   4     a client fed a sequence of frames (length-prefixed in the input)
 *         interleaved with timeouts and API calls; every frame it sends must
 *         decode as a device frame
 *
 * `make fuzz` seeds it from tests/vectors.txt (tools/seed_corpus.py).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "perch_device.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void require(int ok)
{
    if (!ok) {
        abort();
    }
}

static void round_trip(const uint8_t *bytes, size_t len, perch_origin_t origin)
{
    static uint8_t again[PERCH_TCP_FRAME_BYTES_MAX + 8];
    perch_frame_t frame;
    if (perch_decode(bytes, len, origin, &frame) == PERCH_OK) {
        int32_t n = perch_encode(&frame, origin, again, sizeof again);
        require(n == (int32_t)len && memcmp(again, bytes, len) == 0);
    }
}

static void deframe(const uint8_t *in, size_t len)
{
    static uint8_t buf[PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX];
    static uint8_t line[PERCH_SERIAL_BYTES_MAX(PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX)];
    static uint8_t copy[PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX];
    static uint8_t buf2[PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX];
    perch_deframer_t deframer;
    perch_deframer_init(&deframer, buf, sizeof buf);
    for (;;) {
        size_t consumed = 0;
        const uint8_t *frame = NULL;
        size_t frame_len = perch_deframer_feed(&deframer, in, len, &consumed, &frame);
        require(consumed <= len);
        in += consumed;
        len -= consumed;
        if (frame_len == 0) {
            break;
        }
        require(frame_len + 2 <= sizeof buf);
        memcpy(copy, frame, frame_len);
        round_trip(copy, frame_len, PERCH_ORIGIN_DEVICE);
        round_trip(copy, frame_len, PERCH_ORIGIN_BROKER);
        {
            perch_deframer_t again;
            size_t used = 0;
            const uint8_t *out = NULL;
            int32_t n = perch_serial_encode(copy, frame_len, line, sizeof line);
            require(n > 0);
            perch_deframer_init(&again, buf2, sizeof buf2);
            require(perch_deframer_feed(&again, line, (size_t)n, &used, &out) == frame_len);
            require(used == (size_t)n && memcmp(out, copy, frame_len) == 0);
        }
    }
}

static void split(const uint8_t *in, size_t len)
{
    for (;;) {
        size_t offset = 0;
        size_t frame_len = 0;
        int32_t used = perch_tcp_split(in, len, &offset, &frame_len);
        if (used <= 0) {
            return;
        }
        require((size_t)used <= len && offset + frame_len == (size_t)used);
        round_trip(in + offset, frame_len, PERCH_ORIGIN_BROKER);
        in += used;
        len -= (size_t)used;
    }
}

static void drive_client(const uint8_t *in, size_t len)
{
    static perch_client_t client;
    static perch_config_t config;
    static perch_name_t names[3];
    static uint8_t name_bytes[3 * 16];
    static perch_outgoing_t outgoing[3];
    static uint8_t out[PERCH_FRAME_BYTES_MAX];
    static uint8_t frame[256];
    uint32_t now = 1000;
    perch_event_t event;
    perch_config_init(&config, "fuzz");
    config.names = names;
    config.names_max = 3;
    config.name_bytes = name_bytes;
    config.name_bytes_max = 16;
    config.outgoing = outgoing;
    config.outgoing_max = 3;
    config.keepalive_s = 1;
    require(perch_client_init(&client, &config) == PERCH_OK);
    perch_connect(&client, now);
    while (len > 0) {
        uint8_t op = in[0];
        size_t n = op & 0x3Fu;
        perch_frame_t decoded;
        size_t sent;
        in++;
        len--;
        switch (op >> 6) {
        case 0: /* a frame of n bytes from the broker */
            if (n > len) {
                n = len;
            }
            memcpy(frame, in, n); /* the client's view of it lives in `frame` */
            (void)perch_handle_input(&client, frame, n, now);
            in += n;
            len -= n;
            break;
        case 1:
            now += (uint32_t)n * 97u;
            perch_handle_timeout(&client, now);
            break;
        case 2:
            (void)perch_publish(&client, (const uint8_t *)"s.t", 1 + (n & 1u) * 2u,
                                (const uint8_t *)"p", 1, (uint8_t)((n >> 1) & 1u), now, NULL);
            (void)perch_publish_id(&client, (uint8_t)((n >> 2) & 1u), n, (const uint8_t *)"q",
                                   1, (uint8_t)((n >> 3) & 1u), now, NULL);
            break;
        default:
            switch (n & 7u) {
            case 0:
                (void)perch_subscribe(&client, (const uint8_t *)"a.>", 3, (uint8_t)(n >> 5), now,
                                      NULL);
                break;
            case 1:
                (void)perch_unsubscribe(&client, (const uint8_t *)"a.>", 3, now, NULL);
                break;
            case 2:
                (void)perch_sleep(&client, n, now);
                break;
            case 3:
                (void)perch_wake(&client, now);
                break;
            case 4:
                (void)perch_reply(&client, n, (const uint8_t *)"r", 1, now);
                break;
            case 5:
                perch_resume(&client, now);
                break;
            case 6:
                perch_connect(&client, now);
                break;
            default:
                perch_disconnect(&client, now);
            }
        }
        while (perch_poll_event(&client, &event)) {
            require(event.type != PERCH_EVENT_NONE);
        }
        while ((sent = perch_poll_transmit(&client, out, sizeof out)) > 0) {
            require(perch_decode(out, sent, PERCH_ORIGIN_DEVICE, &decoded) == PERCH_OK);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) {
        return 0;
    }
    switch (data[0] % 5) {
    case 0:
        round_trip(data + 1, size - 1, PERCH_ORIGIN_DEVICE);
        break;
    case 1:
        round_trip(data + 1, size - 1, PERCH_ORIGIN_BROKER);
        break;
    case 2:
        deframe(data + 1, size - 1);
        break;
    case 3:
        split(data + 1, size - 1);
        break;
    default:
        drive_client(data + 1, size - 1);
    }
    return 0;
}
