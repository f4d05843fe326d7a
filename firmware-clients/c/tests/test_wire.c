/* SPDX-License-Identifier: Apache-2.0 */
/*
 * test_wire.c — frames, varints and both framings, against the spec and
 * against perch-wire:
 *
 * - every line of tests/vectors.txt (the spec's `Example:` blocks, seeded
 *   random frames and mutations of them, each with perch-wire's decoding) is
 *   decoded, printed in the canonical form and compared with perch-wire's,
 *   then re-encoded byte for byte (with its UDP, TCP or serial framing);
 * - the spec's markdown is parsed here too and must list exactly the
 *   vectors' spec cases, so a spec changed without `make generate` fails;
 * - random and mutated inputs never crash the decoder, the deframer or the
 *   TCP splitter, and whatever decodes re-encodes to the same bytes.
 */
#include <stdlib.h>
#include <string.h>

#include "test.h"

/* ------------------------------------------------------------ describe */

static void hex_field(char **at, char *end, const char *key, perch_bytes_t bytes)
{
    int n = snprintf(*at, (size_t)(end - *at), " %s=", key);
    if (n > 0 && *at + n < end) {
        *at += n;
        bytes_to_hex(bytes.ptr, bytes.len, *at, (size_t)(end - *at));
        *at += strlen(*at);
    }
}

void describe_frame(const perch_frame_t *f, perch_origin_t origin, char *out, size_t cap)
{
    char *at = out;
    char *end = out + cap;
    int n = 0;
    out[0] = '\0';
    switch (f->type) {
    case PERCH_TYPE_CONNECT:
        n = snprintf(at, cap, "CONNECT f=%u version=%u keepalive_s=%u", f->flags, f->version,
                     (unsigned)f->keepalive_s);
        at += n;
        hex_field(&at, end, "client_id", f->client_id);
        if (f->flags & PERCH_FLAG_WILL) {
            n = snprintf(at, (size_t)(end - at), " will_qos=%u", f->will_qos);
            at += n;
            hex_field(&at, end, "will_subject", f->subject);
            hex_field(&at, end, "will_payload", f->payload);
        }
        return;
    case PERCH_TYPE_CONNACK:
        snprintf(at, cap, "CONNACK f=%u code=%u session_token=%u", f->flags, f->code,
                 (unsigned)f->session_token);
        return;
    case PERCH_TYPE_PUBLISH:
        if ((f->flags & PERCH_FLAG_QOS_MASK) == PERCH_QOS_CONNECTIONLESS) {
            n = snprintf(at, cap, "PUBLISH f=%u", f->flags);
            at += n;
            hex_field(&at, end, "client_id", f->client_id);
            n = snprintf(at, (size_t)(end - at), " topic=%u", (unsigned)f->topic);
            at += n;
        } else if (origin == PERCH_ORIGIN_DEVICE) {
            n = snprintf(at, cap, "PUBLISH f=%u topic=%u msg_id=%u", f->flags,
                         (unsigned)f->topic, (unsigned)f->id);
            at += n;
        } else {
            n = snprintf(at, cap, "PUBLISH f=%u topic=%u reply_handle=%u msg_id=%u", f->flags,
                         (unsigned)f->topic, (unsigned)f->reply_handle, (unsigned)f->id);
            at += n;
        }
        hex_field(&at, end, "payload", f->payload);
        return;
    case PERCH_TYPE_PUBACK:
        snprintf(at, cap, "PUBACK msg_id=%u code=%u", (unsigned)f->id, f->code);
        return;
    case PERCH_TYPE_REGISTER:
        n = snprintf(at, cap, "REGISTER id=%u", (unsigned)f->id);
        at += n;
        hex_field(&at, end, "subject", f->subject);
        return;
    case PERCH_TYPE_REGACK:
        snprintf(at, cap, "REGACK req_id=%u topic=%u code=%u", (unsigned)f->id,
                 (unsigned)f->topic, f->code);
        return;
    case PERCH_TYPE_SUBSCRIBE:
        n = snprintf(at, cap, "SUBSCRIBE f=%u req_id=%u", f->flags, (unsigned)f->id);
        at += n;
        hex_field(&at, end, "filter", f->subject);
        return;
    case PERCH_TYPE_SUBACK:
        snprintf(at, cap, "SUBACK req_id=%u code=%u", (unsigned)f->id, f->code);
        return;
    case PERCH_TYPE_UNSUBSCRIBE:
        n = snprintf(at, cap, "UNSUBSCRIBE req_id=%u", (unsigned)f->id);
        at += n;
        hex_field(&at, end, "filter", f->subject);
        return;
    case PERCH_TYPE_UNSUBACK:
        snprintf(at, cap, "UNSUBACK req_id=%u code=%u", (unsigned)f->id, f->code);
        return;
    case PERCH_TYPE_PING:
        snprintf(at, cap, "PING");
        return;
    case PERCH_TYPE_PONG:
        snprintf(at, cap, "PONG");
        return;
    case PERCH_TYPE_DISCONNECT:
        snprintf(at, cap, "DISCONNECT f=%u sleep_s=%u", f->flags, (unsigned)f->sleep_s);
        return;
    case PERCH_TYPE_RESUME:
        snprintf(at, cap, "RESUME session_token=%u", (unsigned)f->session_token);
        return;
    case PERCH_TYPE_ERROR:
        snprintf(at, cap, "ERROR code=%u ref_type=%u ref_id=%u", f->code, f->ref_type,
                 (unsigned)f->id);
        return;
    default:
        snprintf(at, cap, "TYPE%u", f->type);
        return;
    }
}

