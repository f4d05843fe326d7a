/* SPDX-License-Identifier: Apache-2.0 */
/*
 * perch_protect.h — protected frames of the perch device protocol
 * (docs/device-protocol.md section 9): AEAD_CHACHA20_POLY1305 (RFC 8439),
 * the device and broker envelopes, and the replay window.
 *
 * Written for this client from RFC 8439 (no code from elsewhere); checked
 * against the RFC's test vectors and against vectors that perch-wire (the
 * Rust crate the broker uses) generates (tests/protect_vectors.txt).
 *
 * No malloc, no globals, constant time in the key and the data (no table
 * lookups, no branches on secrets; the tag is compared without early exit).
 * Every function takes the caller's buffers and their capacities.
 */
#ifndef PERCH_PROTECT_H
#define PERCH_PROTECT_H

#include <stddef.h>
#include <stdint.h>

#define PERCH_KEY_BYTES 32
#define PERCH_NONCE_BYTES 12
#define PERCH_TAG_BYTES 16
#define PERCH_SALT_BYTES 7
#define PERCH_PROTECT_FROM_DEVICE 0x01
#define PERCH_PROTECT_FROM_BROKER 0x02
#define PERCH_REPLAY_WINDOW_COUNTERS 64
/* The most a device envelope adds: header, id length + 64-byte id, epoch,
 * a 5-byte counter, the tag. */
#define PERCH_DEVICE_OVERHEAD_BYTES_MAX (1 + 1 + 64 + 4 + 5 + PERCH_TAG_BYTES)

/* Why an envelope was refused (for counting; never told to the peer). */
typedef enum perch_protect_status {
    PERCH_PROTECT_OK = 0,
    PERCH_PROTECT_NOT_PROTECTED = -1, /* not the envelope of this direction */
    PERCH_PROTECT_TRUNCATED = -2,     /* ends inside the clear part or tag */
    PERCH_PROTECT_INVALID = -3,       /* a bad field: varint, counter 0, id length */
    PERCH_PROTECT_FORGED = -4,        /* the tag does not verify */
    PERCH_PROTECT_NO_ROOM = -5,       /* the output buffer is too short */
    PERCH_PROTECT_REPLAYED = -6       /* perch_replay_accept: seen, too old, stale epoch */
} perch_protect_status_t;

/* RFC 8439 §2.3: one 64-byte ChaCha20 block. */
void perch_chacha20_block(const uint8_t key[PERCH_KEY_BYTES], uint32_t counter,
                          const uint8_t nonce[PERCH_NONCE_BYTES], uint8_t out[64]);

/* RFC 8439 §2.5: the Poly1305 tag of msg under a one-time key. */
void perch_poly1305(const uint8_t key[32], const uint8_t *msg, size_t len,
                    uint8_t tag[PERCH_TAG_BYTES]);

/* RFC 8439 §2.8: encrypts buf[0..len) in place and writes the tag. */
void perch_aead_seal(const uint8_t key[PERCH_KEY_BYTES], const uint8_t nonce[PERCH_NONCE_BYTES],
                     const uint8_t *ad, size_t ad_len, uint8_t *buf, size_t len,
                     uint8_t tag[PERCH_TAG_BYTES]);

/* Verifies the tag, then decrypts buf in place: PERCH_PROTECT_OK, or
 * PERCH_PROTECT_FORGED with buf left as it came (still ciphertext). */
perch_protect_status_t perch_aead_open(const uint8_t key[PERCH_KEY_BYTES],
                                       const uint8_t nonce[PERCH_NONCE_BYTES],
                                       const uint8_t *ad, size_t ad_len, uint8_t *buf,
                                       size_t len, const uint8_t tag[PERCH_TAG_BYTES]);

/* Seals an encoded frame as device `client_id` (1..64 bytes) with (epoch,
 * counter >= 1) into out[0..cap): returns the envelope's length, 0 if it does
 * not fit or a field is invalid. frame may lie inside out only at or after
 * the place the frame goes (perch_poll_transmit_sealed puts it there). */
size_t perch_seal_from_device(const uint8_t key[PERCH_KEY_BYTES], const uint8_t *client_id,
                              size_t client_id_len, uint32_t epoch, uint32_t counter,
                              const uint8_t *frame, size_t frame_len, uint8_t *out, size_t cap);

