//! The on-disk record: one stored message framed with its length and a CRC-32C,
//! as specified (with a byte diagram and an example) in docs/store-format.md.
//!
//! Owns: encoding a record into a caller's buffer and decoding one from a byte slice
//! as a borrowed view, checking its length and checksum; the record size limits.
//!
//! Deliberately does not: read or write files, assign sequence numbers, or decide
//! what a bad record means (a torn tail or corruption is the segment's call).

/// Bytes before the subject: len, crc, seq, timestamp, subject_len, headers_len.
pub const HEADER_BYTES: usize = 4 + 4 + 8 + 8 + 2 + 4;
/// The largest record, framing included. Well above nats-server's default
/// `max_payload` (1 MiB); the config must keep `max_payload` plus subject and headers
/// under it.
pub const RECORD_BYTES_MAX: usize = 8 << 20;
/// The CRC covers everything after the crc field.
const CRC_START: usize = 8;

const _: () = assert!(RECORD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(HEADER_BYTES == 30);

/// One record: its sequence number, when it was stored and the message's bytes.
/// Decoding borrows the fields from the bytes read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub seq: u64,
    /// Nanoseconds since the Unix epoch, as the caller's clock said.
    pub timestamp_ns: i64,
    pub subject: &'a [u8],
    /// The NATS/1.0 header block, empty when the message had none.
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

/// Why a record cannot be encoded: the caller's input is over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The subject is longer than its u16 length field can say.
    #[error("subject of {bytes} bytes is longer than {} bytes", u16::MAX)]
    SubjectTooLong { bytes: usize },
    /// The whole record would be over [`RECORD_BYTES_MAX`].
    #[error("record of {bytes} bytes is larger than {RECORD_BYTES_MAX} bytes")]
    RecordTooLarge { bytes: usize },
}

/// Why bytes are not a valid record. These describe the disk's contents, never a bug
/// of ours: the caller decides whether they end the data (a torn tail) or are
/// corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the frame needs: the end of the data or a torn write.
    #[error("truncated record: needs {needed} bytes, {available} available")]
    Truncated { needed: usize, available: usize },
    /// The length field cannot frame a record: zero (unwritten space), shorter than
    /// the header, or over [`RECORD_BYTES_MAX`].
    #[error("bad record length {len}")]
    BadLength { len: u32 },
    /// The checksum does not match the bytes it covers.
    #[error("bad record crc: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    /// The checksum matches but subject and headers do not fit in the frame.
    #[error(
        "bad field lengths: subject {subject_len} + headers {headers_len} in a {len}-byte record"
    )]
    BadFieldLengths {
        subject_len: u16,
        headers_len: u32,
        len: u32,
    },
}

/// The encoded size of a record with these fields (unchecked against the limits).
pub fn encoded_len(subject: &[u8], headers: &[u8], payload: &[u8]) -> usize {
    HEADER_BYTES + subject.len() + headers.len() + payload.len()
}