/* ------------------------------------------------------------- vectors */

#define VECTORS_MAX 1024
#define VECTOR_BYTES_MAX 1200
#define LINE_BYTES_MAX 8192

typedef struct vector {
    char kind[8];
    perch_origin_t origin;
    char framing[8];
    uint8_t bytes[VECTOR_BYTES_MAX];
    size_t len;
    char *expected;
    char *name;
} vector_t;

static vector_t vectors[VECTORS_MAX];
static size_t vectors_count;

static char *copy_string(const char *text)
{
    size_t len = strlen(text);
    char *copy = malloc(len + 1);
    if (copy == NULL) {
        abort();
    }
    memcpy(copy, text, len + 1);
    return copy;
}

/* Loads tests/vectors.txt once; 0 when it cannot be read. */
static size_t load_vectors(void)
{
    static int loaded;
    static char line[LINE_BYTES_MAX];
    FILE *file;
    if (loaded) {
        return vectors_count;
    }
    loaded = 1;
    file = fopen(test_vectors_path, "r");
    if (file == NULL) {
        perror(test_vectors_path);
        return 0;
    }
    while (fgets(line, sizeof line, file) != NULL) {
        char *fields[6];
        char *cursor = line;
        size_t n;
        vector_t *v;
        if (line[0] == '#' || line[0] == '\n') {
            continue;
        }
        if (strchr(line, '\n') == NULL || vectors_count == VECTORS_MAX) {
            fprintf(stderr, "vectors: a line too long, or too many lines\n");
            abort();
        }
        line[strcspn(line, "\n")] = '\0';
        for (n = 0; n < 6; n++) {
            fields[n] = cursor;
            cursor = strchr(cursor, '\t');
            if (cursor == NULL) {
                break;
            }
            *cursor++ = '\0';
        }
        if (n != 5) {
            fprintf(stderr, "vectors: a line without 6 fields\n");
            abort();
        }
        v = &vectors[vectors_count++];
        snprintf(v->kind, sizeof v->kind, "%s", fields[0]);
        v->origin = fields[1][0] == 'B' ? PERCH_ORIGIN_BROKER : PERCH_ORIGIN_DEVICE;
        snprintf(v->framing, sizeof v->framing, "%s", fields[2]);
        v->len = hex_to_bytes(fields[3], v->bytes, sizeof v->bytes);
        v->expected = copy_string(fields[4]);
        v->name = copy_string(fields[5]);
    }
    fclose(file);
    return vectors_count;
}