/* Verifies and opens a broker envelope sealed for `device_epoch`; on
 * PERCH_PROTECT_OK the frame is out[0..*frame_len) and salt/counter are the
 * envelope's (the caller then checks them: its salt, its window). */
perch_protect_status_t perch_open_from_broker(const uint8_t key[PERCH_KEY_BYTES],
                                              uint32_t device_epoch, const uint8_t *in,
                                              size_t len, uint8_t salt[PERCH_SALT_BYTES],
                                              uint32_t *counter, uint8_t *out, size_t cap,
                                              size_t *frame_len);

/* A receiver's window: the highest epoch, its highest counter and a bitmap
 * of the 64 below (bit 0 = the highest). Zero it to start. */
typedef struct perch_replay_window {
    uint32_t epoch;
    uint32_t top;
    uint64_t seen;
} perch_replay_window_t;

/* Records (epoch, counter) if new: PERCH_PROTECT_OK, else
 * PERCH_PROTECT_REPLAYED and the window is unchanged. Call only for an
 * envelope whose tag verified. */
perch_protect_status_t perch_replay_accept(perch_replay_window_t *window, uint32_t epoch,
                                           uint32_t counter);

/* ------------------------------------------------------ the client, sealed
 *
 * A keyed client: perch_poll_transmit and perch_handle_input wrapped so every
 * frame sent is sealed and only verified, fresh broker frames get in.
 *
 * Epochs: every CONNECT the client sends (retransmissions too) is sealed in a
 * new epoch, so no (epoch, counter) repeats as long as no epoch does. The
 * keyring takes them PERCH_EPOCH_LEASE at a time: before the first of a lease
 * it calls store_epoch(ctx, first + PERCH_EPOCH_LEASE), which must persist the
 * value (the application passes it back as first_epoch after a reboot). With
 * store_epoch NULL the application promises that first_epoch is above every
 * epoch an earlier boot used (a boot counter x 65536).
 */
#include "perch_device.h"

#define PERCH_EPOCH_LEASE 16u

typedef struct perch_keyring {
    uint8_t key[PERCH_KEY_BYTES];
    /* The current epoch, the last counter sealed in it, the next epoch and how
     * many are left of the stored lease. */
    uint32_t epoch;
    uint32_t counter;
    uint32_t next_epoch;
    uint32_t epochs_left;
    /* Persists the next epoch; 0 on success. NULL: see above. */
    int (*store_epoch)(void *ctx, uint32_t next);
    void *ctx;
    /* The broker's salt from its first verified frame in this epoch, and the
     * window of its counters. */
    uint8_t salt[PERCH_SALT_BYTES];
    uint8_t have_salt;
    perch_replay_window_t window;
    /* Broker frames dropped: unverified, replayed, another salt, or unsealed
     * (but for ERROR UNKNOWN_SESSION). */
    uint32_t dropped;
} perch_keyring_t;

void perch_keyring_init(perch_keyring_t *keyring, const uint8_t key[PERCH_KEY_BYTES],
                        uint32_t first_epoch, int (*store_epoch)(void *ctx, uint32_t next),
                        void *ctx);

/* perch_poll_transmit, sealed. Pre: cap >= config->frame_bytes_max +
 * PERCH_DEVICE_OVERHEAD_BYTES_MAX. Returns 0 when there is nothing to send,
 * or when a new epoch could not be stored (the client retransmits later). */
size_t perch_poll_transmit_sealed(perch_client_t *client, perch_keyring_t *keyring,
                                  uint8_t *out, size_t cap);

/* perch_handle_input for a keyed client: a broker envelope is verified and
 * opened in place (bytes is overwritten with the frame; MESSAGE events point
 * into it); a frame that fails is dropped (keyring->dropped) and PERCH_OK
 * returned, as for the one unsealed frame taken (ERROR UNKNOWN_SESSION). */
perch_status_t perch_handle_sealed_input(perch_client_t *client, perch_keyring_t *keyring,
                                         uint8_t *bytes, size_t len, uint32_t now_ms);

/* perch_run (perch_device.h) for a keyed client. Pre: cap >=
 * config->frame_bytes_max + PERCH_DEVICE_OVERHEAD_BYTES_MAX. */
int perch_run_sealed(perch_client_t *client, perch_keyring_t *keyring,
                     const perch_transport_t *transport, uint8_t *buf, size_t cap,
                     uint32_t timeout_ms, perch_event_fn on_event, void *context);

#endif
