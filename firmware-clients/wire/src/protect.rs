//! Protected frames (docs/device-protocol.md, "9. Protection"): any frame
//! of this crate sealed with ChaCha20-Poly1305 (RFC 8439) under a per-device
//! 32-byte key, with a sender epoch and counter that make every nonce unique
//! and let the receiver drop replays with a sliding window.
//!
//! Two envelopes, told apart by their header byte (frame type 0, which no
//! plain frame uses):
//!
//! * device → broker, `0x01`: `client_id str`, `epoch u32le`, `counter
//!   varint`, the sealed frame, a 16-byte tag. The clear part says whose key
//!   to use; it is authenticated (it is the associated data).
//! * broker → device, `0x02`: `salt [7]`, `counter varint`, the sealed frame,
//!   the tag. The associated data also carries the device's epoch (not sent:
//!   the device knows it), so a broker frame answers one device epoch only.
//!
//! What it does not do: keep any state. [`ReplayWindow`] is a value the
//! caller keeps per peer and consults only after [`open_from_device`] /
//! [`open_from_broker`] succeeded, so a forged frame never moves it. Choosing
//! epochs, counters and salts (and persisting the epoch) is the caller's.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};

use crate::{varint, CLIENT_ID_BYTES_MAX};

/// A device key: 32 bytes, the same on the device and in the broker's config.
pub const KEY_BYTES: usize = 32;
/// The Poly1305 tag at the end of every protected frame.
pub const TAG_BYTES: usize = 16;
/// The broker's per-session random salt, carried in each broker envelope.
pub const SALT_BYTES: usize = 7;
/// Header byte of a device → broker envelope.
pub const HEADER_FROM_DEVICE: u8 = 0x01;
/// Header byte of a broker → device envelope.
pub const HEADER_FROM_BROKER: u8 = 0x02;
/// How many counters behind the highest one a receiver still accepts (once).
pub const REPLAY_WINDOW_COUNTERS: u32 = 64;
/// The most a device envelope adds to a frame: header, the longest client id
/// with its length, epoch, a 5-byte counter, the tag.
pub const DEVICE_OVERHEAD_BYTES_MAX: usize =
    1 + 1 + CLIENT_ID_BYTES_MAX + 4 + varint::BYTES_MAX + TAG_BYTES;
/// The most a broker envelope adds to a frame.
pub const BROKER_OVERHEAD_BYTES_MAX: usize = 1 + SALT_BYTES + varint::BYTES_MAX + TAG_BYTES;

/// Why a protected frame was refused. The receiver does not tell the sender
/// which (the docs: no oracle); the kinds exist for counting and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtectError {
    /// The header byte is not the envelope expected from this direction.
    NotProtected,
    /// The envelope ends inside its clear part or is shorter than a tag.
    Truncated,
    /// A field of the clear part is not allowed: an empty or over-long client
    /// id, a padded or over-long counter varint, a counter of 0.
    InvalidField(&'static str),
    /// The tag does not verify: a wrong key, a changed byte, or a frame for
    /// another epoch. Nothing was learned from the contents.
    Forged,
    /// The caller's output buffer is too short (`needed` bytes).
    BufferTooSmall {
        /// The bytes the operation needs.
        needed: usize,
    },
}

impl core::fmt::Display for ProtectError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProtectError::NotProtected => f.write_str("not a protected frame from this direction"),
            ProtectError::Truncated => f.write_str("protected frame truncated"),
            ProtectError::InvalidField(field) => write!(f, "invalid {field} in protected frame"),
            ProtectError::Forged => f.write_str("protected frame does not verify"),
            ProtectError::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
        }
    }
}

impl core::error::Error for ProtectError {}

/// The clear part of a device → broker envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceEnvelope<'a> {
    /// Whose key seals the frame (and the session's client id).
    pub client_id: &'a [u8],
    /// The sender epoch: a value the device never uses twice with its key
    /// (a persisted counter, moved on at every CONNECT).
    pub epoch: u32,
    /// The frame counter within the epoch, from 1.
    pub counter: u32,
}

