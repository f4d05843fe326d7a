/* SPDX-License-Identifier: Apache-2.0 */
/*
 * test_main.c — runs every test case and prints one closing line
 * "NAME: N passed, M failed" (the form CI counts).
 *
 *   unit [--name NAME] VECTORS.txt SPEC.md [FILTER]
 */
#include <stdlib.h>
#include <string.h>

#include "test.h"

unsigned test_failures;
const char *test_vectors_path;
const char *test_spec_path;
static const char *current_test;

void test_failed(const char *file, int line, const char *what)
{
    if (test_failures < 8) {
        fprintf(stderr, "  %s:%d: %s: check failed: %s\n", file, line, current_test, what);
    }
    test_failures++;
}

uint64_t test_rng_next(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

size_t hex_to_bytes(const char *hex, uint8_t *out, size_t cap)
{
    size_t len = 0;
    int high = -1;
    for (; *hex; hex++) {
        int nibble;
        char ch = *hex;
        if (ch >= '0' && ch <= '9') {
            nibble = ch - '0';
        } else if (ch >= 'a' && ch <= 'f') {
            nibble = ch - 'a' + 10;
        } else if (ch >= 'A' && ch <= 'F') {
            nibble = ch - 'A' + 10;
        } else {
            continue;
        }
        if (high < 0) {
            high = nibble;
        } else {
            if (len == cap) {
                fprintf(stderr, "hex_to_bytes: %zu bytes do not fit\n", cap);
                abort();
            }
            out[len++] = (uint8_t)(high << 4 | nibble);
            high = -1;
        }
    }
    return len;
}

void bytes_to_hex(const uint8_t *bytes, size_t len, char *out, size_t cap)
{
    static const char digits[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < len && 2 * i + 2 < cap; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * i] = '\0';
}

static int run_table(const test_case_t *cases, size_t count, const char *filter,
                     unsigned *passed, unsigned *failed)
{
    size_t i;
    for (i = 0; i < count; i++) {
        if (filter && strstr(cases[i].name, filter) == NULL) {
            continue;
        }
        current_test = cases[i].name;
        test_failures = 0;
        cases[i].run();
        if (test_failures == 0) {
            (*passed)++;
            printf("ok   %s\n", cases[i].name);
        } else {
            (*failed)++;
            printf("FAIL %s (%u failed checks)\n", cases[i].name, test_failures);
        }
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *name = "unit";
    const char *filter = NULL;
    unsigned passed = 0;
    unsigned failed = 0;
    int arg = 1;
    if (arg + 1 < argc && strcmp(argv[arg], "--name") == 0) {
        name = argv[arg + 1];
        arg += 2;
    }
    if (argc - arg < 2) {
        fprintf(stderr, "usage: unit [--name NAME] VECTORS.txt SPEC.md [FILTER]\n");
        return 2;
    }
    test_vectors_path = argv[arg];
    test_spec_path = argv[arg + 1];
    if (argc - arg > 2) {
        filter = argv[arg + 2];
    }
    run_table(wire_tests, wire_tests_count, filter, &passed, &failed);
    run_table(client_tests, client_tests_count, filter, &passed, &failed);
    run_table(protect_tests, protect_tests_count, filter, &passed, &failed);
    printf("%s: %u passed, %u failed\n", name, passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}
