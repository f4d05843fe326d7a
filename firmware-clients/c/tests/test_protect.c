/* SPDX-License-Identifier: Apache-2.0 */
/*
 * test_protect.c — the C client's ChaCha20-Poly1305 and envelopes:
 * - RFC 8439's own vectors for the block function (§2.3.2), Poly1305
 *   (§2.5.2) and the AEAD (§2.8.2);
 * - every line of tests/protect_vectors.txt, sealed by perch-wire (the Rust
 *   side): device envelopes must come out byte for byte, broker envelopes
 *   must open to their frame;
 * - every single-bit change and truncation of a broker envelope refused;
 * - the replay window against a model, over seeded random counters.
 */
#include <stdlib.h>
#include <string.h>

#include "perch_protect.h"
#include "test.h"

static void check_hex(const uint8_t *got, size_t len, const char *want_hex)
{
    uint8_t want[512];
    size_t n = hex_to_bytes(want_hex, want, sizeof want);
    CHECK_EQ(n, len);
    CHECK(n == len && memcmp(got, want, n) == 0);
}

static void rfc8439_block(void)
{
    uint8_t key[32], nonce[12], out[64];
    size_t i;
    for (i = 0; i < 32; i++) {
        key[i] = (uint8_t)i;
    }
    hex_to_bytes("000000090000004a00000000", nonce, sizeof nonce);
    perch_chacha20_block(key, 1, nonce, out);
    check_hex(out, 64,
              "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
              "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e");
}

static void rfc8439_poly1305(void)
{
    uint8_t key[32], tag[16];
    const char *msg = "Cryptographic Forum Research Group";
    hex_to_bytes("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b", key,
                 sizeof key);
    perch_poly1305(key, (const uint8_t *)msg, strlen(msg), tag);
    check_hex(tag, 16, "a8061dc1305136c6c22b8baf0c0127a9");
}

static const char SUNSCREEN[] =
    "Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    "future, sunscreen would be it.";

static void rfc8439_aead(void)
{
    uint8_t key[32], nonce[12], ad[12], buf[114], tag[16];
    size_t i;
    for (i = 0; i < 32; i++) {
        key[i] = (uint8_t)(0x80 + i);
    }
    hex_to_bytes("070000004041424344454647", nonce, sizeof nonce);
    hex_to_bytes("50515253c0c1c2c3c4c5c6c7", ad, sizeof ad);
    memcpy(buf, SUNSCREEN, sizeof buf);
    perch_aead_seal(key, nonce, ad, sizeof ad, buf, sizeof buf, tag);
    check_hex(buf, 114,
              "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
              "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
              "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
              "3ff4def08e4b7a9de576d26586cec64b6116");
    check_hex(tag, 16, "1ae10b594f09e26a7e902ecbd0600691");
    CHECK_EQ(perch_aead_open(key, nonce, ad, sizeof ad, buf, sizeof buf, tag), PERCH_PROTECT_OK);
    CHECK(memcmp(buf, SUNSCREEN, sizeof buf) == 0);
    tag[15] ^= 1;
    CHECK_EQ(perch_aead_open(key, nonce, ad, sizeof ad, buf, sizeof buf, tag),
             PERCH_PROTECT_FORGED);
}

/* The fields of one tab-separated line, in place. */
static size_t split_tabs(char *line, char **fields, size_t max)
{
    size_t n = 0;
    char *at = line;
    while (n < max) {
        char *tab = strchr(at, '\t');
        fields[n++] = at;
        if (tab == NULL) {
            break;
        }
        *tab = '\0';
        at = tab + 1;
    }
    return n;
}

static char *vectors_path(void)
{
    /* tests/vectors.txt -> tests/protect_vectors.txt */
    static char path[1024];
    const char *slash = strrchr(test_vectors_path, '/');
    size_t dir = slash ? (size_t)(slash - test_vectors_path + 1) : 0;
    if (dir + 32 > sizeof path) {
        return NULL;
    }
    memcpy(path, test_vectors_path, dir);
    strcpy(path + dir, "protect_vectors.txt");
    return path;
}

