/* SPDX-License-Identifier: Apache-2.0 */
/*
 * protect.c — ChaCha20, Poly1305 and their AEAD (RFC 8439), and the device
 * protocol's envelopes (docs/device-protocol.md section 9). See
 * perch_protect.h for the contract. Poly1305 works on five 26-bit limbs so
 * every product fits 64 bits on a 32-bit core without a multiply-high.
 */
#include <string.h>

#include "perch_protect.h"

/* Copies len bytes to dst from src, which may overlap it if dst <= src
 * (a byte loop: the library links no memmove). */
static void copy_down(uint8_t *dst, const uint8_t *src, size_t len)
{
    size_t i;
    for (i = 0; i < len; i++) {
        dst[i] = src[i];
    }
}

static uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void store32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* ------------------------------------------------------------- ChaCha20 */

static uint32_t rotl(uint32_t v, int n)
{
    return (v << n) | (v >> (32 - n));
}

#define QUARTER(a, b, c, d)          \
    do {                             \
        a += b;                      \
        d = rotl(d ^ a, 16);         \
        c += d;                      \
        b = rotl(b ^ c, 12);         \
        a += b;                      \
        d = rotl(d ^ a, 8);          \
        c += d;                      \
        b = rotl(b ^ c, 7);          \
    } while (0)

void perch_chacha20_block(const uint8_t key[PERCH_KEY_BYTES], uint32_t counter,
                          const uint8_t nonce[PERCH_NONCE_BYTES], uint8_t out[64])
{
    uint32_t input[16];
    uint32_t x[16];
    int i;
    /* "expand 32-byte k" */
    input[0] = 0x61707865u;
    input[1] = 0x3320646eu;
    input[2] = 0x79622d32u;
    input[3] = 0x6b206574u;
    for (i = 0; i < 8; i++) {
        input[4 + i] = load32(key + 4 * i);
    }
    input[12] = counter;
    for (i = 0; i < 3; i++) {
        input[13 + i] = load32(nonce + 4 * i);
    }
    memcpy(x, input, sizeof x);
    for (i = 0; i < 10; i++) {
        QUARTER(x[0], x[4], x[8], x[12]);
        QUARTER(x[1], x[5], x[9], x[13]);
        QUARTER(x[2], x[6], x[10], x[14]);
        QUARTER(x[3], x[7], x[11], x[15]);
        QUARTER(x[0], x[5], x[10], x[15]);
        QUARTER(x[1], x[6], x[11], x[12]);
        QUARTER(x[2], x[7], x[8], x[13]);
        QUARTER(x[3], x[4], x[9], x[14]);
    }
    for (i = 0; i < 16; i++) {
        store32(out + 4 * i, x[i] + input[i]);
    }
}

/* XORs buf with the key stream from block `counter` on. */
static void chacha20_xor(const uint8_t key[PERCH_KEY_BYTES], uint32_t counter,
                         const uint8_t nonce[PERCH_NONCE_BYTES], uint8_t *buf, size_t len)
{
    uint8_t block[64];
    size_t at = 0;
    while (at < len) {
        size_t n = len - at < 64 ? len - at : 64;
        size_t i;
        perch_chacha20_block(key, counter++, nonce, block);
        for (i = 0; i < n; i++) {
            buf[at + i] ^= block[i];
        }
        at += n;
    }
    memset(block, 0, sizeof block);
}

/* ------------------------------------------------------------- Poly1305 */

typedef struct poly1305 {
    uint32_t r[5];
    uint32_t h[5];
    uint32_t pad[4];
    uint8_t partial[16];
    size_t partial_len;
} poly1305_t;

#define MASK26 0x3ffffffu

