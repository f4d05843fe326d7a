//! Serial framing: `COBS(frame || crc16_le) || 0x00`.
//!
//! The CRC is CRC-16/IBM-3740 (poly 0x1021, init 0xFFFF, no reflection,
//! xorout 0; "CCITT-FALSE") over the frame bytes, appended little-endian.
//! COBS removes every 0x00 from the encoded bytes, so 0x00 only ever marks
//! the end of a frame and a receiver that joins mid-stream, or loses bytes,
//! resynchronises at the next one.
//!
//! The [`Deframer`] owns a fixed `[u8; N]` and nothing else: a run of bytes
//! longer than N between delimiters is dropped and counted, never grown into.

use crate::{EncodeError, Frame};

/// The CRC the serial framing appends.
pub const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_3740);

/// CRC-16/IBM-3740 of `bytes`.
pub fn crc16(bytes: &[u8]) -> u16 {
    CRC16.checksum(bytes)
}

/// The frame delimiter.
pub const DELIMITER: u8 = 0x00;

/// The largest COBS encoding of `len` bytes: one code byte per started run
/// of 254.
pub const fn cobs_len_max(len: usize) -> usize {
    len + len / 254 + 1
}

/// The most bytes [`encode`] writes for a frame of `frame_len` bytes: COBS of
/// frame + 2 CRC bytes, then the delimiter.
pub const fn encoded_len_max(frame_len: usize) -> usize {
    cobs_len_max(frame_len + 2) + 1
}

/// A [`Deframer`] capacity that holds any frame up to
/// [`crate::FRAME_BYTES_MAX`] (the COBS bytes of frame + CRC).
pub const DEFRAMER_BYTES_FOR_FRAME_MAX: usize = cobs_len_max(crate::FRAME_BYTES_MAX + 2);

/// Encodes `frame` for a serial line at the start of `out`: COBS over the
/// frame and its CRC, then 0x00. `out` needs [`encoded_len_max`] bytes of the
/// frame's [`Frame::encoded_len`] (the frame is staged in its tail).
pub fn encode(frame: &Frame<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let frame_len = frame.encoded_len();
    let needed = encoded_len_max(frame_len);
    if out.len() < needed {
        return Err(EncodeError::BufferTooSmall { needed });
    }
    // Stage frame || crc so that it ends where the delimiter would follow the
    // worst-case encoding; COBS then runs forward in place (its write index
    // never passes its read index, see `cobs_encode_in_place`).
    let raw_len = frame_len + 2;
    let start = needed - 1 - raw_len;
    frame.encode(&mut out[start..start + frame_len])?;
    let crc = crc16(&out[start..start + frame_len]);
    out[start + frame_len..start + raw_len].copy_from_slice(&crc.to_le_bytes());
    let len = cobs_encode_in_place(out, start, raw_len);
    out[len] = DELIMITER;
    Ok(len + 1)
}

/// Encodes frame bytes already produced by [`Frame::encode`]; same output as
/// [`encode`].
pub fn encode_bytes(frame: &[u8], out: &mut [u8]) -> Result<usize, EncodeError> {
    let needed = encoded_len_max(frame.len());
    if out.len() < needed {
        return Err(EncodeError::BufferTooSmall { needed });
    }
    let raw_len = frame.len() + 2;
    let start = needed - 1 - raw_len;
    out[start..start + frame.len()].copy_from_slice(frame);
    out[start + frame.len()..start + raw_len].copy_from_slice(&crc16(frame).to_le_bytes());
    let len = cobs_encode_in_place(out, start, raw_len);
    out[len] = DELIMITER;
    Ok(len + 1)
}

/// COBS-encodes `buf[start..start + len]` into `buf[0..]` and returns the
/// encoded length. Requires `start >= len / 254 + 1`: the write index starts
/// `start - 1` behind the read index and gains one byte per full 254-byte
/// run, so it never overwrites a byte not yet read.
fn cobs_encode_in_place(buf: &mut [u8], start: usize, len: usize) -> usize {
    assert!(start > len / 254, "COBS staging offset too small");
    let end = start + len;
    let mut code_at = 0;
    let mut write = 1;
    let mut code: u8 = 1;
    let mut read = start;
    while read < end {
        let byte = buf[read];
        read += 1;
        if byte == 0 {
            buf[code_at] = code;
            code_at = write;
            write += 1;
            code = 1;
        } else {
            buf[write] = byte;
            write += 1;
            code += 1;
            if code == 0xFF {
                buf[code_at] = code;
                code = 1;
                if read < end {
                    code_at = write;
                    write += 1;
                } else {
                    // A full run at the very end needs no trailing block.
                    return write;
                }
            }
        }
        debug_assert!(write <= read || read == end);
    }
    buf[code_at] = code;
    write
}