/// The clear part of a broker → device envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokerEnvelope {
    /// The broker's random salt for this device (the same for one session).
    pub salt: [u8; SALT_BYTES],
    /// The broker's frame counter under this salt, from 1.
    pub counter: u32,
}

/// Reads the clear part of a device envelope without any cryptography (the
/// broker uses it to find the key, or the shard that owns the client). Returns
/// the envelope and where the sealed frame starts.
pub fn peek_from_device(bytes: &[u8]) -> Result<(DeviceEnvelope<'_>, usize), ProtectError> {
    if bytes.first() != Some(&HEADER_FROM_DEVICE) {
        return Err(ProtectError::NotProtected);
    }
    let mut at = 1;
    let (id_len, n) = read_varint(&bytes[at..])?;
    at += n;
    let id_len = id_len as usize;
    if id_len == 0 || id_len > CLIENT_ID_BYTES_MAX {
        return Err(ProtectError::InvalidField("client id"));
    }
    let client_id = bytes.get(at..at + id_len).ok_or(ProtectError::Truncated)?;
    at += id_len;
    let epoch = bytes.get(at..at + 4).ok_or(ProtectError::Truncated)?;
    let epoch = u32::from_le_bytes([epoch[0], epoch[1], epoch[2], epoch[3]]);
    at += 4;
    let (counter, n) = read_varint(&bytes[at..])?;
    at += n;
    if counter == 0 {
        return Err(ProtectError::InvalidField("counter"));
    }
    if bytes.len() < at + TAG_BYTES {
        return Err(ProtectError::Truncated);
    }
    Ok((
        DeviceEnvelope {
            client_id,
            epoch,
            counter,
        },
        at,
    ))
}

/// The bytes `frame_len` takes once sealed by a device with this envelope.
pub fn device_sealed_len(client_id_len: usize, counter: u32, frame_len: usize) -> usize {
    1 + varint::encoded_len(client_id_len as u32)
        + client_id_len
        + 4
        + varint::encoded_len(counter)
        + frame_len
        + TAG_BYTES
}

/// The bytes `frame_len` takes once sealed by the broker.
pub fn broker_sealed_len(counter: u32, frame_len: usize) -> usize {
    1 + SALT_BYTES + varint::encoded_len(counter) + frame_len + TAG_BYTES
}

/// Seals `frame` (an encoded plain frame) as the device `envelope.client_id`
/// into `out`; returns the envelope's length.
pub fn seal_from_device(
    key: &[u8; KEY_BYTES],
    envelope: &DeviceEnvelope<'_>,
    frame: &[u8],
    out: &mut [u8],
) -> Result<usize, ProtectError> {
    let id = envelope.client_id;
    if id.is_empty() || id.len() > CLIENT_ID_BYTES_MAX {
        return Err(ProtectError::InvalidField("client id"));
    }
    if envelope.counter == 0 {
        return Err(ProtectError::InvalidField("counter"));
    }
    let needed = device_sealed_len(id.len(), envelope.counter, frame.len());
    let out = out
        .get_mut(..needed)
        .ok_or(ProtectError::BufferTooSmall { needed })?;
    out[0] = HEADER_FROM_DEVICE;
    let mut at = 1;
    at += varint::encode(id.len() as u32, &mut out[at..]).ok_or(ProtectError::Truncated)?;
    out[at..at + id.len()].copy_from_slice(id);
    at += id.len();
    out[at..at + 4].copy_from_slice(&envelope.epoch.to_le_bytes());
    at += 4;
    at += varint::encode(envelope.counter, &mut out[at..]).ok_or(ProtectError::Truncated)?;
    let nonce = device_nonce(envelope.epoch, envelope.counter);
    seal(key, &nonce, at, &[], frame, out)?;
    Ok(needed)
}

/// Verifies and opens a device envelope; the plain frame is written to `out`
/// and returned with the envelope. Nothing is written on failure but the
/// caller's scratch bytes.
pub fn open_from_device<'b, 'o>(
    key: &[u8; KEY_BYTES],
    bytes: &'b [u8],
    out: &'o mut [u8],
) -> Result<(DeviceEnvelope<'b>, &'o [u8]), ProtectError> {
    let (envelope, at) = peek_from_device(bytes)?;
    let nonce = device_nonce(envelope.epoch, envelope.counter);
    let plain = open(key, &nonce, &bytes[..at], &[], &bytes[at..], out)?;
    Ok((envelope, plain))
}

