/* SPDX-License-Identifier: Apache-2.0 */
/*
 * test.h — the C unit tests' tiny runner: CHECK macros that record the first
 * failure of a test with its line, and the case tables of each test file.
 * Host-only (uses stdio); the library under test never sees it.
 */
#ifndef PERCH_TEST_H
#define PERCH_TEST_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "perch_device.h"

typedef struct test_case {
    const char *name;
    void (*run)(void);
} test_case_t;

/* Records a failed check of the running test (the test goes on). */
void test_failed(const char *file, int line, const char *what);
/* Failed checks so far in the running test. */
extern unsigned test_failures;
/* The files the runner was given. */
extern const char *test_vectors_path;
extern const char *test_spec_path;

#define CHECK(cond)                                      \
    do {                                                 \
        if (!(cond)) {                                   \
            test_failed(__FILE__, __LINE__, #cond);      \
        }                                                \
    } while (0)

#define CHECK_EQ(a, b)                                                              \
    do {                                                                            \
        long long check_a_ = (long long)(a);                                        \
        long long check_b_ = (long long)(b);                                        \
        if (check_a_ != check_b_) {                                                 \
            char check_msg_[200];                                                   \
            snprintf(check_msg_, sizeof check_msg_, "%s == %s (%lld != %lld)", #a,  \
                     #b, check_a_, check_b_);                                       \
            test_failed(__FILE__, __LINE__, check_msg_);                            \
        }                                                                           \
    } while (0)

/* "30 05 32" or "300532" -> bytes; returns the count (asserts it fits). */
size_t hex_to_bytes(const char *hex, uint8_t *out, size_t cap);
/* bytes -> lowercase hex without spaces, NUL-terminated (truncated to fit). */
void bytes_to_hex(const uint8_t *bytes, size_t len, char *out, size_t cap);
/* The canonical one-line form of a frame (tools/gen/src/main.rs `describe`). */
void describe_frame(const perch_frame_t *frame, perch_origin_t origin, char *out, size_t cap);

/* Deterministic xorshift64. */
uint64_t test_rng_next(uint64_t *state);

extern const test_case_t wire_tests[];
extern const size_t wire_tests_count;
extern const test_case_t client_tests[];
extern const test_case_t protect_tests[];
extern const size_t protect_tests_count;
extern const size_t client_tests_count;

#endif /* PERCH_TEST_H */