static void poly_init(poly1305_t *st, const uint8_t key[32])
{
    /* r with the RFC's clamp (top 4 bits of bytes 3, 7, 11, 15 and bottom 2
     * of 4, 8, 12 cleared), split into 26-bit limbs. */
    st->r[0] = load32(key + 0) & 0x3ffffffu;
    st->r[1] = (load32(key + 3) >> 2) & 0x3ffff03u;
    st->r[2] = (load32(key + 6) >> 4) & 0x3ffc0ffu;
    st->r[3] = (load32(key + 9) >> 6) & 0x3f03fffu;
    st->r[4] = (load32(key + 12) >> 8) & 0x00fffffu;
    memset(st->h, 0, sizeof st->h);
    st->pad[0] = load32(key + 16);
    st->pad[1] = load32(key + 20);
    st->pad[2] = load32(key + 24);
    st->pad[3] = load32(key + 28);
    st->partial_len = 0;
}

/* h = (h + block) * r mod 2^130 - 5; `high` is 2^128's bit (1 for a full
 * block, 0 for the final padded one, which carries its own 0x01). */
static void poly_block(poly1305_t *st, const uint8_t m[16], uint32_t high)
{
    const uint32_t r0 = st->r[0], r1 = st->r[1], r2 = st->r[2], r3 = st->r[3], r4 = st->r[4];
    /* 2^130 = 5 mod p: a product past limb 4 wraps multiplied by 5. */
    const uint32_t s1 = r1 * 5, s2 = r2 * 5, s3 = r3 * 5, s4 = r4 * 5;
    uint32_t h0 = st->h[0], h1 = st->h[1], h2 = st->h[2], h3 = st->h[3], h4 = st->h[4];
    uint64_t d0, d1, d2, d3, d4;
    uint32_t c;
    h0 += load32(m + 0) & MASK26;
    h1 += (load32(m + 3) >> 2) & MASK26;
    h2 += (load32(m + 6) >> 4) & MASK26;
    h3 += (load32(m + 9) >> 6) & MASK26;
    h4 += (load32(m + 12) >> 8) | (high << 24);
    d0 = (uint64_t)h0 * r0 + (uint64_t)h1 * s4 + (uint64_t)h2 * s3 + (uint64_t)h3 * s2 +
         (uint64_t)h4 * s1;
    d1 = (uint64_t)h0 * r1 + (uint64_t)h1 * r0 + (uint64_t)h2 * s4 + (uint64_t)h3 * s3 +
         (uint64_t)h4 * s2;
    d2 = (uint64_t)h0 * r2 + (uint64_t)h1 * r1 + (uint64_t)h2 * r0 + (uint64_t)h3 * s4 +
         (uint64_t)h4 * s3;
    d3 = (uint64_t)h0 * r3 + (uint64_t)h1 * r2 + (uint64_t)h2 * r1 + (uint64_t)h3 * r0 +
         (uint64_t)h4 * s4;
    d4 = (uint64_t)h0 * r4 + (uint64_t)h1 * r3 + (uint64_t)h2 * r2 + (uint64_t)h3 * r1 +
         (uint64_t)h4 * r0;
    /* Partial carry: each limb back under 2^26 (limb 0 may end a bit over). */
    c = (uint32_t)(d0 >> 26);
    h0 = (uint32_t)d0 & MASK26;
    d1 += c;
    c = (uint32_t)(d1 >> 26);
    h1 = (uint32_t)d1 & MASK26;
    d2 += c;
    c = (uint32_t)(d2 >> 26);
    h2 = (uint32_t)d2 & MASK26;
    d3 += c;
    c = (uint32_t)(d3 >> 26);
    h3 = (uint32_t)d3 & MASK26;
    d4 += c;
    c = (uint32_t)(d4 >> 26);
    h4 = (uint32_t)d4 & MASK26;
    h0 += c * 5;
    c = h0 >> 26;
    h0 &= MASK26;
    h1 += c;
    st->h[0] = h0;
    st->h[1] = h1;
    st->h[2] = h2;
    st->h[3] = h3;
    st->h[4] = h4;
}

static void poly_update(poly1305_t *st, const uint8_t *m, size_t len)
{
    while (len > 0) {
        size_t n = 16 - st->partial_len;
        if (n > len) {
            n = len;
        }
        memcpy(st->partial + st->partial_len, m, n);
        st->partial_len += n;
        m += n;
        len -= n;
        if (st->partial_len == 16) {
            poly_block(st, st->partial, 1);
            st->partial_len = 0;
        }
    }
}