/* Undoes a vector's framing: the frame's bytes in `frame`, or 0. */
static size_t unframe(const vector_t *v, const uint8_t **frame, uint8_t *deframe_buf,
                      size_t deframe_cap)
{
    if (strcmp(v->framing, "tcp") == 0) {
        size_t offset = 0;
        size_t frame_len = 0;
        int32_t used = perch_tcp_split(v->bytes, v->len, &offset, &frame_len);
        if (used != (int32_t)v->len) {
            return 0;
        }
        *frame = v->bytes + offset;
        return frame_len;
    }
    if (strcmp(v->framing, "serial") == 0) {
        perch_deframer_t deframer;
        size_t consumed = 0;
        size_t frame_len;
        perch_deframer_init(&deframer, deframe_buf, deframe_cap);
        frame_len = perch_deframer_feed(&deframer, v->bytes, v->len, &consumed, frame);
        return consumed == v->len ? frame_len : 0;
    }
    *frame = v->bytes;
    return v->len;
}

/* Encodes `frame` with a vector's framing into `out`; the length or < 0. */
static int32_t reframe(const vector_t *v, const perch_frame_t *frame, uint8_t *out, size_t cap)
{
    uint8_t raw[VECTOR_BYTES_MAX];
    int32_t len = perch_encode(frame, v->origin, raw, sizeof raw);
    if (len < 0) {
        return len;
    }
    if (strcmp(v->framing, "tcp") == 0) {
        size_t prefix = perch_tcp_prefix((size_t)len, out);
        memcpy(out + prefix, raw, (size_t)len);
        return (int32_t)prefix + len;
    }
    if (strcmp(v->framing, "serial") == 0) {
        return perch_serial_encode(raw, (size_t)len, out, cap);
    }
    memcpy(out, raw, (size_t)len);
    return len;
}

static void every_vector_decodes_like_perch_wire_and_reencodes(void)
{
    static char described[LINE_BYTES_MAX];
    static uint8_t deframe_buf[PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX];
    size_t count = load_vectors();
    size_t i;
    size_t spec = 0;
    size_t refused = 0;
    CHECK(count > 400);
    for (i = 0; i < count; i++) {
        const vector_t *v = &vectors[i];
        const uint8_t *frame_bytes = NULL;
        perch_frame_t frame;
        uint8_t again[VECTOR_BYTES_MAX + 8];
        size_t frame_len = unframe(v, &frame_bytes, deframe_buf, sizeof deframe_buf);
        perch_status_t status = frame_len ? perch_decode(frame_bytes, frame_len, v->origin, &frame)
                                          : PERCH_ERR_MALFORMED;
        int32_t again_len;
        spec += strcmp(v->kind, "spec") == 0;
        if (strcmp(v->expected, "ERR") == 0) {
            refused++;
            if (status == PERCH_OK) {
                describe_frame(&frame, v->origin, described, sizeof described);
                fprintf(stderr, "  %s: perch-wire refuses, C accepts: %s\n", v->name, described);
                CHECK(status != PERCH_OK);
            }
            continue;
        }
        if (status != PERCH_OK) {
            fprintf(stderr, "  %s: C refuses (%d), perch-wire: %s\n", v->name, (int)status,
                    v->expected);
            CHECK(status == PERCH_OK);
            continue;
        }
        describe_frame(&frame, v->origin, described, sizeof described);
        if (strcmp(described, v->expected) != 0) {
            fprintf(stderr, "  %s:\n    C:          %s\n    perch-wire: %s\n", v->name,
                    described, v->expected);
            CHECK(strcmp(described, v->expected) == 0);
        }
        again_len = reframe(v, &frame, again, sizeof again);
        if (again_len != (int32_t)v->len || memcmp(again, v->bytes, v->len) != 0) {
            fprintf(stderr, "  %s: re-encoding differs (%d bytes, want %zu)\n", v->name,
                    (int)again_len, v->len);
            CHECK(again_len == (int32_t)v->len && memcmp(again, v->bytes, v->len) == 0);
        }
    }
    printf("     %zu vectors: %zu from the spec, %zu random or mutated (%zu refused)\n", count,
           spec, count - spec, refused);
}

/* The spec's markdown, parsed here: the same examples, in the same order, as
 * the vectors' spec lines. A changed spec without regenerated vectors fails. */
