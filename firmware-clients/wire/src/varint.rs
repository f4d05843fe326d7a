//! Unsigned LEB128 for `u32`: seven bits a byte, least significant first,
//! the high bit set on every byte but the last.
//!
//! Bounds: at most [`BYTES_MAX`] bytes; the fifth byte may carry only the top
//! four bits; and the encoding must be minimal (no trailing `0x80 … 0x00`
//! padding), so every value has exactly one encoding and decode ∘ encode is
//! the identity on bytes.

/// The longest encoding of a `u32`.
pub const BYTES_MAX: usize = 5;

/// Why a varint could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VarintError {
    /// The input ended on a byte with the continuation bit set (or was empty).
    Truncated,
    /// A fifth byte had its continuation bit set: six bytes or more.
    TooLong,
    /// The value is over `u32::MAX` (the fifth byte is over 0x0F).
    Overflow,
    /// The last byte is 0x00 after at least one other: a padded encoding.
    NonMinimal,
}

/// Bytes that `value` takes on the wire: 1 to 5.
pub const fn encoded_len(value: u32) -> usize {
    match value {
        0..=0x7F => 1,
        0x80..=0x3FFF => 2,
        0x4000..=0x1F_FFFF => 3,
        0x20_0000..=0x0FFF_FFFF => 4,
        _ => 5,
    }
}

/// Writes `value` at the start of `out`; returns the bytes written, or
/// `None` when `out` is shorter than [`encoded_len`]`(value)`.
pub fn encode(value: u32, out: &mut [u8]) -> Option<usize> {
    let len = encoded_len(value);
    let out = out.get_mut(..len)?;
    let mut rest = value;
    for (index, byte) in out.iter_mut().enumerate() {
        let low = (rest & 0x7F) as u8;
        rest >>= 7;
        *byte = if index + 1 < len { low | 0x80 } else { low };
    }
    debug_assert_eq!(rest, 0);
    Some(len)
}

/// Reads a varint from the start of `bytes`: the value and the bytes it took.
pub fn decode(bytes: &[u8]) -> Result<(u32, usize), VarintError> {
    let mut value: u32 = 0;
    for index in 0..BYTES_MAX {
        let Some(&byte) = bytes.get(index) else {
            return Err(VarintError::Truncated);
        };
        if index == BYTES_MAX - 1 {
            if byte & 0x80 != 0 {
                return Err(VarintError::TooLong);
            }
            if byte > 0x0F {
                return Err(VarintError::Overflow);
            }
        }
        value |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            if byte == 0 && index > 0 {
                return Err(VarintError::NonMinimal);
            }
            return Ok((value, index + 1));
        }
    }
    unreachable!("the fifth byte either ends the varint or returns an error")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: u32, bytes: &[u8]) {
        let mut out = [0u8; BYTES_MAX];
        let len = encode(value, &mut out).expect("5 bytes always fit");
        assert_eq!(&out[..len], bytes, "encode {value}");
        assert_eq!(encoded_len(value), bytes.len());
        assert_eq!(
            decode(bytes),
            Ok((value, bytes.len())),
            "decode {bytes:02x?}"
        );
    }

    #[test]
    fn boundaries() {
        check(0, &[0x00]);
        check(1, &[0x01]);
        check(127, &[0x7F]);
        check(128, &[0x80, 0x01]);
        check(300, &[0xAC, 0x02]);
        check(16383, &[0xFF, 0x7F]);
        check(16384, &[0x80, 0x80, 0x01]);
        check(0x1F_FFFF, &[0xFF, 0xFF, 0x7F]);
        check(0x20_0000, &[0x80, 0x80, 0x80, 0x01]);
        check(0x0FFF_FFFF, &[0xFF, 0xFF, 0xFF, 0x7F]);
        check(0x1000_0000, &[0x80, 0x80, 0x80, 0x80, 0x01]);
        check(u32::MAX, &[0xFF, 0xFF, 0xFF, 0xFF, 0x0F]);
    }

    #[test]
    fn malformed() {
        assert_eq!(decode(&[]), Err(VarintError::Truncated));
        assert_eq!(decode(&[0x80]), Err(VarintError::Truncated));
        assert_eq!(
            decode(&[0xFF, 0xFF, 0xFF, 0xFF]),
            Err(VarintError::Truncated)
        );
        assert_eq!(
            decode(&[0xFF, 0xFF, 0xFF, 0xFF, 0x80, 0x01]),
            Err(VarintError::TooLong)
        );
        assert_eq!(
            decode(&[0xFF, 0xFF, 0xFF, 0xFF, 0x10]),
            Err(VarintError::Overflow)
        );
        assert_eq!(decode(&[0x80, 0x00]), Err(VarintError::NonMinimal));
        assert_eq!(decode(&[0x81, 0x80, 0x00]), Err(VarintError::NonMinimal));
        assert_eq!(
            decode(&[0x80, 0x80, 0x80, 0x80, 0x00]),
            Err(VarintError::NonMinimal)
        );
    }

    #[test]
    fn short_output() {
        assert_eq!(encode(128, &mut [0u8; 1]), None);
        assert_eq!(encode(0, &mut []), None);
    }

    #[test]
    fn trailing_bytes_are_left_alone() {
        assert_eq!(decode(&[0x05, 0xFF]), Ok((5, 1)));
    }
}