static void matches_perch_wire_vectors(void)
{
    static char line[4096];
    unsigned device = 0, broker = 0;
    const char *path = vectors_path();
    FILE *file = path ? fopen(path, "r") : NULL;
    CHECK(file != NULL);
    if (file == NULL) {
        return;
    }
    while (fgets(line, sizeof line, file)) {
        char *f[8];
        uint8_t key[32], id[64], frame[400], sealed[512], out[512], salt[7], got_salt[7];
        size_t n, frame_len, sealed_len, opened_len = 0;
        uint32_t got_counter = 0;
        line[strcspn(line, "\n")] = '\0';
        if (line[0] == '#' || line[0] == '\0') {
            continue;
        }
        n = split_tabs(line, f, 8);
        CHECK_EQ(n, 7);
        if (n != 7) {
            continue;
        }
        hex_to_bytes(f[1], key, sizeof key);
        frame_len = hex_to_bytes(f[5], frame, sizeof frame);
        sealed_len = hex_to_bytes(f[6], sealed, sizeof sealed);
        if (strcmp(f[0], "device") == 0) {
            size_t id_len = hex_to_bytes(f[2], id, sizeof id);
            size_t len = perch_seal_from_device(key, id, id_len, (uint32_t)strtoul(f[3], NULL, 10),
                                                (uint32_t)strtoul(f[4], NULL, 10), frame,
                                                frame_len, out, sizeof out);
            CHECK_EQ(len, sealed_len);
            CHECK(len == sealed_len && memcmp(out, sealed, len) == 0);
            device++;
        } else {
            uint32_t epoch = (uint32_t)strtoul(f[2], NULL, 10);
            hex_to_bytes(f[3], salt, sizeof salt);
            CHECK_EQ(perch_open_from_broker(key, epoch, sealed, sealed_len, got_salt,
                                            &got_counter, out, sizeof out, &opened_len),
                     PERCH_PROTECT_OK);
            CHECK_EQ(opened_len, frame_len);
            CHECK(opened_len == frame_len && memcmp(out, frame, frame_len) == 0);
            CHECK(memcmp(got_salt, salt, sizeof salt) == 0);
            CHECK_EQ(got_counter, strtoul(f[4], NULL, 10));
            /* Another epoch does not verify. */
            CHECK_EQ(perch_open_from_broker(key, epoch + 1, sealed, sealed_len, got_salt,
                                            &got_counter, out, sizeof out, &opened_len),
                     PERCH_PROTECT_FORGED);
            broker++;
        }
    }
    fclose(file);
    CHECK(device >= 50 && broker >= 50);
}

/* The spec's worked examples (section 9): the device ones reseal, the broker
 * one opens with the example key and device epoch 1. */