static void spec_markdown_matches_the_vectors(void)
{
    static char line[LINE_BYTES_MAX];
    FILE *file = fopen(test_spec_path, "r");
    size_t count = load_vectors();
    size_t next = 0;
    size_t examples = 0;
    CHECK(file != NULL);
    if (file == NULL) {
        return;
    }
    while (fgets(line, sizeof line, file) != NULL) {
        char name[LINE_BYTES_MAX];
        uint8_t bytes[VECTOR_BYTES_MAX];
        size_t len = 0;
        if (strncmp(line, "Example: ", 9) != 0) {
            continue;
        }
        snprintf(name, sizeof name, "%s", line + 9);
        name[strcspn(name, "\n")] = '\0';
        examples++;
        while (fgets(line, sizeof line, file) != NULL && strspn(line, " \t\n") == strlen(line)) {
        }
        CHECK(strncmp(line, "```hex", 6) == 0);
        while (fgets(line, sizeof line, file) != NULL && strncmp(line, "```", 3) != 0) {
            len += hex_to_bytes(line, bytes + len, sizeof bytes - len);
        }
        while (next < count && strcmp(vectors[next].kind, "spec") != 0) {
            next++;
        }
        if (next == count || strcmp(vectors[next].name, name) != 0 ||
            vectors[next].len != len || memcmp(vectors[next].bytes, bytes, len) != 0) {
            fprintf(stderr, "  spec example %zu \"%s\" is not the next vector: run "
                            "`make -C firmware-clients/c generate`\n",
                    examples, name);
            CHECK(!"spec and vectors agree");
            break;
        }
        next++;
    }
    fclose(file);
    while (next < count && strcmp(vectors[next].kind, "spec") != 0) {
        next++;
    }
    CHECK(next == count); /* no spec vector left over */
    CHECK(examples >= 30);
}

static void the_six_byte_publish(void)
{
    uint8_t out[16];
    perch_frame_t f;
    static const uint8_t payload[] = "21.5";
    memset(&f, 0, sizeof f);
    f.type = PERCH_TYPE_PUBLISH;
    f.topic = 5;
    f.payload.ptr = payload;
    f.payload.len = 4;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_DEVICE, out, sizeof out), 6);
    CHECK(memcmp(out, "\x30\x05" "21.5", 6) == 0);
    CHECK_EQ(perch_encode_connectionless((const uint8_t *)"s7", 2, 1, (const uint8_t *)"on", 2,
                                         out, sizeof out),
             7);
    CHECK(memcmp(out, "\x37\x02s7\x01on", 7) == 0);
}

/* -------------------------------------------------------------- varints */

static void varint_boundaries(void)
{
    static const struct {
        uint32_t value;
        const char *hex;
    } cases[] = {
        {0, "00"},           {1, "01"},          {127, "7f"},
        {128, "80 01"},      {300, "ac 02"},     {16383, "ff 7f"},
        {16384, "80 80 01"}, {0x1FFFFF, "ff ff 7f"}, {0x200000, "80 80 80 01"},
        {0x0FFFFFFF, "ff ff ff 7f"}, {0x10000000, "80 80 80 80 01"},
        {0xFFFFFFFFu, "ff ff ff ff 0f"},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t want[8];
        uint8_t out[8];
        uint32_t value = 0;
        size_t len = hex_to_bytes(cases[i].hex, want, sizeof want);
        CHECK_EQ(perch_varint_len(cases[i].value), len);
        CHECK_EQ(perch_varint_encode(cases[i].value, out, sizeof out), len);
        CHECK(memcmp(out, want, len) == 0);
        CHECK_EQ(perch_varint_decode(want, len, &value), len);
        CHECK_EQ(value, cases[i].value);
        CHECK_EQ(perch_varint_encode(cases[i].value, out, len - 1), 0);
    }
}

static void varint_malformed(void)
{
    static const char *cases[] = {
        "", "80", "ff ff ff ff", "ff ff ff ff 80 01", "ff ff ff ff 10", "80 00", "81 80 00",
        "80 80 80 80 00",
    };
    size_t i;
    uint8_t two[] = {0x05, 0xFF};
    uint32_t value = 0;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t bytes[8];
        size_t len = hex_to_bytes(cases[i], bytes, sizeof bytes);
        CHECK_EQ(perch_varint_decode(bytes, len, &value), 0);
    }
    CHECK_EQ(perch_varint_decode(two, 2, &value), 1); /* trailing bytes left alone */
    CHECK_EQ(value, 5);
}

