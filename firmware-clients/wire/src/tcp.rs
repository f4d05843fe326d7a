//! TCP framing: each frame is preceded by its length as a varint, at most
//! [`TCP_FRAME_BYTES_MAX`]. This module splits a byte stream; it owns no
//! buffer and no socket.

use crate::error::{DecodeError, DecodeErrorKind};
use crate::{varint, EncodeError, Frame, TCP_FRAME_BYTES_MAX};

/// The longest length prefix (65535 takes 3 bytes).
pub const PREFIX_BYTES_MAX: usize = 3;
const _: () = assert!(varint::encoded_len(TCP_FRAME_BYTES_MAX as u32) == PREFIX_BYTES_MAX);

/// Writes the length prefix for a frame of `frame_len` bytes at the start of
/// `out`; returns the prefix's length.
pub fn encode_prefix(frame_len: usize, out: &mut [u8]) -> Result<usize, EncodeError> {
    if frame_len == 0 || frame_len > TCP_FRAME_BYTES_MAX {
        return Err(EncodeError::FrameTooLong);
    }
    let len = frame_len as u32; // ≤ 65535, checked above.
    varint::encode(len, out).ok_or(EncodeError::BufferTooSmall {
        needed: varint::encoded_len(len),
    })
}

/// Writes prefix and frame at the start of `out`; returns the bytes written.
pub fn encode(frame: &Frame<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let frame_len = frame.encoded_len();
    if frame_len > TCP_FRAME_BYTES_MAX {
        return Err(EncodeError::FrameTooLong);
    }
    let prefix_len = varint::encoded_len(frame_len as u32);
    let needed = prefix_len + frame_len;
    if out.len() < needed {
        return Err(EncodeError::BufferTooSmall { needed });
    }
    encode_prefix(frame_len, out)?;
    let written = frame.encode(&mut out[prefix_len..])?;
    Ok(prefix_len + written)
}

/// Splits the first frame off a received byte stream.
///
/// * `None`: `buf` does not yet hold a whole prefix and frame; read more.
/// * `Some(Ok((frame, consumed)))`: `frame` is the frame's bytes (decode them
///   with [`crate::decode`]); drop `consumed` bytes from the stream.
/// * `Some(Err(_))`: the prefix is malformed (over 65535, zero, padded): the
///   stream cannot be resynchronised, close the connection.
pub fn split_frame(buf: &[u8]) -> Option<Result<(&[u8], usize), DecodeError>> {
    let (len, prefix_len) = match varint::decode(buf) {
        Ok(decoded) => decoded,
        // A prefix is at most 3 bytes: a longer unfinished one is already bad.
        Err(varint::VarintError::Truncated) if buf.len() < PREFIX_BYTES_MAX => return None,
        Err(varint::VarintError::Truncated) => {
            return Some(Err(DecodeError::new(None, DecodeErrorKind::FrameTooLong)))
        }
        Err(error) => return Some(Err(DecodeError::varint(None, error))),
    };
    let len = len as usize;
    if len > TCP_FRAME_BYTES_MAX {
        return Some(Err(DecodeError::new(None, DecodeErrorKind::FrameTooLong)));
    }
    if len == 0 {
        return Some(Err(DecodeError::new(None, DecodeErrorKind::Empty)));
    }
    let frame = buf.get(prefix_len..prefix_len + len)?;
    Some(Ok((frame, prefix_len + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_from_device, Frame};

    #[test]
    fn stream_of_two_frames_split_at_every_byte() {
        let mut stream = [0u8; 32];
        let first = Frame::Ping;
        let second = Frame::Resume {
            session_token: 0xDEAD_BEEF,
        };
        let a = encode(&first, &mut stream).unwrap();
        let b = encode(&second, &mut stream[a..]).unwrap();
        let stream = &stream[..a + b];
        assert_eq!(stream, &[0x01, 0xB0, 0x05, 0xE0, 0xEF, 0xBE, 0xAD, 0xDE]);
        for cut in 0..stream.len() {
            let head = &stream[..cut];
            match split_frame(head) {
                None => assert!(cut < a, "cut {cut}"),
                Some(Ok((frame, consumed))) => {
                    assert!(cut >= a);
                    assert_eq!(consumed, a);
                    assert_eq!(decode_from_device(frame), Ok(first));
                }
                Some(Err(error)) => panic!("cut {cut}: {error}"),
            }
        }
        let (frame, consumed) = split_frame(stream).unwrap().unwrap();
        assert_eq!(decode_from_device(frame), Ok(first));
        let (frame, rest) = split_frame(&stream[consumed..]).unwrap().unwrap();
        assert_eq!(decode_from_device(frame), Ok(second));
        assert_eq!(consumed + rest, stream.len());
    }

    #[test]
    fn bad_prefixes() {
        let too_long = [0x80, 0x80, 0x04]; // 65536
        assert_eq!(
            split_frame(&too_long).unwrap().unwrap_err().kind,
            DecodeErrorKind::FrameTooLong
        );
        let unfinished = [0x80, 0x80, 0x80];
        assert_eq!(
            split_frame(&unfinished).unwrap().unwrap_err().kind,
            DecodeErrorKind::FrameTooLong
        );
        assert_eq!(
            split_frame(&[0x00]).unwrap().unwrap_err().kind,
            DecodeErrorKind::Empty
        );
        assert_eq!(
            split_frame(&[0x81, 0x00]).unwrap().unwrap_err().kind,
            DecodeErrorKind::VarintNonMinimal
        );
        assert_eq!(split_frame(&[]), None);
        assert_eq!(split_frame(&[0x80]), None);
        // 65535 is a valid prefix: wait for the frame.
        assert_eq!(split_frame(&[0xFF, 0xFF, 0x03]), None);
    }

    #[test]
    fn prefix_limits() {
        let mut out = [0u8; 3];
        assert_eq!(encode_prefix(65535, &mut out), Ok(3));
        assert_eq!(out, [0xFF, 0xFF, 0x03]);
        assert_eq!(
            encode_prefix(65536, &mut out),
            Err(EncodeError::FrameTooLong)
        );
        assert_eq!(encode_prefix(0, &mut out), Err(EncodeError::FrameTooLong));
        assert_eq!(
            encode_prefix(200, &mut out[..1]),
            Err(EncodeError::BufferTooSmall { needed: 2 })
        );
        let big = [0u8; 65535 + 3];
        let payload = &big[..65535 - 2];
        let frame = Frame::Publish {
            qos: crate::Qos::AtMostOnce,
            topic: crate::TopicRef::Registered(1),
            msg_id: 0,
            payload,
        };
        let mut out = [0u8; 65535 + 3];
        assert_eq!(encode(&frame, &mut out), Ok(65535 + 3));
        let (bytes, consumed) = split_frame(&out).unwrap().unwrap();
        assert_eq!(consumed, 65538);
        assert_eq!(decode_from_device(bytes), Ok(frame));
    }
}