/// Seals `frame` for the device whose current epoch is `device_epoch`.
pub fn seal_from_broker(
    key: &[u8; KEY_BYTES],
    device_epoch: u32,
    envelope: &BrokerEnvelope,
    frame: &[u8],
    out: &mut [u8],
) -> Result<usize, ProtectError> {
    if envelope.counter == 0 {
        return Err(ProtectError::InvalidField("counter"));
    }
    let needed = broker_sealed_len(envelope.counter, frame.len());
    let out = out
        .get_mut(..needed)
        .ok_or(ProtectError::BufferTooSmall { needed })?;
    out[0] = HEADER_FROM_BROKER;
    out[1..1 + SALT_BYTES].copy_from_slice(&envelope.salt);
    let mut at = 1 + SALT_BYTES;
    at += varint::encode(envelope.counter, &mut out[at..]).ok_or(ProtectError::Truncated)?;
    let nonce = broker_nonce(&envelope.salt, envelope.counter);
    seal(key, &nonce, at, &device_epoch.to_le_bytes(), frame, out)?;
    Ok(needed)
}

/// Reads the clear part of a broker envelope; returns it and where the sealed
/// frame starts.
pub fn peek_from_broker(bytes: &[u8]) -> Result<(BrokerEnvelope, usize), ProtectError> {
    if bytes.first() != Some(&HEADER_FROM_BROKER) {
        return Err(ProtectError::NotProtected);
    }
    let salt = bytes
        .get(1..1 + SALT_BYTES)
        .ok_or(ProtectError::Truncated)?;
    let mut at = 1 + SALT_BYTES;
    let (counter, n) = read_varint(&bytes[at..])?;
    at += n;
    if counter == 0 {
        return Err(ProtectError::InvalidField("counter"));
    }
    if bytes.len() < at + TAG_BYTES {
        return Err(ProtectError::Truncated);
    }
    let mut envelope = BrokerEnvelope {
        salt: [0; SALT_BYTES],
        counter,
    };
    envelope.salt.copy_from_slice(salt);
    Ok((envelope, at))
}

/// Verifies and opens a broker envelope sealed for `device_epoch`.
pub fn open_from_broker<'o>(
    key: &[u8; KEY_BYTES],
    device_epoch: u32,
    bytes: &[u8],
    out: &'o mut [u8],
) -> Result<(BrokerEnvelope, &'o [u8]), ProtectError> {
    let (envelope, at) = peek_from_broker(bytes)?;
    let nonce = broker_nonce(&envelope.salt, envelope.counter);
    let plain = open(
        key,
        &nonce,
        &bytes[..at],
        &device_epoch.to_le_bytes(),
        &bytes[at..],
        out,
    )?;
    Ok((envelope, plain))
}

/// The 96-bit nonce of a device frame: `00 00 00 00 ‖ epoch u32le ‖ counter
/// u32le`. Broker nonces start with `01`, so the two directions (one key)
/// never share a nonce.
pub fn device_nonce(epoch: u32, counter: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..8].copy_from_slice(&epoch.to_le_bytes());
    nonce[8..12].copy_from_slice(&counter.to_le_bytes());
    nonce
}

/// The nonce of a broker frame: `01 ‖ salt[7] ‖ counter u32le`.
pub fn broker_nonce(salt: &[u8; SALT_BYTES], counter: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[0] = 0x01;
    nonce[1..8].copy_from_slice(salt);
    nonce[8..12].copy_from_slice(&counter.to_le_bytes());
    nonce
}

fn read_varint(bytes: &[u8]) -> Result<(u32, usize), ProtectError> {
    varint::decode(bytes).map_err(|e| match e {
        varint::VarintError::Truncated => ProtectError::Truncated,
        _ => ProtectError::InvalidField("varint"),
    })
}