/* Zeros up to the next 16-byte boundary (the AEAD's pad16). */
static void poly_pad16(poly1305_t *st)
{
    static const uint8_t zeros[16] = {0};
    if (st->partial_len > 0) {
        poly_update(st, zeros, 16 - st->partial_len);
    }
}

static void poly_finish(poly1305_t *st, uint8_t tag[PERCH_TAG_BYTES])
{
    uint32_t h0, h1, h2, h3, h4, g0, g1, g2, g3, g4, c, keep;
    uint64_t f;
    if (st->partial_len > 0) {
        size_t i;
        st->partial[st->partial_len] = 1;
        for (i = st->partial_len + 1; i < 16; i++) {
            st->partial[i] = 0;
        }
        poly_block(st, st->partial, 0);
    }
    h0 = st->h[0];
    h1 = st->h[1];
    h2 = st->h[2];
    h3 = st->h[3];
    h4 = st->h[4];
    /* Full carry. */
    c = h1 >> 26;
    h1 &= MASK26;
    h2 += c;
    c = h2 >> 26;
    h2 &= MASK26;
    h3 += c;
    c = h3 >> 26;
    h3 &= MASK26;
    h4 += c;
    c = h4 >> 26;
    h4 &= MASK26;
    h0 += c * 5;
    c = h0 >> 26;
    h0 &= MASK26;
    h1 += c;
    /* g = h + 5 - 2^130: if it does not go negative, h >= p and g is h mod p. */
    g0 = h0 + 5;
    c = g0 >> 26;
    g0 &= MASK26;
    g1 = h1 + c;
    c = g1 >> 26;
    g1 &= MASK26;
    g2 = h2 + c;
    c = g2 >> 26;
    g2 &= MASK26;
    g3 = h3 + c;
    c = g3 >> 26;
    g3 &= MASK26;
    g4 = h4 + c - (1u << 26);
    keep = (g4 >> 31) - 1; /* all ones: take g; zero: keep h (no branch) */
    h0 = (h0 & ~keep) | (g0 & keep);
    h1 = (h1 & ~keep) | (g1 & keep);
    h2 = (h2 & ~keep) | (g2 & keep);
    h3 = (h3 & ~keep) | (g3 & keep);
    h4 = (h4 & ~keep) | (g4 & keep);
    /* h mod 2^128 in four words, plus the pad (s), mod 2^128. */
    h0 = h0 | (h1 << 26);
    h1 = (h1 >> 6) | (h2 << 20);
    h2 = (h2 >> 12) | (h3 << 14);
    h3 = (h3 >> 18) | (h4 << 8);
    f = (uint64_t)h0 + st->pad[0];
    store32(tag + 0, (uint32_t)f);
    f = (uint64_t)h1 + st->pad[1] + (f >> 32);
    store32(tag + 4, (uint32_t)f);
    f = (uint64_t)h2 + st->pad[2] + (f >> 32);
    store32(tag + 8, (uint32_t)f);
    f = (uint64_t)h3 + st->pad[3] + (f >> 32);
    store32(tag + 12, (uint32_t)f);
    memset(st, 0, sizeof *st);
}

void perch_poly1305(const uint8_t key[32], const uint8_t *msg, size_t len,
                    uint8_t tag[PERCH_TAG_BYTES])
{
    poly1305_t st;
    poly_init(&st, key);
    poly_update(&st, msg, len);
    poly_finish(&st, tag);
}

/* ---------------------------------------------------------------- AEAD */

