//! The client with a device key (docs/device-protocol.md §9): what it sends
//! is sealed with a fresh counter, a new CONNECT takes a new epoch (from the
//! storage's lease), and only verified, fresh broker frames get in.

use perch_device::wire::protect::{self, BrokerEnvelope, KEY_BYTES};
use perch_device::wire::{decode_from_device, Code, Frame, Qos};
use perch_device::{Client, Config, DeviceKey, Event, Storage, StorageError, Target};

const KEY: [u8; KEY_BYTES] = [7; KEY_BYTES];

/// Keeps only the epoch (what a keyed device must persist).
#[derive(Default)]
struct EpochOnly {
    epoch: Option<u32>,
    writes: u32,
}

impl Storage for EpochOnly {
    fn store(&mut self, _: usize, _: &[u8]) -> Result<(), StorageError> {
        Ok(())
    }
    fn remove(&mut self, _: usize) -> Result<(), StorageError> {
        Ok(())
    }
    fn load(&mut self, _: usize, _: &mut [u8]) -> Result<Option<usize>, StorageError> {
        Ok(None)
    }
    fn store_msg_id_counter(&mut self, _: u32) -> Result<(), StorageError> {
        Ok(())
    }
    fn load_msg_id_counter(&mut self) -> Result<Option<u32>, StorageError> {
        Ok(None)
    }
    fn store_epoch(&mut self, next: u32) -> Result<(), StorageError> {
        self.epoch = Some(next);
        self.writes += 1;
        Ok(())
    }
    fn load_epoch(&mut self) -> Result<Option<u32>, StorageError> {
        Ok(self.epoch)
    }
}

type Keyed = Client<4, 4, 128, EpochOnly>;

fn client(storage: EpochOnly) -> Keyed {
    let mut config = Config::new(b"dev1").expect("id");
    config.key = Some(DeviceKey(KEY));
    Client::with_storage(config, storage).expect("storage")
}

/// The next frame the client sends, opened: (epoch, counter, plain frame).
fn transmit(c: &mut Keyed) -> Option<(u32, u32, Vec<u8>)> {
    let mut out = [0u8; 256];
    let n = c.poll_transmit(&mut out)?;
    let mut plain = [0u8; 256];
    let (envelope, frame) = protect::open_from_device(&KEY, &out[..n], &mut plain).expect("sealed");
    assert_eq!(envelope.client_id, b"dev1");
    Some((envelope.epoch, envelope.counter, frame.to_vec()))
}

fn from_broker(epoch: u32, salt: u8, counter: u32, frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 128];
    let envelope = BrokerEnvelope {
        salt: [salt; 7],
        counter,
    };
    let n = protect::seal_from_broker(&KEY, epoch, &envelope, frame, &mut out).expect("fits");
    out.truncate(n);
    out
}

const CONNACK: [u8; 6] = [0x20, 0x00, 0x01, 0x00, 0x00, 0x00];

#[test]
fn frames_are_sealed_and_only_verified_fresh_ones_are_taken() {
    let mut c = client(EpochOnly::default());
    c.connect(0);
    let (epoch, counter, frame) = transmit(&mut c).expect("CONNECT");
    assert_eq!(counter, 1);
    assert!(matches!(
        decode_from_device(&frame),
        Ok(Frame::Connect { .. })
    ));
    // Retransmitted CONNECT: same epoch, a new counter.
    c.handle_timeout(10_000);
    let (again, counter, _) = transmit(&mut c).expect("CONNECT again");
    assert_eq!((again, counter), (epoch, 2));
    // Unsealed, wrong epoch, or wrong key: not taken.
    c.handle_input(&CONNACK, 10_001).expect("dropped quietly");
    c.handle_input(&from_broker(epoch + 1, 1, 1, &CONNACK), 10_001)
        .expect("dropped");
    assert!(!c.is_connected());
    assert_eq!(c.stats().unverified_dropped, 2);
    c.handle_input(&from_broker(epoch, 1, 1, &CONNACK), 10_002)
        .expect("taken");
    assert!(c.is_connected());
    assert!(matches!(c.poll_event(), Some(Event::Connected { .. })));
    // A QoS 1 publish; its PUBACK replayed, or under another salt, is dropped.
    let msg_id = c
        .publish(Target::Predefined(1), b"21.5", Qos::AtLeastOnce, 10_003)
        .expect("queued");
    let (_, counter, frame) = transmit(&mut c).expect("PUBLISH");
    assert_eq!(counter, 3);
    assert!(matches!(
        decode_from_device(&frame),
        Ok(Frame::Publish { .. })
    ));
    let puback = [0x40, msg_id as u8, Code::Ok.as_u8()];
    let other_salt = from_broker(epoch, 2, 5, &puback);
    c.handle_input(&other_salt, 10_004).expect("dropped");
    let replayed = from_broker(epoch, 1, 1, &puback);
    c.handle_input(&replayed, 10_004).expect("dropped");
    assert_eq!(c.stats().unverified_dropped, 4);
    c.handle_input(&from_broker(epoch, 1, 2, &puback), 10_005)
        .expect("taken");
    assert!(matches!(c.poll_event(), Some(Event::PublishAcked { .. })));
    // The plain hint ERROR UNKNOWN_SESSION: a new CONNECT in a new epoch.
    c.handle_input(&[0xf0, 0x05, 0x0b, 0x00], 10_006)
        .expect("hint");
    let (next, counter, frame) = transmit(&mut c).expect("CONNECT");
    assert!(matches!(
        decode_from_device(&frame),
        Ok(Frame::Connect { .. })
    ));
    assert_eq!((next, counter), (epoch + 1, 1));
}

#[test]
fn epochs_never_repeat_across_reboots() {
    let mut storage = EpochOnly::default();
    let mut used = Vec::new();
    for _boot in 0..3 {
        let mut c = client(storage);
        for _ in 0..20 {
            c.connect(0);
            let (epoch, _, _) = transmit(&mut c).expect("CONNECT");
            assert!(!used.contains(&epoch), "epoch {epoch} again");
            used.push(epoch);
        }
        storage = c.into_storage();
    }
    // One write per 16 epochs (a lease), not one per CONNECT.
    assert!(storage.writes <= 6, "{} writes", storage.writes);
}

/// A storage that cannot keep the epoch: the keyed client does not connect
/// (it would risk reusing a nonce after a reboot).
#[test]
fn no_epoch_storage_no_connect() {
    struct Forgetful;
    impl Storage for Forgetful {
        fn store(&mut self, _: usize, _: &[u8]) -> Result<(), StorageError> {
            Ok(())
        }
        fn remove(&mut self, _: usize) -> Result<(), StorageError> {
            Ok(())
        }
        fn load(&mut self, _: usize, _: &mut [u8]) -> Result<Option<usize>, StorageError> {
            Ok(None)
        }
        fn store_msg_id_counter(&mut self, _: u32) -> Result<(), StorageError> {
            Ok(())
        }
        fn load_msg_id_counter(&mut self) -> Result<Option<u32>, StorageError> {
            Ok(None)
        }
    }
    let mut config = Config::new(b"dev1").expect("id");
    config.key = Some(DeviceKey(KEY));
    let mut c: Client<4, 4, 128, Forgetful> = Client::with_storage(config, Forgetful).expect("ok");
    c.connect(0);
    let mut out = [0u8; 256];
    assert_eq!(c.poll_transmit(&mut out), None);
    assert!(c.stats().storage_errors >= 1);
}
