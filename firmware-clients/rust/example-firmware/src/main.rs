//! A sensor node's main loop on the perch-device client: connect, subscribe
//! to its command subject, publish a reading each round with QoS 1, answer
//! requests, keep the session alive. The "radio" and the clock are a few
//! memory-mapped words read and written volatile, so nothing is optimised
//! away; on a board they are the modem driver and a timer.
#![no_std]
#![no_main]

use core::panic::PanicInfo;
use core::ptr::{addr_of, addr_of_mut};

use perch_device::wire::Qos;
use perch_device::{Client, Config, DeviceKey, Event, Target};

/// The stub radio: a receive buffer with its length, a transmit buffer, and
/// a millisecond clock, as a driver would expose them.
static mut RX_LEN: usize = 0;
static mut RX: [u8; 128] = [0; 128];
static mut TX: [u8; 128] = [0; 128];
static mut CLOCK_MS: u64 = 0;
/// The provisioned key and a boot counter the bootloader keeps.
static mut KEY: [u8; 32] = [0; 32];
static mut BOOTS: u32 = 0;

fn device_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        // SAFETY: single-threaded firmware; volatile, as a flash read.
        *b = unsafe { core::ptr::read_volatile(addr_of!(KEY).cast::<u8>().add(i)) };
    }
    key
}

fn boot_count() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(addr_of!(BOOTS)) }
}

fn now_ms() -> u64 {
    // SAFETY: single-threaded firmware; volatile so the loop re-reads it.
    unsafe { core::ptr::read_volatile(addr_of!(CLOCK_MS)) }
}

fn radio_recv(buf: &mut [u8]) -> usize {
    // SAFETY: as above; the "driver" fills RX and RX_LEN.
    unsafe {
        let len = core::ptr::read_volatile(addr_of!(RX_LEN)).min(buf.len());
        for (i, b) in buf.iter_mut().take(len).enumerate() {
            *b = core::ptr::read_volatile(addr_of!(RX).cast::<u8>().add(i));
        }
        core::ptr::write_volatile(addr_of_mut!(RX_LEN), 0);
        len
    }
}

fn radio_send(frame: &[u8]) {
    // SAFETY: as above; the "driver" takes TX.
    unsafe {
        for (i, &b) in frame.iter().enumerate().take(128) {
            core::ptr::write_volatile(addr_of_mut!(TX).cast::<u8>().add(i), b);
        }
    }
}

#[no_mangle]
pub extern "C" fn reset() -> ! {
    let Ok(mut config) = Config::new(b"node1") else {
        halt()
    };
    // Every frame sealed with the device's key (docs/device-protocol.md §9);
    // on a board it comes from a provisioned flash page. Without a storage
    // for the epoch, the boot counter × 65536 is the floor: new every boot.
    config.key = Some(DeviceKey(device_key()));
    config.epoch_floor = boot_count() << 16;
    // 4 subscriptions/topics, 4 QoS 1 in flight, 128-byte frames.
    let mut client: Client<4, 4, 128> = Client::new(config);
    // A sealed frame is the frame plus its envelope.
    let mut frame = [0u8; 128 + perch_device::wire::protect::DEVICE_OVERHEAD_BYTES_MAX];
    client.connect(now_ms());
    let _ = client.subscribe(b"cmd.node1", Qos::AtMostOnce, now_ms());
    let mut reading: u16 = 0;
    loop {
        let now = now_ms();
        let len = radio_recv(&mut frame);
        if len > 0 {
            let _ = client.handle_input(&frame[..len], now);
        }
        client.handle_timeout(now);
        reading = reading.wrapping_add(1);
        let _ = client.publish(
            Target::Subject(b"sensors.node1.t"),
            &reading.to_le_bytes(),
            Qos::AtLeastOnce,
            now,
        );
        while let Some(n) = client.poll_transmit(&mut frame) {
            radio_send(&frame[..n]);
        }
        let mut answer: Option<u32> = None;
        while let Some(event) = client.poll_event() {
            if let Event::Message {
                reply_handle: Some(handle),
                ..
            } = event
            {
                answer = Some(handle);
            }
        }
        if let Some(handle) = answer {
            let _ = client.reply(handle, b"ok", now);
        }
    }
}

/// Stops here (a board would reset); spins on a wait-for-interrupt hint.
fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    halt()
}
