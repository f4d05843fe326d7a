//! NATS nkeys as the server side needs them: decoding a user's public key
//! (`U…`: base32 of a prefix byte, the 32-byte Ed25519 key and a CRC-16), the
//! nonce the INFO line carries, and checking CONNECT's signature of it.
//!
//! The encodings are the nkeys library's (facts in
//! ../shared/reference/security-facts.md): RFC 4648 base32 without padding,
//! CRC-16/XMODEM (polynomial 0x1021, initial 0) stored little-endian; the
//! nonce is 11 random bytes in base64url without padding (15 characters);
//! the signature arrives in base64url without padding, standard base64 also
//! accepted.

use ring::rand::SecureRandom;

/// The prefix byte of a user's public key: `U` in base32 (20 << 3).
const PREFIX_USER: u8 = 20 << 3;
/// Raw Ed25519 public key bytes.
pub const KEY_BYTES: usize = 32;
/// A public key string: base32 of prefix + key + CRC = 35 bytes.
const PUBLIC_KEY_CHARS: usize = 56;
/// Random bytes in a nonce (nats-server's size).
const NONCE_RANDOM_BYTES: usize = 11;
/// The nonce as sent: base64url of 11 bytes, no padding.
pub const NONCE_CHARS: usize = 15;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The raw key of a user's public nkey, or None if `text` is not one (wrong
/// length, alphabet, prefix or checksum).
pub fn decode_user_key(text: &str) -> Option<[u8; KEY_BYTES]> {
    if text.len() != PUBLIC_KEY_CHARS {
        return None;
    }
    let raw = base32_decode(text.as_bytes())?;
    let (body, crc) = raw.split_at(raw.len().checked_sub(2)?);
    if u16::from_le_bytes([crc[0], crc[1]]) != crc16(body) {
        return None;
    }
    let (&prefix, key) = body.split_first()?;
    if prefix != PREFIX_USER {
        return None;
    }
    key.try_into().ok()
}

/// A fresh nonce for one connection's INFO, or None if the system's random
/// source fails (the connection is then refused rather than given a
/// predictable challenge).
pub fn new_nonce() -> Option<[u8; NONCE_CHARS]> {
    let mut random = [0u8; NONCE_RANDOM_BYTES];
    ring::rand::SystemRandom::new().fill(&mut random).ok()?;
    let text = base64_encode(&random, URL_SAFE);
    text.as_bytes().try_into().ok()
}

/// `sig` (as CONNECT carries it) is `key`'s Ed25519 signature of `nonce`.
pub fn verify(key: &[u8; KEY_BYTES], nonce: &[u8], sig: &str) -> bool {
    let Some(sig) = base64_decode(sig.as_bytes()) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(nonce, &sig)
        .is_ok()
}

/// CRC-16/XMODEM.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn base32_decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &c in text {
        let v = BASE32.iter().position(|&a| a == c)? as u32;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be zero padding of the last character.
    (acc == 0).then_some(out)
}

const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 without padding in `alphabet`.
fn base64_encode(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(alphabet[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Decodes base64url or standard base64, with or without padding.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let text = match text.iter().position(|&c| c == b'=') {
        Some(pad) if text[pad..].iter().all(|&c| c == b'=') && text.len().is_multiple_of(4) => {
            &text[..pad]
        }
        Some(_) => return None,
        None => text,
    };
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    };
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = chunk.len() * 6 / 8;
        for i in 0..bytes {
            out.push((n >> (16 - 8 * i)) as u8);
        }
        // Bits below the last whole byte must be zero (a canonical encoding).
        if n & ((1u32 << (24 - 8 * bytes)) - 1) != 0 {
            return None;
        }
    }
    Some(out)
}

/// Encodings for tests (here and in tests/): a user's public key and seed
/// from raw key bytes, as the nkeys libraries write them.
#[doc(hidden)]
pub mod encode {
    fn with_crc(mut raw: Vec<u8>) -> String {
        let crc = super::crc16(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        base32_encode(&raw)
    }

    fn base32_encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        for &b in bytes {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(char::from(super::BASE32[(acc >> bits & 31) as usize]));
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            out.push(char::from(super::BASE32[(acc << (5 - bits) & 31) as usize]));
        }
        out
    }