/* ---------------------------------------------------------------- encode */

static void encode_refuses_what_the_wire_cannot_carry(void)
{
    uint8_t out[600];
    uint8_t long_bytes[300];
    perch_frame_t f;
    int32_t len;
    size_t cap;
    memset(long_bytes, 'a', sizeof long_bytes);
    memset(&f, 0, sizeof f);
    f.type = PERCH_TYPE_CONNECT;
    f.version = 1;
    f.client_id.ptr = long_bytes;
    f.client_id.len = 65;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_DEVICE, out, sizeof out), PERCH_ERR_TOO_LARGE);
    f.client_id.len = 64;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_BROKER, out, sizeof out), PERCH_ERR_INVALID);
    f.flags = PERCH_FLAG_WILL;
    f.will_qos = 2;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_DEVICE, out, sizeof out), PERCH_ERR_INVALID);
    f.will_qos = 1;
    f.subject.ptr = long_bytes;
    f.subject.len = 256;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_DEVICE, out, sizeof out), PERCH_ERR_TOO_LARGE);
    f.subject.len = 255;
    f.payload.ptr = long_bytes;
    f.payload.len = 10;
    len = perch_encode(&f, PERCH_ORIGIN_DEVICE, out, sizeof out);
    CHECK_EQ(len, 1 + 1 + 1 + 1 + 64 + 1 + 2 + 255 + 10);
    for (cap = 0; cap < (size_t)len; cap++) {
        CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_DEVICE, out, cap), PERCH_ERR_BUFFER);
    }
    memset(&f, 0, sizeof f);
    f.type = PERCH_TYPE_PUBLISH;
    f.flags = PERCH_FLAG_QOS_MASK; /* connectionless needs the predefined flag */
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_DEVICE, out, sizeof out), PERCH_ERR_INVALID);
    f.flags = PERCH_FLAG_PREDEFINED | PERCH_FLAG_REPLY;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_DEVICE, out, sizeof out), PERCH_ERR_INVALID);
    CHECK(perch_encode(&f, PERCH_ORIGIN_BROKER, out, sizeof out) > 0);
    f.flags = 2; /* QoS 2 does not exist */
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_BROKER, out, sizeof out), PERCH_ERR_INVALID);
    memset(&f, 0, sizeof f);
    f.type = PERCH_TYPE_ERROR;
    f.ref_type = 16;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_BROKER, out, sizeof out), PERCH_ERR_INVALID);
    f.type = 0;
    CHECK_EQ(perch_encode(&f, PERCH_ORIGIN_BROKER, out, sizeof out), PERCH_ERR_INVALID);
}

/* --------------------------------------------------------------- serial */

static void crc_check_value(void)
{
    CHECK_EQ(perch_crc16((const uint8_t *)"123456789", 9), PERCH_CRC16_CHECK);
    CHECK_EQ(PERCH_CRC16_CHECK, 0x29B1);
}

/* Serial-encodes `frame` twice (separate buffer and in place), checks the
 * line holds no 0x00 but the delimiter and fits the bound, and deframes it. */
static void serial_round_trip(const uint8_t *frame, size_t len)
{
    static uint8_t line[2 * PERCH_FRAME_BYTES_MAX];
    static uint8_t in_place[2 * PERCH_FRAME_BYTES_MAX];
    static uint8_t deframe_buf[2 * PERCH_FRAME_BYTES_MAX];
    perch_deframer_t deframer;
    const uint8_t *out = NULL;
    size_t consumed = 0;
    size_t headroom = PERCH_SERIAL_HEADROOM(len);
    int32_t n = perch_serial_encode(frame, len, line, sizeof line);
    int32_t k;
    int32_t i;
    CHECK(n > 0 && (size_t)n <= PERCH_SERIAL_BYTES_MAX(len));
    if (n <= 0) {
        return;
    }
    for (i = 0; i + 1 < n; i++) {
        CHECK(line[i] != 0);
    }
    CHECK_EQ(line[n - 1], 0);
    memcpy(in_place + headroom, frame, len);
    k = perch_serial_encode(in_place + headroom, len, in_place, sizeof in_place);
    CHECK_EQ(k, n);
    CHECK(memcmp(in_place, line, (size_t)n) == 0);
    CHECK_EQ(perch_serial_encode(frame, len, line, PERCH_SERIAL_BYTES_MAX(len) - 1),
             PERCH_ERR_BUFFER);
    n = perch_serial_encode(frame, len, line, sizeof line);
    perch_deframer_init(&deframer, deframe_buf, sizeof deframe_buf);
    CHECK_EQ(perch_deframer_feed(&deframer, line, (size_t)n, &consumed, &out), len);
    CHECK_EQ(consumed, n);
    CHECK(out != NULL && (len == 0 || memcmp(out, frame, len) == 0));
}

