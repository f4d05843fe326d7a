/* SPDX-License-Identifier: Apache-2.0 */
/* GENERATED from perch-wire (firmware-clients/wire) by firmware-clients/c/tools/gen.
 * Do not edit: `make -C firmware-clients/c generate` rewrites it, and
 * `make -C firmware-clients/c check-generated` (part of `make test`) fails when
 * the crate changed and this file was not regenerated. */
#ifndef PERCH_WIRE_CONSTANTS_H
#define PERCH_WIRE_CONSTANTS_H

/* Limits (docs/device-protocol.md section 6). */
#define PERCH_PROTOCOL_VERSION 1u
#define PERCH_FRAME_BYTES_MAX 1024u
#define PERCH_TCP_FRAME_BYTES_MAX 65535u
#define PERCH_CLIENT_ID_BYTES_MAX 64u
#define PERCH_SUBJECT_BYTES_MAX 255u
#define PERCH_VARINT_BYTES_MAX 5u
#define PERCH_DEDUP_WINDOW_MSG_IDS 16u
#define PERCH_TCP_PREFIX_BYTES_MAX 3u
#define PERCH_KEEPALIVE_TIMEOUT_MS_PER_S 1500u
#define PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX 1031u

/* Frame types: the header's high nibble (section 2). */
#define PERCH_TYPE_CONNECT 0x1u
#define PERCH_TYPE_CONNACK 0x2u
#define PERCH_TYPE_PUBLISH 0x3u
#define PERCH_TYPE_PUBACK 0x4u
#define PERCH_TYPE_REGISTER 0x5u
#define PERCH_TYPE_REGACK 0x6u
#define PERCH_TYPE_SUBSCRIBE 0x7u
#define PERCH_TYPE_SUBACK 0x8u
#define PERCH_TYPE_UNSUBSCRIBE 0x9u
#define PERCH_TYPE_UNSUBACK 0xAu
#define PERCH_TYPE_PING 0xBu
#define PERCH_TYPE_PONG 0xCu
#define PERCH_TYPE_DISCONNECT 0xDu
#define PERCH_TYPE_RESUME 0xEu
#define PERCH_TYPE_ERROR 0xFu

/* Result codes (section 4); 11..255 are reserved. */
#define PERCH_CODE_OK 0u
#define PERCH_CODE_UNKNOWN_TOPIC 1u
#define PERCH_CODE_NOT_PERMITTED 2u
#define PERCH_CODE_TOO_LARGE 3u
#define PERCH_CODE_BUFFER_FULL 4u
#define PERCH_CODE_UNKNOWN_SESSION 5u
#define PERCH_CODE_MALFORMED 6u
#define PERCH_CODE_UNSUPPORTED_VERSION 7u
#define PERCH_CODE_INVALID_SUBJECT 8u
#define PERCH_CODE_NO_RESOURCES 9u
#define PERCH_CODE_STORE_FAILED 10u
#define PERCH_CODE_RESERVED_MIN 11u

/* Flag bits of the header's low nibble, as perch-wire's encoder sets them. */
#define PERCH_FLAG_CLEAN_SESSION 0x1u
#define PERCH_FLAG_WILL 0x2u
#define PERCH_FLAG_SESSION_PRESENT 0x1u
#define PERCH_FLAG_QOS1 0x1u
#define PERCH_FLAG_QOS_MASK 0x3u
#define PERCH_FLAG_PREDEFINED 0x4u
#define PERCH_FLAG_REPLY 0x8u
#define PERCH_FLAG_SLEEP 0x1u
#define PERCH_FLAG_MAX_QOS1 0x1u
#define PERCH_QOS_CONNECTIONLESS 0x3u

/* PERCH_VALID_FLAGS_FROM_x[type] has bit f set when a frame of that type with
 * flags f may come from x: 0 for a type that does not travel that way. It is
 * perch-wire's decoder asked about every header byte, so the C decoder's flag
 * and direction checks are the crate's, not a copy of them. */
#define PERCH_VALID_FLAGS_FROM_DEVICE { 0x0000u, 0x000Fu, 0x0000u, 0x03B3u, 0x0001u, 0x0001u, 0x0001u, 0x0003u, 0x0000u, 0x0001u, 0x0000u, 0x0001u, 0x0000u, 0x0003u, 0x0001u, 0x0000u }
#define PERCH_VALID_FLAGS_FROM_BROKER { 0x0000u, 0x0000u, 0x0003u, 0x3333u, 0x0001u, 0x0001u, 0x0001u, 0x0000u, 0x0001u, 0x0000u, 0x0001u, 0x0000u, 0x0001u, 0x0001u, 0x0000u, 0x0001u }

/* Serial framing (section 5): CRC-16 parameters and the line's byte budget. */
#define PERCH_CRC16_POLY 0x1021u
#define PERCH_CRC16_INIT 0xFFFFu
#define PERCH_CRC16_XOROUT 0x0000u
#define PERCH_CRC16_CHECK 0x29B1u
#define PERCH_SERIAL_DELIMITER 0x00u
/* The most bytes a frame of `len` bytes takes on the line (COBS of frame + CRC,
 * then the delimiter): serial::encoded_len_max. */
#define PERCH_SERIAL_BYTES_MAX(len) ((len) + 4u + ((len) + 2u) / 254u)

#endif /* PERCH_WIRE_CONSTANTS_H */