/// Decodes COBS in place (the output is never longer than the input);
/// `None` if any byte is 0 or a code points past the end.
fn cobs_decode_in_place(buf: &mut [u8]) -> Option<usize> {
    let len = buf.len();
    let mut read = 0;
    let mut write = 0;
    while read < len {
        let code = buf[read];
        if code == 0 {
            return None;
        }
        read += 1;
        let run = usize::from(code - 1);
        if read + run > len || buf[read..read + run].contains(&0) {
            return None;
        }
        buf.copy_within(read..read + run, write);
        write += run;
        read += run;
        if code != 0xFF && read < len {
            buf[write] = 0;
            write += 1;
        }
    }
    Some(write)
}

/// Counters of what a [`Deframer`] has seen. They wrap around rather than
/// panic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeframerStats {
    /// Frames yielded with a good CRC.
    pub frames: u32,
    /// Frames dropped because COBS or the CRC failed, or they were shorter
    /// than a header and a CRC.
    pub corrupt_dropped: u32,
    /// Runs longer than the deframer's capacity, dropped up to the next 0x00.
    pub oversize_dropped: u32,
}

/// A streaming serial decoder over a fixed `N`-byte buffer (the COBS bytes
/// of one frame: use [`DEFRAMER_BYTES_FOR_FRAME_MAX`] for the default limit).
///
/// ```
/// use perch_wire::serial::{self, Deframer};
/// use perch_wire::{decode_from_broker, Frame};
/// let mut line = [0u8; 16];
/// let n = serial::encode(&Frame::Pong, &mut line).unwrap();
/// let mut deframer = Deframer::<64>::new();
/// let mut input = &line[..n];
/// while let Some((frame, rest)) = deframer.feed(input) {
///     assert_eq!(decode_from_broker(frame), Ok(Frame::Pong));
///     input = rest;
/// }
/// assert_eq!(deframer.stats().frames, 1);
/// ```
#[derive(Clone, Debug)]
pub struct Deframer<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// Set after an overflow: ignore bytes up to the next delimiter.
    discarding: bool,
    stats: DeframerStats,
}

impl<const N: usize> Default for Deframer<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Deframer<N> {
    /// An empty deframer.
    pub const fn new() -> Self {
        Deframer {
            buf: [0; N],
            len: 0,
            discarding: false,
            stats: DeframerStats {
                frames: 0,
                corrupt_dropped: 0,
                oversize_dropped: 0,
            },
        }
    }

    /// Counters so far.
    pub const fn stats(&self) -> DeframerStats {
        self.stats
    }

    /// Drops any partial frame (e.g. after the line was re-opened).
    pub fn reset(&mut self) {
        self.len = 0;
        self.discarding = false;
    }