    /// `U…` for a raw Ed25519 public key.
    pub fn user_public_key(key: &[u8; 32]) -> String {
        let mut raw = vec![super::PREFIX_USER];
        raw.extend_from_slice(key);
        with_crc(raw)
    }

    /// `SU…` for a raw Ed25519 seed (what clients are configured with).
    pub fn user_seed(seed: &[u8; 32]) -> String {
        const PREFIX_SEED: u8 = 18 << 3;
        let mut raw = vec![
            PREFIX_SEED | (super::PREFIX_USER >> 5),
            (super::PREFIX_USER & 31) << 3,
        ];
        raw.extend_from_slice(seed);
        with_crc(raw)
    }

    /// Base64url without padding (how clients send `sig`).
    pub fn base64url(bytes: &[u8]) -> String {
        super::base64_encode(bytes, super::URL_SAFE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn keypair(seed: [u8; 32]) -> ring::signature::Ed25519KeyPair {
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed")
    }

    #[test]
    fn public_keys_round_trip_and_damage_is_refused() {
        let pair = keypair([7; 32]);
        let public: [u8; 32] = pair.public_key().as_ref().try_into().expect("32 bytes");
        let text = encode::user_public_key(&public);
        assert_eq!(text.len(), 56);
        assert!(text.starts_with('U'), "{text}");
        assert_eq!(decode_user_key(&text), Some(public));
        // Every single-character change is caught (CRC, alphabet or prefix).
        for i in 0..text.len() {
            for c in ['A', 'Q', '7', 'a', '='] {
                let mut damaged = text.clone().into_bytes();
                if damaged[i] == c as u8 {
                    continue;
                }
                damaged[i] = c as u8;
                let damaged = String::from_utf8(damaged).expect("ascii");
                assert_eq!(decode_user_key(&damaged), None, "{damaged}");
            }
        }
        assert_eq!(decode_user_key(&text[..55]), None);
        assert_eq!(decode_user_key(""), None);
        // A seed is not a public key.
        let seed = encode::user_seed(&[7; 32]);
        assert!(seed.starts_with("SU"), "{seed}");
        assert_eq!(decode_user_key(&seed[..56]), None);
    }

    #[test]
    fn a_known_key_from_the_nkeys_documentation_decodes() {
        // nats-server's documentation example user key.
        let key = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
        assert!(decode_user_key(key).is_some());
    }

    #[test]
    fn nonces_are_fifteen_url_safe_characters_and_differ() {
        let a = new_nonce().expect("random");
        let b = new_nonce().expect("random");
        assert_ne!(a, b);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'));
    }

    #[test]
    fn signatures_verify_in_either_base64_and_only_for_the_nonce() {
        let pair = keypair([9; 32]);
        let public: [u8; 32] = pair.public_key().as_ref().try_into().expect("32 bytes");
        let nonce = new_nonce().expect("random");
        let sig = pair.sign(&nonce);
        let url = encode::base64url(sig.as_ref());
        assert_eq!(url.len(), 86);
        assert!(verify(&public, &nonce, &url));
        let standard = url.replace('-', "+").replace('_', "/") + "==";
        assert!(verify(&public, &nonce, &standard));
        let other = new_nonce().expect("random");
        assert!(!verify(&public, &other, &url), "signature of another nonce");
        let stranger = keypair([10; 32]);
        let stranger: [u8; 32] = stranger.public_key().as_ref().try_into().expect("32");
        assert!(!verify(&stranger, &nonce, &url), "another key");
        assert!(!verify(&public, &nonce, ""));
        assert!(!verify(&public, &nonce, "!!!!"));
        assert!(!verify(&public, &nonce, &url[..85]));
    }

    #[test]
    fn base64_round_trips_every_length() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            let text = encode::base64url(&bytes);
            assert_eq!(base64_decode(text.as_bytes()), Some(bytes), "{text}");
        }
        assert_eq!(base64_decode(b"A"), None);
        assert_eq!(base64_decode(b"AB=A"), None);
    }
}