/// `out[..header]` holds the clear part; the frame goes after it, encrypted,
/// then the tag. The associated data is the clear part, then `extra_ad`.
fn seal(
    key: &[u8; KEY_BYTES],
    nonce: &[u8; 12],
    header: usize,
    extra_ad: &[u8],
    frame: &[u8],
    out: &mut [u8],
) -> Result<(), ProtectError> {
    let body_end = header + frame.len();
    let needed = body_end + TAG_BYTES;
    if out.len() < needed {
        return Err(ProtectError::BufferTooSmall { needed });
    }
    out[header..body_end].copy_from_slice(frame);
    let (clear, rest) = out.split_at_mut(header);
    let (body, tag_out) = rest.split_at_mut(frame.len());
    let mut ad = AdBuffer::new();
    ad.push(clear)?;
    ad.push(extra_ad)?;
    let cipher = ChaCha20Poly1305::new(key.into());
    let tag = cipher
        .encrypt_in_place_detached(nonce.into(), ad.bytes(), body)
        .map_err(|_| ProtectError::InvalidField("frame length"))?;
    tag_out[..TAG_BYTES].copy_from_slice(&tag);
    Ok(())
}

fn open<'o>(
    key: &[u8; KEY_BYTES],
    nonce: &[u8; 12],
    clear: &[u8],
    extra_ad: &[u8],
    sealed: &[u8],
    out: &'o mut [u8],
) -> Result<&'o [u8], ProtectError> {
    let body_len = sealed
        .len()
        .checked_sub(TAG_BYTES)
        .ok_or(ProtectError::Truncated)?;
    let out = out
        .get_mut(..body_len)
        .ok_or(ProtectError::BufferTooSmall { needed: body_len })?;
    out.copy_from_slice(&sealed[..body_len]);
    let tag = &sealed[body_len..];
    let mut ad = AdBuffer::new();
    ad.push(clear)?;
    ad.push(extra_ad)?;
    let cipher = ChaCha20Poly1305::new(key.into());
    if cipher
        .decrypt_in_place_detached(nonce.into(), ad.bytes(), out, tag.into())
        .is_err()
    {
        // Do not leave unauthenticated plaintext in the caller's buffer.
        out.fill(0);
        return Err(ProtectError::Forged);
    }
    Ok(out)
}

/// The associated data: the clear part (at most 1 + 1 + 64 + 4 + 5 bytes)
/// and the implicit epoch, gathered on the stack (no allocator).
struct AdBuffer {
    bytes: [u8; AD_BYTES_MAX],
    len: usize,
}

const AD_BYTES_MAX: usize = DEVICE_OVERHEAD_BYTES_MAX - TAG_BYTES + 4;

impl AdBuffer {
    fn new() -> AdBuffer {
        AdBuffer {
            bytes: [0; AD_BYTES_MAX],
            len: 0,
        }
    }

    fn push(&mut self, part: &[u8]) -> Result<(), ProtectError> {
        let end = self.len + part.len();
        let slot = self
            .bytes
            .get_mut(self.len..end)
            .ok_or(ProtectError::InvalidField("associated data"))?;
        slot.copy_from_slice(part);
        self.len = end;
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A receiver's replay state for one sender: the highest epoch seen, the
/// highest counter in it, and a bitmap of the [`REPLAY_WINDOW_COUNTERS`]
/// counters below (bit 0 = the highest). A counter is accepted once; one
/// more than the window behind the highest, or from an older epoch, never.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    epoch: u32,
    top: u32,
    seen: u64,
}

/// Why [`ReplayWindow::accept`] refused a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Replay {
    /// The epoch is older than one already seen.
    StaleEpoch,
    /// The counter is further behind the highest than the window reaches.
    TooOld,
    /// The counter was accepted before.
    Seen,
}

const _: () = assert!(REPLAY_WINDOW_COUNTERS as usize == u64::BITS as usize);

impl ReplayWindow {
    /// A window that has seen nothing (every epoch, every counter ≥ 1 is new).
    pub const fn new() -> ReplayWindow {
        ReplayWindow {
            epoch: 0,
            top: 0,
            seen: 0,
        }
    }