    /// Consumes `input` up to and including the next good frame's delimiter.
    /// Returns that frame's bytes (CRC removed, ready for
    /// [`crate::decode`]) and the input not yet consumed, or `None` once all
    /// of `input` is consumed without completing a good frame. Corrupt and
    /// oversize frames are dropped and counted on the way. Empty frames
    /// (0x00 0x00) are idle filler and are not counted.
    pub fn feed<'d, 'i>(&'d mut self, input: &'i [u8]) -> Option<(&'d [u8], &'i [u8])> {
        let mut rest = input;
        while let Some((&byte, after)) = rest.split_first() {
            rest = after;
            if byte != DELIMITER {
                if self.discarding {
                    continue;
                }
                if self.len == N {
                    self.discarding = true;
                    self.len = 0;
                    self.stats.oversize_dropped = self.stats.oversize_dropped.wrapping_add(1);
                    continue;
                }
                self.buf[self.len] = byte;
                self.len += 1;
                continue;
            }
            let encoded_len = core::mem::take(&mut self.len);
            if core::mem::take(&mut self.discarding) || encoded_len == 0 {
                continue;
            }
            match cobs_decode_in_place(&mut self.buf[..encoded_len]) {
                Some(raw_len) if raw_len >= 3 => {
                    let frame_len = raw_len - 2;
                    let (frame, crc) = self.buf[..raw_len].split_at(frame_len);
                    if crc16(frame).to_le_bytes() == crc {
                        self.stats.frames = self.stats.frames.wrapping_add(1);
                        return Some((&self.buf[..frame_len], rest));
                    }
                    self.stats.corrupt_dropped = self.stats.corrupt_dropped.wrapping_add(1);
                }
                _ => self.stats.corrupt_dropped = self.stats.corrupt_dropped.wrapping_add(1),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_from_device, Qos, TopicRef};

    fn cobs(raw: &[u8], expected: &[u8]) {
        let mut buf = [0u8; 1200];
        let start = raw.len() / 254 + 1;
        buf[start..start + raw.len()].copy_from_slice(raw);
        let len = cobs_encode_in_place(&mut buf, start, raw.len());
        assert_eq!(&buf[..len], expected, "encode {raw:02x?}");
        assert!(len <= cobs_len_max(raw.len()));
        assert!(!buf[..len].contains(&0));
        let mut copy = [0u8; 1200];
        copy[..len].copy_from_slice(&buf[..len]);
        assert_eq!(cobs_decode_in_place(&mut copy[..len]), Some(raw.len()));
        assert_eq!(&copy[..raw.len()], raw);
    }

    #[test]
    fn cobs_vectors() {
        // The examples of the COBS paper / Wikipedia.
        cobs(&[0x00], &[0x01, 0x01]);
        cobs(&[0x00, 0x00], &[0x01, 0x01, 0x01]);
        cobs(&[0x00, 0x11, 0x00], &[0x01, 0x02, 0x11, 0x01]);
        cobs(&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]);
        cobs(&[0x11, 0x22, 0x33, 0x44], &[0x05, 0x11, 0x22, 0x33, 0x44]);
        cobs(&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]);
        let mut run = [0u8; 255];
        for (index, byte) in run.iter_mut().enumerate() {
            *byte = index as u8 + 1; // 01..FF
        }
        let mut expected = [0u8; 257];
        expected[0] = 0xFF;
        expected[1..255].copy_from_slice(&run[..254]);
        cobs(&run[..254], &expected[..255]);
        expected[255] = 0x02;
        expected[256] = 0xFF;
        cobs(&run, &expected);
        let mut with_zero = [0u8; 255];
        with_zero[1..].copy_from_slice(&run[..254]);
        let mut expected = [0u8; 256];
        expected[0] = 0x01;
        expected[1] = 0xFF;
        expected[2..].copy_from_slice(&run[..254]);
        cobs(&with_zero, &expected);
    }

    #[test]
    fn cobs_long_runs_in_place() {
        for len in [253, 254, 255, 508, 509, 1026] {
            let mut raw = [0u8; 1026];
            for (index, byte) in raw[..len].iter_mut().enumerate() {
                *byte = (index % 255) as u8 + 1;
            }
            let mut buf = [0u8; 1200];
            let start = len / 254 + 1;
            buf[start..start + len].copy_from_slice(&raw[..len]);
            let encoded = cobs_encode_in_place(&mut buf, start, len);
            assert!(encoded <= cobs_len_max(len));
            assert_eq!(cobs_decode_in_place(&mut buf[..encoded]), Some(len));
            assert_eq!(&buf[..len], &raw[..len]);
        }
    }

    #[test]
    fn cobs_rejects_bad_codes() {
        assert_eq!(cobs_decode_in_place(&mut [0x05, 0x11]), None);
        assert_eq!(cobs_decode_in_place(&mut [0x02, 0x00]), None);
        assert_eq!(cobs_decode_in_place(&mut [0x00]), None);
    }

    #[test]
    fn crc_check_value() {
        // CRC-16/IBM-3740's catalogue check value.
        assert_eq!(crc16(b"123456789"), 0x29B1);
    }