static void serial_long_runs_and_zeros(void)
{
    static uint8_t frame[PERCH_FRAME_BYTES_MAX + 8];
    static const size_t lens[] = {1, 2, 250, 251, 252, 253, 254, 255, 256, 505, 506, 507,
                                  508, 509, 1000, PERCH_FRAME_BYTES_MAX};
    size_t i;
    size_t k;
    for (i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        for (k = 0; k < lens[i]; k++) {
            frame[k] = (uint8_t)(k % 255 + 1); /* no zeros: the longest runs */
        }
        serial_round_trip(frame, lens[i]);
        memset(frame, 0, lens[i]); /* all zeros */
        serial_round_trip(frame, lens[i]);
        for (k = 0; k < lens[i]; k++) {
            frame[k] = (uint8_t)(k % 7 ? k : 0);
        }
        serial_round_trip(frame, lens[i]);
    }
}

static size_t encode_publish(uint8_t *out, size_t cap, const char *payload, size_t payload_len)
{
    uint8_t raw[64];
    perch_frame_t f;
    int32_t len;
    memset(&f, 0, sizeof f);
    f.type = PERCH_TYPE_PUBLISH;
    f.flags = PERCH_FLAG_QOS1;
    f.topic = 9;
    f.id = 300;
    f.payload.ptr = (const uint8_t *)payload;
    f.payload.len = payload_len;
    len = perch_encode(&f, PERCH_ORIGIN_DEVICE, raw, sizeof raw);
    return (size_t)perch_serial_encode(raw, (size_t)len, out, cap);
}

static void deframer_splits_at_every_byte(void)
{
    uint8_t line[96];
    uint8_t deframe_buf[32];
    size_t len = 0;
    size_t cut;
    len += encode_publish(line + len, sizeof line - len, "a", 1);
    len += encode_publish(line + len, sizeof line - len, "\0\0", 2);
    len += encode_publish(line + len, sizeof line - len, "hello", 5);
    for (cut = 0; cut <= len; cut++) {
        perch_deframer_t deframer;
        const uint8_t *chunks[2];
        size_t sizes[2];
        size_t seen = 0;
        size_t c;
        chunks[0] = line;
        sizes[0] = cut;
        chunks[1] = line + cut;
        sizes[1] = len - cut;
        perch_deframer_init(&deframer, deframe_buf, sizeof deframe_buf);
        for (c = 0; c < 2; c++) {
            const uint8_t *in = chunks[c];
            size_t left = sizes[c];
            for (;;) {
                size_t consumed = 0;
                const uint8_t *frame = NULL;
                size_t frame_len = perch_deframer_feed(&deframer, in, left, &consumed, &frame);
                perch_frame_t f;
                in += consumed;
                left -= consumed;
                if (frame_len == 0) {
                    break;
                }
                CHECK_EQ(perch_decode(frame, frame_len, PERCH_ORIGIN_DEVICE, &f), PERCH_OK);
                CHECK_EQ(f.payload.len, seen == 0 ? 1 : seen == 1 ? 2 : 5);
                seen++;
            }
        }
        CHECK_EQ(seen, 3);
        CHECK_EQ(deframer.frames, 3);
        CHECK_EQ(deframer.corrupt_dropped, 0);
        CHECK_EQ(deframer.oversize_dropped, 0);
    }
}