static void spec_examples(void)
{
    uint8_t key[32], out[128], salt[7];
    uint32_t counter = 0;
    size_t i, len = 0;
    const uint8_t publish[] = {0x30, 0x05, 0x32, 0x31, 0x2e, 0x35};
    const uint8_t connack[] = {0x20, 0x00, 0x78, 0x56, 0x34, 0x12};
    uint8_t sealed[64];
    size_t sealed_len;
    for (i = 0; i < 32; i++) {
        key[i] = (uint8_t)i;
    }
    len = perch_seal_from_device(key, (const uint8_t *)"dev1", 4, 1, 1, publish, sizeof publish,
                                 out, sizeof out);
    check_hex(out, len,
              "01 04 64 65 76 31 01 00 00 00 01 6f 65 10 18 55 6c 26 5f f9 e6 e9 65 6f 83 f3 b6 21 "
              "f7 5a 4c 3d 76");
    sealed_len = hex_to_bytes("02 a1 a2 a3 a4 a5 a6 a7 01 c3 59 7a 6a 98 1d 66 dc ef 5c 4a bf 9e "
                              "b5 0a 7c 44 b8 17 66 a1 07",
                              sealed, sizeof sealed);
    CHECK_EQ(perch_open_from_broker(key, 1, sealed, sealed_len, salt, &counter, out, sizeof out,
                                    &len),
             PERCH_PROTECT_OK);
    CHECK(len == sizeof connack && memcmp(out, connack, len) == 0);
    CHECK_EQ(counter, 1);
    /* Every single-bit change and every truncation is refused. */
    for (i = 0; i < sealed_len; i++) {
        unsigned bit;
        for (bit = 0; bit < 8; bit++) {
            sealed[i] ^= (uint8_t)(1u << bit);
            CHECK(perch_open_from_broker(key, 1, sealed, sealed_len, salt, &counter, out,
                                         sizeof out, &len) != PERCH_PROTECT_OK);
            sealed[i] ^= (uint8_t)(1u << bit);
        }
        CHECK(perch_open_from_broker(key, 1, sealed, i, salt, &counter, out, sizeof out, &len) !=
              PERCH_PROTECT_OK);
    }
    /* No room: refused, nothing overrun (ASan watches). */
    CHECK_EQ(perch_open_from_broker(key, 1, sealed, sealed_len, salt, &counter, out, 5, &len),
             PERCH_PROTECT_NO_ROOM);
    CHECK_EQ(perch_seal_from_device(key, (const uint8_t *)"dev1", 4, 1, 1, publish,
                                    sizeof publish, out, 32),
             0);
}

static void replay_window_matches_a_model(void)
{
    uint64_t seed = 0x5eed0fda7a00ull;
    unsigned round;
    for (round = 0; round < 100; round++) {
        perch_replay_window_t w;
        static uint32_t accepted[600][2];
        size_t count = 0, step;
        uint32_t epoch_max = 0, top = 0;
        memset(&w, 0, sizeof w);
        for (step = 0; step < 500; step++) {
            uint64_t r = test_rng_next(&seed);
            uint32_t epoch = r % 50 == 0 ? epoch_max + 1
                             : r % 50 == 1 ? (epoch_max ? epoch_max - 1 : 0)
                                           : epoch_max;
            uint32_t spread = (uint32_t)(r >> 16);
            uint32_t counter;
            int seen = 0, model_ok;
            size_t k;
            switch ((r >> 8) % 4) {
            case 0:
                counter = top + 1 + spread % 3;
                break;
            case 1:
                counter = top > spread % 70 ? top - spread % 70 : 1;
                break;
            case 2:
                counter = top + spread % 100;
                break;
            default:
                counter = 1 + spread % 200;
                break;
            }
            for (k = 0; k < count; k++) {
                seen |= accepted[k][0] == epoch && accepted[k][1] == counter;
            }
            if (counter == 0 || epoch < epoch_max) {
                model_ok = 0;
            } else if (epoch > epoch_max) {
                model_ok = 1;
            } else {
                model_ok = !seen && (counter > top || top - counter < 64);
            }
            CHECK_EQ(perch_replay_accept(&w, epoch, counter) == PERCH_PROTECT_OK, model_ok);
            if (model_ok) {
                if (epoch > epoch_max) {
                    epoch_max = epoch;
                    top = counter;
                    count = 0;
                }
                if (counter > top) {
                    top = counter;
                }
                accepted[count][0] = epoch;
                accepted[count][1] = counter;
                count++;
            }
        }
    }
}

const test_case_t protect_tests[] = {
    {"protect: RFC 8439 ChaCha20 block", rfc8439_block},
    {"protect: RFC 8439 Poly1305", rfc8439_poly1305},
    {"protect: RFC 8439 AEAD", rfc8439_aead},
    {"protect: perch-wire's sealed frames, byte for byte", matches_perch_wire_vectors},
    {"protect: the spec's examples; changed and short envelopes refused", spec_examples},
    {"protect: replay window against a model", replay_window_matches_a_model},
};
const size_t protect_tests_count = sizeof protect_tests / sizeof protect_tests[0];