/// Appends `record` to `out` and returns its encoded length. Allocates only if `out`
/// must grow.
pub fn encode(out: &mut Vec<u8>, record: &Record<'_>) -> Result<usize, EncodeError> {
    let subject_len =
        u16::try_from(record.subject.len()).map_err(|_| EncodeError::SubjectTooLong {
            bytes: record.subject.len(),
        })?;
    let len = encoded_len(record.subject, record.headers, record.payload);
    if len > RECORD_BYTES_MAX {
        return Err(EncodeError::RecordTooLarge { bytes: len });
    }
    let start = out.len();
    out.reserve(len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // the crc, filled in below
    out.extend_from_slice(&record.seq.to_le_bytes());
    out.extend_from_slice(&record.timestamp_ns.to_le_bytes());
    out.extend_from_slice(&subject_len.to_le_bytes());
    out.extend_from_slice(&(record.headers.len() as u32).to_le_bytes());
    out.extend_from_slice(record.subject);
    out.extend_from_slice(record.headers);
    out.extend_from_slice(record.payload);
    assert_eq!(out.len() - start, len, "encoded_len matches the layout");
    let crc = crc32c::crc32c(&out[start + CRC_START..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(decode(&out[start..]), Ok((*record, len)));
    Ok(len)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the length field of the record at the start of `bytes`, checked against the
/// limits: the whole frame is this many bytes.
pub fn frame_len(bytes: &[u8]) -> Result<usize, RecordError> {
    if bytes.len() < 4 {
        return Err(RecordError::Truncated {
            needed: 4,
            available: bytes.len(),
        });
    }
    let len = u32_at(bytes, 0);
    let len_usize = len as usize;
    if !(HEADER_BYTES..=RECORD_BYTES_MAX).contains(&len_usize) {
        return Err(RecordError::BadLength { len });
    }
    Ok(len_usize)
}

/// Decodes the record at the start of `bytes`, checking its frame and CRC, and returns
/// it with its encoded length. Bytes after the record are ignored.
pub fn decode(bytes: &[u8]) -> Result<(Record<'_>, usize), RecordError> {
    let len = frame_len(bytes)?;
    if bytes.len() < len {
        return Err(RecordError::Truncated {
            needed: len,
            available: bytes.len(),
        });
    }
    let frame = &bytes[..len];
    let stored = u32_at(frame, 4);
    let computed = crc32c::crc32c(&frame[CRC_START..]);
    if stored != computed {
        return Err(RecordError::BadCrc { stored, computed });
    }
    let subject_len = u16::from_le_bytes([frame[24], frame[25]]);
    let headers_len = u32_at(frame, 26);
    let body = &frame[HEADER_BYTES..];
    let subject_end = subject_len as usize;
    let headers_end = subject_end
        .checked_add(headers_len as usize)
        .filter(|&end| end <= body.len())
        .ok_or(RecordError::BadFieldLengths {
            subject_len,
            headers_len,
            len: len as u32,
        })?;
    let record = Record {
        seq: u64_at(frame, 8),
        timestamp_ns: u64_at(frame, 16) as i64,
        subject: &body[..subject_end],
        headers: &body[subject_end..headers_end],
        payload: &body[headers_end..],
    };
    Ok((record, len))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SPEC: &str = include_str!("../../docs/store-format.md");

    /// The bytes of the fenced ```hex block in the spec that follows `marker`.
    pub(crate) fn spec_example(marker: &str) -> Vec<u8> {
        let after = &SPEC[SPEC.find(marker).expect("marker in spec")..];
        let block = &after[after.find("```hex\n").expect("hex block") + 7..];
        let block = &block[..block.find("```").expect("block end")];
        let digits: String = block
            .lines()
            .map(|line| line.split('#').next().unwrap_or(""))
            .flat_map(|line| line.split_whitespace())
            .collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digits"))
            .collect()
    }

    fn render(result: Result<(Record<'_>, usize), RecordError>) -> String {
        match result {
            Ok((r, len)) => format!(
                "seq={} ts={} subject={} headers={} payload={} len={len}",
                r.seq,
                r.timestamp_ns,
                r.subject.escape_ascii(),
                r.headers.escape_ascii(),
                r.payload.escape_ascii()
            ),
            Err(error) => format!("{error:?}"),
        }
    }

    fn check(bytes: &[u8], want: &str) {
        assert_eq!(render(decode(bytes)), want, "bytes {bytes:02x?}");
    }

    fn encoded(record: &Record<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, record).unwrap();
        out
    }

    const EXAMPLE: Record<'static> = Record {
        seq: 1,
        timestamp_ns: 1_700_000_000_000_000_000,
        subject: b"a.b",
        headers: b"",
        payload: b"hi",
    };

    #[test]
    fn spec_example_decodes() {
        let bytes = spec_example("Example record");
        check(
            &bytes,
            "seq=1 ts=1700000000000000000 subject=a.b headers= payload=hi len=35",
        );
        assert_eq!(encoded(&EXAMPLE), bytes);
        let bytes = spec_example("Example with headers");
        check(
            &bytes,
            "seq=258 ts=-1 subject=x headers=NATS/1.0\\r\\n\\r\\n payload= len=43",
        );
    }

    #[test]
    fn decode_cases() {
        let good = encoded(&EXAMPLE);
        let mut with_tail = good.clone();
        with_tail.extend_from_slice(b"next record");
        check(
            &with_tail,
            "seq=1 ts=1700000000000000000 subject=a.b headers= payload=hi len=35",
        );
        check(b"", "Truncated { needed: 4, available: 0 }");
        check(&good[..3], "Truncated { needed: 4, available: 3 }");
        check(&good[..34], "Truncated { needed: 35, available: 34 }");
        check(&[0; 64], "BadLength { len: 0 }");
        check(&[29, 0, 0, 0, 0, 0], "BadLength { len: 29 }");
        check(&[1, 0, 0x80, 0, 0, 0], "BadLength { len: 8388609 }");
        let mut flipped = good.clone();
        flipped[34] ^= 1;
        check(
            &flipped,
            "BadCrc { stored: 1430564348, computed: 2804887295 }",
        );
        // A frame whose CRC matches but whose field lengths overrun it.
        let mut lying = good.clone();
        lying[24] = 6; // subject_len 6 > the 5 bytes of body
        let crc = crc32c::crc32c(&lying[8..]);
        lying[4..8].copy_from_slice(&crc.to_le_bytes());
        check(
            &lying,
            "BadFieldLengths { subject_len: 6, headers_len: 0, len: 35 }",
        );
    }

    #[test]
    fn every_prefix_is_truncated_and_every_bit_flip_is_caught() {
        let good = encoded(&Record {
            seq: 99,
            timestamp_ns: 5,
            subject: b"dev.7.telemetry",
            headers: b"NATS/1.0\r\nA: b\r\n\r\n",
            payload: b"payload bytes",
        });
        for cut in 0..good.len() {
            assert!(
                matches!(
                    decode(&good[..cut]),
                    Err(RecordError::Truncated { .. } | RecordError::BadLength { .. })
                ),
                "cut {cut}"
            );
        }
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn encode_limits() {
        let long_subject = vec![b'a'; u16::MAX as usize + 1];
        let big = vec![0; RECORD_BYTES_MAX - HEADER_BYTES];
        type Case<'a> = (&'a [u8], &'a [u8], Result<usize, EncodeError>);
        let cases: [Case<'_>; 3] = [
            (
                &long_subject,
                b"",
                Err(EncodeError::SubjectTooLong { bytes: 65536 }),
            ),
            (b"", &big, Ok(RECORD_BYTES_MAX)),
            (
                b"s",
                &big,
                Err(EncodeError::RecordTooLarge {
                    bytes: RECORD_BYTES_MAX + 1,
                }),
            ),
        ];
        for (subject, payload, want) in cases {
            let mut out = vec![7];
            let record = Record {
                subject,
                payload,
                ..EXAMPLE
            };
            assert_eq!(encode(&mut out, &record), want);
            if want.is_err() {
                assert_eq!(out, [7], "nothing appended on error");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn round_trip(
            seq: u64,
            timestamp_ns: i64,
            subject in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            headers in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            prefix in proptest::collection::vec(proptest::num::u8::ANY, 0..8),
        ) {
            let record = Record { seq, timestamp_ns, subject: &subject, headers: &headers, payload: &payload };
            let mut out = prefix.clone();
            let len = encode(&mut out, &record).unwrap();
            proptest::prop_assert_eq!(len, out.len() - prefix.len());
            proptest::prop_assert_eq!(decode(&out[prefix.len()..]), Ok((record, len)));
        }
    }
}