static void aead_tag(const uint8_t key[PERCH_KEY_BYTES], const uint8_t nonce[PERCH_NONCE_BYTES],
                     const uint8_t *ad, size_t ad_len, const uint8_t *ct, size_t len,
                     uint8_t tag[PERCH_TAG_BYTES])
{
    uint8_t block[64];
    uint8_t lengths[16];
    poly1305_t st;
    /* The one-time Poly1305 key: the first 32 bytes of block 0. */
    perch_chacha20_block(key, 0, nonce, block);
    poly_init(&st, block);
    memset(block, 0, sizeof block);
    poly_update(&st, ad, ad_len);
    poly_pad16(&st);
    poly_update(&st, ct, len);
    poly_pad16(&st);
    store32(lengths + 0, (uint32_t)ad_len);
    store32(lengths + 4, (uint32_t)((uint64_t)ad_len >> 32));
    store32(lengths + 8, (uint32_t)len);
    store32(lengths + 12, (uint32_t)((uint64_t)len >> 32));
    poly_update(&st, lengths, 16);
    poly_finish(&st, tag);
}

void perch_aead_seal(const uint8_t key[PERCH_KEY_BYTES], const uint8_t nonce[PERCH_NONCE_BYTES],
                     const uint8_t *ad, size_t ad_len, uint8_t *buf, size_t len,
                     uint8_t tag[PERCH_TAG_BYTES])
{
    chacha20_xor(key, 1, nonce, buf, len);
    aead_tag(key, nonce, ad, ad_len, buf, len, tag);
}

perch_protect_status_t perch_aead_open(const uint8_t key[PERCH_KEY_BYTES],
                                       const uint8_t nonce[PERCH_NONCE_BYTES],
                                       const uint8_t *ad, size_t ad_len, uint8_t *buf,
                                       size_t len, const uint8_t tag[PERCH_TAG_BYTES])
{
    uint8_t want[PERCH_TAG_BYTES];
    uint8_t diff = 0;
    size_t i;
    aead_tag(key, nonce, ad, ad_len, buf, len, want);
    for (i = 0; i < PERCH_TAG_BYTES; i++) {
        diff |= (uint8_t)(want[i] ^ tag[i]);
    }
    if (diff != 0) {
        return PERCH_PROTECT_FORGED;
    }
    chacha20_xor(key, 1, nonce, buf, len);
    return PERCH_PROTECT_OK;
}

/* ------------------------------------------------------------ envelopes */