static unsigned feed_all(perch_deframer_t *deframer, const uint8_t *in, size_t len)
{
    unsigned good = 0;
    for (;;) {
        size_t consumed = 0;
        const uint8_t *frame = NULL;
        size_t frame_len = perch_deframer_feed(deframer, in, len, &consumed, &frame);
        in += consumed;
        len -= consumed;
        if (frame_len == 0) {
            return good;
        }
        good++;
    }
}

static void deframer_drops_corruption_and_resyncs(void)
{
    uint8_t clean[32];
    uint8_t deframe_buf[32];
    size_t n = encode_publish(clean, sizeof clean, "data", 4);
    size_t position;
    for (position = 0; position + 1 < n; position++) {
        static const uint8_t flips[] = {0x01, 0x80, 0xFF};
        size_t k;
        for (k = 0; k < sizeof flips; k++) {
            uint8_t line[64];
            perch_deframer_t deframer;
            memcpy(line, clean, n);
            line[position] ^= flips[k];
            memcpy(line + n, clean, n);
            perch_deframer_init(&deframer, deframe_buf, sizeof deframe_buf);
            CHECK_EQ(feed_all(&deframer, line, 2 * n), 1);
            CHECK(deframer.corrupt_dropped >= 1 && deframer.corrupt_dropped <= 2);
        }
    }
}

static void deframer_joins_mid_frame_and_drops_oversize(void)
{
    uint8_t clean[32];
    uint8_t noise[100];
    uint8_t deframe_buf[16];
    perch_deframer_t deframer;
    size_t n = encode_publish(clean, sizeof clean, "data", 4);
    memset(noise, 0x55, sizeof noise);
    perch_deframer_init(&deframer, deframe_buf, sizeof deframe_buf);
    CHECK_EQ(feed_all(&deframer, clean + 3, n - 3), 0);
    CHECK_EQ(deframer.corrupt_dropped, 1);
    CHECK_EQ(feed_all(&deframer, clean, n), 1);
    CHECK_EQ(feed_all(&deframer, noise, sizeof noise), 0);
    CHECK_EQ(feed_all(&deframer, noise, sizeof noise), 0);
    /* The frame right after the noise goes with it (its delimiter ends the
     * noise run); the next one arrives. */
    CHECK_EQ(feed_all(&deframer, clean, n), 0);
    CHECK_EQ(feed_all(&deframer, clean, n), 1);
    CHECK_EQ(deframer.oversize_dropped, 1);
    CHECK_EQ(deframer.frames, 2);
    CHECK_EQ(feed_all(&deframer, (const uint8_t *)"\0\0\0", 3), 0); /* idle filler */
    CHECK_EQ(deframer.corrupt_dropped, 1);
}

/* ------------------------------------------------------------------ TCP */

static void tcp_prefixes_and_splits(void)
{
    uint8_t out[3];
    uint8_t stream[16];
    size_t offset = 0;
    size_t frame_len = 0;
    size_t cut;
    static const struct {
        const char *hex;
        int32_t result;
    } cases[] = {
        {"80 80 04", PERCH_ERR_MALFORMED}, /* 65536 */
        {"80 80 80", PERCH_ERR_MALFORMED}, /* a fourth prefix byte */
        {"00", PERCH_ERR_MALFORMED},
        {"81 00", PERCH_ERR_MALFORMED},
        {"", 0},
        {"80", 0},
        {"ff ff 03", 0}, /* 65535: wait for the frame */
        {"01 b0", 2},
    };
    size_t i;
    CHECK_EQ(perch_tcp_prefix(65535, out), 3);
    CHECK(memcmp(out, "\xff\xff\x03", 3) == 0);
    CHECK_EQ(perch_tcp_prefix(65536, out), 0);
    CHECK_EQ(perch_tcp_prefix(0, out), 0);
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t bytes[8];
        size_t len = hex_to_bytes(cases[i].hex, bytes, sizeof bytes);
        CHECK_EQ(perch_tcp_split(bytes, len, &offset, &frame_len), cases[i].result);
    }
    /* PING then RESUME 0xDEADBEEF, cut at every byte. */
    hex_to_bytes("01 b0 05 e0 ef be ad de", stream, sizeof stream);
    for (cut = 0; cut <= 8; cut++) {
        int32_t used = perch_tcp_split(stream, cut, &offset, &frame_len);
        CHECK_EQ(used, cut < 2 ? 0 : 2);
    }
    CHECK_EQ(perch_tcp_split(stream + 2, 6, &offset, &frame_len), 6);
    CHECK_EQ(offset, 1);
    CHECK_EQ(frame_len, 5);
}