    /// The highest epoch accepted so far (0 before any).
    pub const fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Whether `(epoch, counter)` would be accepted, without recording it.
    pub fn check(&self, epoch: u32, counter: u32) -> Result<(), Replay> {
        if epoch < self.epoch {
            return Err(Replay::StaleEpoch);
        }
        if epoch > self.epoch || counter > self.top {
            return Ok(());
        }
        let behind = self.top - counter;
        if behind >= REPLAY_WINDOW_COUNTERS {
            return Err(Replay::TooOld);
        }
        if self.seen & (1u64 << behind) != 0 {
            return Err(Replay::Seen);
        }
        Ok(())
    }

    /// Records `(epoch, counter)` if [`ReplayWindow::check`] accepts it. Call
    /// only for a frame whose tag verified.
    pub fn accept(&mut self, epoch: u32, counter: u32) -> Result<(), Replay> {
        self.check(epoch, counter)?;
        if epoch > self.epoch {
            self.epoch = epoch;
            self.top = counter;
            self.seen = 1;
        } else if counter > self.top {
            let ahead = counter - self.top;
            self.seen = if ahead >= REPLAY_WINDOW_COUNTERS {
                1
            } else {
                (self.seen << ahead) | 1
            };
            self.top = counter;
        } else {
            self.seen |= 1u64 << (self.top - counter);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> [u8; KEY_BYTES] {
        core::array::from_fn(|i| i as u8)
    }

    /// RFC 8439 §2.8.2: the AEAD this module builds on, with the RFC's own
    /// key, nonce, associated data and plaintext.
    #[test]
    fn rfc8439_aead_vector() {
        let key: [u8; 32] = core::array::from_fn(|i| 0x80 + i as u8);
        let nonce = [
            0x07, 0, 0, 0, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47,
        ];
        let ad = [
            0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7,
        ];
        let text = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut body = [0u8; 114];
        body.copy_from_slice(text);
        let tag = ChaCha20Poly1305::new((&key).into())
            .encrypt_in_place_detached((&nonce).into(), &ad, &mut body)
            .expect("fits");
        assert_eq!(
            &body[..8],
            &[0xd3, 0x1a, 0x8d, 0x34, 0x64, 0x8e, 0x60, 0xdb]
        );
        assert_eq!(
            tag.as_slice(),
            &[
                0x1a, 0xe1, 0x0b, 0x59, 0x4f, 0x09, 0xe2, 0x6a, 0x7e, 0x90, 0x2e, 0xcb, 0xd0, 0x60,
                0x06, 0x91
            ]
        );
    }

    fn sealed_device(epoch: u32, counter: u32, frame: &[u8]) -> ([u8; 128], usize) {
        let mut out = [0u8; 128];
        let envelope = DeviceEnvelope {
            client_id: b"dev1",
            epoch,
            counter,
        };
        let n = seal_from_device(&key(), &envelope, frame, &mut out).expect("fits");
        (out, n)
    }

    #[test]
    fn device_frames_round_trip_and_every_changed_byte_is_refused() {
        let frame = [0x30, 0x05, 0x32, 0x31, 0x2e, 0x35];
        let (sealed, n) = sealed_device(1, 1, &frame);
        assert_eq!(n, device_sealed_len(4, 1, frame.len()));
        assert_eq!(n, 6 + 27);
        let mut plain = [0u8; 64];
        let (envelope, opened) = open_from_device(&key(), &sealed[..n], &mut plain).expect("opens");
        assert_eq!(
            (envelope.client_id, envelope.epoch, envelope.counter),
            (&b"dev1"[..], 1, 1)
        );
        assert_eq!(opened, frame);
        for at in 0..n {
            for bit in 0..8 {
                let mut bad = sealed;
                bad[at] ^= 1 << bit;
                let mut plain = [0u8; 64];
                assert!(
                    open_from_device(&key(), &bad[..n], &mut plain).is_err(),
                    "byte {at} bit {bit}"
                );
            }
        }
        for len in 0..n {
            assert!(
                open_from_device(&key(), &sealed[..len], &mut plain).is_err(),
                "length {len}"
            );
        }
        let mut other = key();
        other[0] ^= 1;
        assert_eq!(
            open_from_device(&other, &sealed[..n], &mut plain),
            Err(ProtectError::Forged)
        );
    }

    #[test]
    fn broker_frames_are_bound_to_the_device_epoch() {
        let envelope = BrokerEnvelope {
            salt: [0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7],
            counter: 1,
        };
        let mut out = [0u8; 64];
        let n =
            seal_from_broker(&key(), 1, &envelope, &[0x40, 0x01, 0x00], &mut out).expect("fits");
        assert_eq!(n, broker_sealed_len(1, 3));
        let mut plain = [0u8; 64];
        let (got, frame) = open_from_broker(&key(), 1, &out[..n], &mut plain).expect("opens");
        assert_eq!((got, frame), (envelope, &[0x40, 0x01, 0x00][..]));
        assert_eq!(
            open_from_broker(&key(), 2, &out[..n], &mut plain),
            Err(ProtectError::Forged)
        );
        // A device envelope is not a broker one and the other way round.
        assert_eq!(
            open_from_device(&key(), &out[..n], &mut plain),
            Err(ProtectError::NotProtected)
        );
    }

    #[test]
    fn clear_parts_with_bad_fields_are_refused_before_any_crypto() {
        let check = |bytes: &[u8], want: ProtectError| {
            assert_eq!(
                peek_from_device(bytes).map(|_| ()),
                Err(want),
                "{bytes:02x?}"
            );
        };
        check(&[], ProtectError::NotProtected);
        check(&[0x30], ProtectError::NotProtected);
        check(&[0x01], ProtectError::Truncated);
        check(&[0x01, 0x00], ProtectError::InvalidField("client id"));
        check(&[0x01, 0x41], ProtectError::InvalidField("client id"));
        check(&[0x01, 0x80, 0x00], ProtectError::InvalidField("varint"));
        check(
            &[0x01, 0x01, b'a', 1, 0, 0, 0, 0x00],
            ProtectError::InvalidField("counter"),
        );
        check(
            &[0x01, 0x01, b'a', 1, 0, 0, 0, 0x01],
            ProtectError::Truncated,
        );
        check(&[0x01, 0x04, b'a'], ProtectError::Truncated);
    }

    /// The window against a model that remembers every accepted pair, over
    /// seeded random sequences of near-monotonic counters and epoch changes.
    #[test]
    fn replay_window_matches_a_model() {
        let mut seed: u64 = 0x5eed_0fda_7a00;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..200 {
            let mut window = ReplayWindow::new();
            // The model: every accepted (epoch, counter), the highest epoch and
            // its highest counter.
            let mut accepted: [(u32, u32); 512] = [(0, 0); 512];
            let mut count = 0usize;
            let (mut epoch_max, mut top) = (0u32, 0u32);
            for _ in 0..500 {
                let r = next();
                let epoch = match r % 50 {
                    0 => epoch_max + 1,
                    1 => epoch_max.saturating_sub(1),
                    _ => epoch_max,
                };
                let counter = match (r >> 8) % 4 {
                    0 => top + 1 + ((r >> 16) % 3) as u32,
                    1 => top.saturating_sub(((r >> 16) % 70) as u32).max(1),
                    2 => top + ((r >> 16) % 100) as u32,
                    _ => 1 + ((r >> 16) % 200) as u32,
                };
                let seen = accepted[..count].contains(&(epoch, counter));
                let model_ok = if epoch < epoch_max {
                    false
                } else if epoch > epoch_max {
                    true
                } else {
                    !seen && (counter > top || top - counter < REPLAY_WINDOW_COUNTERS)
                };
                let got = window.accept(epoch, counter);
                assert_eq!(
                    got.is_ok(),
                    model_ok,
                    "epoch {epoch} counter {counter}: {got:?}"
                );
                if model_ok {
                    if epoch > epoch_max {
                        epoch_max = epoch;
                        top = counter;
                        count = 0;
                    }
                    top = top.max(counter);
                    accepted[count] = (epoch, counter);
                    count += 1;
                }
            }
        }
    }
}