static size_t varint_put(uint32_t v, uint8_t *out)
{
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

/* A minimal varint of at most 5 bytes: its length, or 0 if malformed or
 * truncated (*truncated says which). */
static size_t varint_get(const uint8_t *in, size_t len, uint32_t *value, int *truncated)
{
    uint32_t v = 0;
    size_t i;
    *truncated = 0;
    for (i = 0; i < 5; i++) {
        if (i == len) {
            *truncated = 1;
            return 0;
        }
        if (i == 4 && in[i] > 0x0f) {
            return 0;
        }
        v |= (uint32_t)(in[i] & 0x7f) << (7 * i);
        if ((in[i] & 0x80) == 0) {
            if (i > 0 && in[i] == 0) {
                return 0; /* padded */
            }
            *value = v;
            return i + 1;
        }
    }
    return 0;
}

static void device_nonce(uint32_t epoch, uint32_t counter, uint8_t nonce[PERCH_NONCE_BYTES])
{
    memset(nonce, 0, 4);
    store32(nonce + 4, epoch);
    store32(nonce + 8, counter);
}

size_t perch_seal_from_device(const uint8_t key[PERCH_KEY_BYTES], const uint8_t *client_id,
                              size_t client_id_len, uint32_t epoch, uint32_t counter,
                              const uint8_t *frame, size_t frame_len, uint8_t *out, size_t cap)
{
    uint8_t header[1 + 1 + 64 + 4 + 5];
    uint8_t nonce[PERCH_NONCE_BYTES];
    size_t at = 0;
    if (client_id_len == 0 || client_id_len > 64 || counter == 0) {
        return 0;
    }
    header[at++] = PERCH_PROTECT_FROM_DEVICE;
    at += varint_put((uint32_t)client_id_len, header + at);
    memcpy(header + at, client_id, client_id_len);
    at += client_id_len;
    store32(header + at, epoch);
    at += 4;
    at += varint_put(counter, header + at);
    if (cap < at || cap - at < PERCH_TAG_BYTES || frame_len > cap - at - PERCH_TAG_BYTES) {
        return 0;
    }
    /* frame may lie inside out (perch_poll_transmit_sealed): move it first. */
    copy_down(out + at, frame, frame_len);
    memcpy(out, header, at);
    device_nonce(epoch, counter, nonce);
    perch_aead_seal(key, nonce, out, at, out + at, frame_len, out + at + frame_len);
    return at + frame_len + PERCH_TAG_BYTES;
}

perch_protect_status_t perch_open_from_broker(const uint8_t key[PERCH_KEY_BYTES],
                                              uint32_t device_epoch, const uint8_t *in,
                                              size_t len, uint8_t salt[PERCH_SALT_BYTES],
                                              uint32_t *counter, uint8_t *out, size_t cap,
                                              size_t *frame_len)
{
    /* The associated data: the clear part, then the device's epoch. */
    uint8_t ad[1 + PERCH_SALT_BYTES + 5 + 4];
    uint8_t nonce[PERCH_NONCE_BYTES];
    uint8_t tag[PERCH_TAG_BYTES];
    size_t at = 1 + PERCH_SALT_BYTES;
    size_t n, body;
    int truncated;
    perch_protect_status_t status;
    if (len == 0 || in[0] != PERCH_PROTECT_FROM_BROKER) {
        return PERCH_PROTECT_NOT_PROTECTED;
    }
    if (len < at) {
        return PERCH_PROTECT_TRUNCATED;
    }
    n = varint_get(in + at, len - at, counter, &truncated);
    if (n == 0) {
        return truncated ? PERCH_PROTECT_TRUNCATED : PERCH_PROTECT_INVALID;
    }
    if (*counter == 0) {
        return PERCH_PROTECT_INVALID;
    }
    at += n;
    if (len - at < PERCH_TAG_BYTES) {
        return PERCH_PROTECT_TRUNCATED;
    }
    body = len - at - PERCH_TAG_BYTES;
    if (body > cap) {
        return PERCH_PROTECT_NO_ROOM;
    }
    /* Everything read from `in` before `out` is written: out may be in. */
    memcpy(ad, in, at);
    store32(ad + at, device_epoch);
    memcpy(salt, in + 1, PERCH_SALT_BYTES);
    memcpy(tag, in + at + body, PERCH_TAG_BYTES);
    nonce[0] = 0x01;
    memcpy(nonce + 1, salt, PERCH_SALT_BYTES);
    store32(nonce + 8, *counter);
    copy_down(out, in + at, body);
    status = perch_aead_open(key, nonce, ad, at + 4, out, body, tag);
    if (status != PERCH_PROTECT_OK) {
        memset(out, 0, body);
        return status;
    }
    *frame_len = body;
    return PERCH_PROTECT_OK;
}

perch_protect_status_t perch_replay_accept(perch_replay_window_t *w, uint32_t epoch,
                                           uint32_t counter)
{
    if (counter == 0 || epoch < w->epoch) {
        return PERCH_PROTECT_REPLAYED;
    }
    if (epoch > w->epoch) {
        w->epoch = epoch;
        w->top = counter;
        w->seen = 1;
        return PERCH_PROTECT_OK;
    }
    if (counter > w->top) {
        uint32_t ahead = counter - w->top;
        w->seen = ahead >= PERCH_REPLAY_WINDOW_COUNTERS ? 1 : (w->seen << ahead) | 1;
        w->top = counter;
        return PERCH_PROTECT_OK;
    }
    {
        uint32_t behind = w->top - counter;
        if (behind >= PERCH_REPLAY_WINDOW_COUNTERS || (w->seen >> behind & 1) != 0) {
            return PERCH_PROTECT_REPLAYED;
        }
        w->seen |= (uint64_t)1 << behind;
    }
    return PERCH_PROTECT_OK;
}

/* ------------------------------------------------------ the client, sealed */

void perch_keyring_init(perch_keyring_t *k, const uint8_t key[PERCH_KEY_BYTES],
                        uint32_t first_epoch, int (*store_epoch)(void *ctx, uint32_t next),
                        void *ctx)
{
    memset(k, 0, sizeof *k);
    memcpy(k->key, key, PERCH_KEY_BYTES);
    k->next_epoch = first_epoch;
    k->store_epoch = store_epoch;
    k->ctx = ctx;
}

/* A new epoch for a CONNECT: 0, or -1 if none can be made sure of. */
static int next_epoch(perch_keyring_t *k)
{
    if (k->epochs_left == 0) {
        if (k->store_epoch == NULL) {
            k->epochs_left = UINT32_MAX;
        } else {
            if (k->next_epoch > UINT32_MAX - PERCH_EPOCH_LEASE ||
                k->store_epoch(k->ctx, k->next_epoch + PERCH_EPOCH_LEASE) != 0) {
                return -1;
            }
            k->epochs_left = PERCH_EPOCH_LEASE;
        }
    }
    if (k->next_epoch == UINT32_MAX) {
        return -1;
    }
    k->epoch = k->next_epoch++;
    k->epochs_left--;
    k->counter = 0;
    k->have_salt = 0;
    memset(&k->window, 0, sizeof k->window);
    return 0;
}

size_t perch_poll_transmit_sealed(perch_client_t *client, perch_keyring_t *k, uint8_t *out,
                                  size_t cap)
{
    const perch_config_t *config = client->config;
    /* The plain frame goes where it leaves room for the longest clear part. */
    size_t room = 1 + 1 + config->client_id_len + 4 + 5;
    size_t n;
    uint8_t *frame;
    if (cap <= room + PERCH_TAG_BYTES) {
        return 0;
    }
    frame = out + room;
    n = perch_poll_transmit(client, frame, cap - room - PERCH_TAG_BYTES);
    if (n == 0) {
        return 0;
    }
    if (frame[0] >> 4 == PERCH_TYPE_CONNECT && next_epoch(k) != 0) {
        return 0;
    }
    if (k->counter == UINT32_MAX) {
        return 0; /* out of counters: the next CONNECT starts a new epoch */
    }
    k->counter++;
    return perch_seal_from_device(k->key, config->client_id, config->client_id_len, k->epoch,
                                  k->counter, frame, n, out, cap);
}

static int same_salt(const uint8_t *a, const uint8_t *b)
{
    uint8_t diff = 0;
    size_t i;
    for (i = 0; i < PERCH_SALT_BYTES; i++) {
        diff |= (uint8_t)(a[i] ^ b[i]);
    }
    return diff == 0;
}

perch_status_t perch_handle_sealed_input(perch_client_t *client, perch_keyring_t *k,
                                         uint8_t *bytes, size_t len, uint32_t now_ms)
{
    uint8_t salt[PERCH_SALT_BYTES];
    uint32_t counter = 0;
    size_t frame_len = 0;
    if (len > 0 && bytes[0] == PERCH_PROTECT_FROM_BROKER) {
        if (perch_open_from_broker(k->key, k->epoch, bytes, len, salt, &counter, bytes, len,
                                   &frame_len) != PERCH_PROTECT_OK ||
            (k->have_salt && !same_salt(salt, k->salt))) {
            k->dropped++;
            return PERCH_OK;
        }
        /* One window per salt: the broker's counters run per salt. */
        if (perch_replay_accept(&k->window, 0, counter) != PERCH_PROTECT_OK) {
            k->dropped++;
            return PERCH_OK;
        }
        memcpy(k->salt, salt, PERCH_SALT_BYTES);
        k->have_salt = 1;
        return perch_handle_input(client, bytes, frame_len, now_ms);
    }
    /* Unsealed: only ERROR UNKNOWN_SESSION, whose only effect is a CONNECT. */
    if (len >= 2 && bytes[0] == (PERCH_TYPE_ERROR << 4) && bytes[1] == PERCH_CODE_UNKNOWN_SESSION) {
        return perch_handle_input(client, bytes, len, now_ms);
    }
    k->dropped++;
    return PERCH_OK;
}