/* ------------------------------------------------------------- property */

/* Random bytes and mutations of every vector: the decoder, the deframer and
 * the splitter never crash (ASan/UBSan watch), and whatever decodes
 * re-encodes to exactly the input. */
static void random_inputs_never_crash_and_round_trip(void)
{
    static uint8_t deframe_buf[64];
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    size_t count = load_vectors();
    unsigned accepted = 0;
    unsigned iteration;
    for (iteration = 0; iteration < 200000; iteration++) {
        uint8_t input[VECTOR_BYTES_MAX];
        uint8_t again[VECTOR_BYTES_MAX + 8];
        size_t len;
        int origin;
        uint64_t r = test_rng_next(&rng);
        if (count > 0 && (r & 1)) {
            const vector_t *v = &vectors[(r >> 8) % count];
            unsigned flips = 1 + (unsigned)((r >> 40) % 3);
            len = v->len;
            memcpy(input, v->bytes, len);
            while (flips-- > 0 && len > 0) {
                uint64_t m = test_rng_next(&rng);
                switch (m % 4) {
                case 0:
                    input[(m >> 8) % len] ^= (uint8_t)(1u << ((m >> 32) % 8));
                    break;
                case 1:
                    input[(m >> 8) % len] = (uint8_t)(m >> 32);
                    break;
                case 2:
                    len = (size_t)((m >> 8) % len);
                    break;
                default:
                    if (len < sizeof input) {
                        input[len++] = (uint8_t)(m >> 32);
                    }
                }
            }
        } else {
            size_t k;
            len = (size_t)((r >> 8) % 40);
            for (k = 0; k < len; k++) {
                input[k] = (uint8_t)test_rng_next(&rng);
            }
        }
        for (origin = 0; origin < 2; origin++) {
            perch_frame_t frame;
            if (perch_decode(len ? input : NULL, len, (perch_origin_t)origin, &frame) ==
                PERCH_OK) {
                int32_t n = perch_encode(&frame, (perch_origin_t)origin, again, sizeof again);
                accepted++;
                CHECK(n == (int32_t)len && memcmp(again, input, len) == 0);
            }
        }
        {
            perch_deframer_t deframer;
            size_t offset;
            size_t frame_len;
            perch_deframer_init(&deframer, deframe_buf, sizeof deframe_buf);
            (void)feed_all(&deframer, input, len);
            (void)perch_tcp_split(input, len, &offset, &frame_len);
        }
    }
    CHECK(accepted > 1000);
}

const test_case_t wire_tests[] = {
    {"wire: every vector decodes like perch-wire and re-encodes",
     every_vector_decodes_like_perch_wire_and_reencodes},
    {"wire: the spec's markdown matches the vectors", spec_markdown_matches_the_vectors},
    {"wire: the 6-byte publish and the connectionless one", the_six_byte_publish},
    {"wire: varint boundaries", varint_boundaries},
    {"wire: malformed varints", varint_malformed},
    {"wire: encode refuses what the wire cannot carry", encode_refuses_what_the_wire_cannot_carry},
    {"serial: CRC-16/IBM-3740 check value", crc_check_value},
    {"serial: long runs, zeros, in place", serial_long_runs_and_zeros},
    {"serial: deframer splits at every byte", deframer_splits_at_every_byte},
    {"serial: corruption is dropped, then resync", deframer_drops_corruption_and_resyncs},
    {"serial: joins mid-frame, drops oversize runs", deframer_joins_mid_frame_and_drops_oversize},
    {"tcp: prefixes and splits", tcp_prefixes_and_splits},
    {"property: random and mutated inputs", random_inputs_never_crash_and_round_trip},
};
const size_t wire_tests_count = sizeof wire_tests / sizeof wire_tests[0];