    fn sample(payload: &[u8]) -> Frame<'_> {
        Frame::Publish {
            qos: Qos::AtLeastOnce,
            topic: TopicRef::Registered(9),
            msg_id: 300,
            payload,
        }
    }

    #[test]
    fn encode_matches_encode_bytes() {
        let payload = [0u8; 600];
        let frame = sample(&payload);
        let mut a = [0u8; 700];
        let mut b = [0u8; 700];
        let mut raw = [0u8; 700];
        let raw_len = frame.encode(&mut raw).unwrap();
        let n = encode(&frame, &mut a).unwrap();
        let m = encode_bytes(&raw[..raw_len], &mut b).unwrap();
        assert_eq!(&a[..n], &b[..m]);
        assert_eq!(a[n - 1], 0);
        assert!(!a[..n - 1].contains(&0));
        assert_eq!(
            encode(&frame, &mut a[..encoded_len_max(raw_len) - 1]),
            Err(EncodeError::BufferTooSmall {
                needed: encoded_len_max(raw_len)
            })
        );
    }

    #[test]
    fn frames_split_at_every_byte() {
        let mut line = [0u8; 64];
        let mut len = 0;
        let payloads: [&[u8]; 3] = [b"a", b"\x00\x00", b"hello"];
        for payload in payloads {
            len += encode(&sample(payload), &mut line[len..]).unwrap();
        }
        let line = &line[..len];
        for cut in 0..=line.len() {
            let mut deframer = Deframer::<32>::new();
            let mut seen = 0;
            for chunk in [&line[..cut], &line[cut..]] {
                let mut input = chunk;
                while let Some((frame, rest)) = deframer.feed(input) {
                    assert_eq!(decode_from_device(frame), Ok(sample(payloads[seen])));
                    seen += 1;
                    input = rest;
                }
            }
            assert_eq!(seen, 3, "cut at {cut}");
            assert_eq!(
                deframer.stats(),
                DeframerStats {
                    frames: 3,
                    corrupt_dropped: 0,
                    oversize_dropped: 0
                }
            );
        }
    }

    #[test]
    fn corruption_is_dropped_and_counted_then_resyncs() {
        let mut clean = [0u8; 32];
        let n = encode(&sample(b"data"), &mut clean).unwrap();
        for position in 0..n - 1 {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut line = [0u8; 64];
                line[..n].copy_from_slice(&clean[..n]);
                line[position] ^= flip;
                line[n..2 * n].copy_from_slice(&clean[..n]);
                let mut deframer = Deframer::<32>::new();
                let mut good = 0;
                let mut input = &line[..2 * n];
                while let Some((frame, rest)) = deframer.feed(input) {
                    assert_eq!(decode_from_device(frame), Ok(sample(b"data")));
                    good += 1;
                    input = rest;
                }
                let stats = deframer.stats();
                // A flip that turns a byte into 0x00 splits the frame into
                // two corrupt pieces; otherwise one corrupt frame. Either way
                // the clean copy after it arrives.
                assert_eq!(good, 1, "position {position} flip {flip:#x}");
                assert!((1..=2).contains(&stats.corrupt_dropped), "{stats:?}");
            }
        }
    }

    #[test]
    fn joins_mid_frame_and_drops_oversize_runs() {
        let mut clean = [0u8; 32];
        let n = encode(&sample(b"data"), &mut clean).unwrap();
        let mut deframer = Deframer::<16>::new();
        // Joining mid-frame: the tail is corrupt, the next frame is good.
        assert!(deframer.feed(&clean[3..n]).is_none());
        assert_eq!(deframer.stats().corrupt_dropped, 1);
        assert!(deframer.feed(&clean[..n]).is_some());
        // Line noise longer than the buffer: dropped once, up to the next 0x00.
        let noise = [0x55u8; 100];
        assert!(deframer.feed(&noise).is_none());
        assert!(deframer.feed(&noise).is_none());
        // The frame right after the noise is lost with it (its delimiter is
        // the first 0x00 since the noise began); the next one arrives.
        assert!(deframer.feed(&clean[..n]).is_none());
        let (frame, rest) = deframer
            .feed(&clean[..n])
            .map(|(f, r)| (f.len(), r.len()))
            .unwrap();
        assert_eq!((frame, rest), (n - 4, 0));
        let stats = deframer.stats();
        assert_eq!(stats.oversize_dropped, 1);
        assert_eq!(stats.frames, 2);
        // Idle delimiters are not frames and not errors.
        assert!(deframer.feed(&[0, 0, 0]).is_none());
        assert_eq!(deframer.stats().corrupt_dropped, 1);
    }
}
