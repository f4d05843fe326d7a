//! What shards send each other. Messages travel in *batches* over one bounded
//! channel per destination shard (batching measured ~15× faster than a send per
//! message here); control traffic (new sockets, interest changes, shutdown) has
//! its own unbounded channel so it can never be stuck behind data, and is bounded
//! in practice by connections and subscriptions, which have limits of their own.
//!
//! A full data mailbox stops the *publisher's* reads (its reader awaits the send),
//! never a shard's loop.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::nats::session::Message;
use crate::router::{InterestChange, QueueRef, RemoteTarget};

/// Batches a shard's data mailbox holds before publishers wait.
pub(crate) const MAILBOX_BATCHES_MAX: usize = 256;
/// Envelopes a reader gathers for one shard before it sends the batch mid-pass.
pub(crate) const BATCH_ENVELOPES_MAX: usize = 512;

/// One message for one destination shard. `buf` holds subject, reply, headers and
/// payload back to back; it is shared (refcounted) by the envelopes of every
/// destination shard, so a message is copied once however far it fans out.
pub(crate) struct Envelope {
    buf: Bytes,
    subject_len: u32,
    reply_len: u32,
    /// ABSENT: no headers (PUB); otherwise the header block's length (HPUB).
    headers_len: u32,
    pub plain: bool,
    pub queues: Vec<QueueRef>,
}

/// Marks an absent reply subject or header block.
const ABSENT: u32 = u32::MAX;

/// Packs a message once for all the shards it goes to.
pub(crate) fn pack(msg: &Message<'_>) -> (Bytes, [u32; 3]) {
    let reply = msg.reply.unwrap_or_default();
    let headers = msg.headers.unwrap_or_default();
    let mut buf =
        BytesMut::with_capacity(msg.subject.len() + reply.len() + headers.len() + msg.payload.len());
    buf.put_slice(msg.subject);
    buf.put_slice(reply);
    buf.put_slice(headers);
    buf.put_slice(msg.payload);
    // Lengths fit in u32: subjects are bounded by the control line and payloads
    // by max_payload, both far below 4 GiB (checked in config validation).
    let lens = [
        msg.subject.len() as u32,
        msg.reply.map_or(ABSENT, |r| r.len() as u32),
        msg.headers.map_or(ABSENT, |h| h.len() as u32),
    ];
    (buf.freeze(), lens)
}

impl Envelope {
    pub(crate) fn new(packed: &(Bytes, [u32; 3]), target: &mut RemoteTarget) -> Envelope {
        let (buf, [subject_len, reply_len, headers_len]) = packed;
        Envelope {
            buf: buf.clone(),
            subject_len: *subject_len,
            reply_len: *reply_len,
            headers_len: *headers_len,
            plain: target.plain,
            queues: std::mem::take(&mut target.queues),
        }
    }

    /// The message, borrowed from the shared buffer.
    pub(crate) fn message(&self) -> Message<'_> {
        let subject_end = self.subject_len as usize;
        let (reply, reply_end) = if self.reply_len == ABSENT {
            (None, subject_end)
        } else {
            let end = subject_end + self.reply_len as usize;
            (Some(&self.buf[subject_end..end]), end)
        };
        let (headers, headers_end) = if self.headers_len == ABSENT {
            (None, reply_end)
        } else {
            let end = reply_end + self.headers_len as usize;
            (Some(&self.buf[reply_end..end]), end)
        };
        Message {
            subject: &self.buf[..subject_end],
            reply,
            headers,
            payload: &self.buf[headers_end..],
        }
    }
}

pub(crate) type Batch = Vec<Envelope>;

/// Control traffic between shards.
pub(crate) enum Control {
    /// Take over a socket that shard 0 accepted.
    Adopt {
        stream: std::net::TcpStream,
        client_id: u64,
        /// Over max_connections: send INFO and the error, then close.
        reject: bool,
    },
    /// Apply another shard's interest change, then signal `applied`.
    Interest {
        change: Arc<InterestChange>,
        applied: mpsc::UnboundedSender<()>,
    },
    /// Stop accepting, flush and close every client, then stop.
    Shutdown,
}

/// The sending halves of every shard's mailboxes, shared by all shards.
pub(crate) struct Peers {
    pub data: Vec<mpsc::Sender<Batch>>,
    pub control: Vec<mpsc::UnboundedSender<Control>>,
}

/// The receiving halves for one shard.
pub(crate) struct Inbox {
    pub data: mpsc::Receiver<Batch>,
    pub control: mpsc::UnboundedReceiver<Control>,
}

/// Creates the mailboxes for `shards` shards.
pub(crate) fn mailboxes(shards: usize) -> (Peers, Vec<Inbox>) {
    let mut peers = Peers {
        data: Vec::new(),
        control: Vec::new(),
    };
    let mut inboxes = Vec::new();
    for _ in 0..shards {
        let (data_tx, data_rx) = mpsc::channel(MAILBOX_BATCHES_MAX);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        peers.data.push(data_tx);
        peers.control.push(control_tx);
        inboxes.push(Inbox {
            data: data_rx,
            control: control_rx,
        });
    }
    (peers, inboxes)
}

/// A reader's outgoing batches, one per destination shard, flushed at the end of
/// each read pass (or when one fills up).
pub(crate) struct Outgoing {
    batches: Vec<Batch>,
    /// Scratch for the router's per-message targets.
    pub targets: Vec<RemoteTarget>,
}

impl Outgoing {
    pub(crate) fn new() -> Outgoing {
        Outgoing {
            batches: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// Queues envelopes for `self.targets`; returns true when some batch is full
    /// and should be flushed before reading on.
    pub(crate) fn push_targets(&mut self, msg: &Message<'_>, shard_count: usize) -> bool {
        if self.batches.len() < shard_count {
            self.batches.resize_with(shard_count, Vec::new);
        }
        let packed = pack(msg);
        let mut full = false;
        for target in &mut self.targets {
            let batch = &mut self.batches[target.shard];
            batch.push(Envelope::new(&packed, target));
            full |= batch.len() >= BATCH_ENVELOPES_MAX;
        }
        full
    }

    /// Sends every non-empty batch. Waits (stopping this reader only) while a
    /// destination mailbox is full. A closed mailbox (shard stopping) drops the batch.
    pub(crate) async fn flush(&mut self, peers: &Peers) {
        for (shard, batch) in self.batches.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let batch = std::mem::take(batch);
            match peers.data[shard].try_send(batch) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    let _ = peers.data[shard].send(batch).await;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Releases batch capacity after a burst, so idle connections stay small.
    pub(crate) fn shrink(&mut self) {
        if self.batches.iter().any(|b| b.capacity() > 64) {
            self.batches = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_every_message_shape() {
        let cases = [
            (b"a".as_slice(), None, None, b"".as_slice()),
            (b"foo.bar", Some(b"_INBOX.1".as_slice()), None, b"hello"),
            (b"foo", None, Some(b"NATS/1.0\r\nA: b\r\n\r\n".as_slice()), b"x"),
            (b"foo", Some(b"r".as_slice()), Some(b"NATS/1.0\r\n\r\n".as_slice()), b""),
            (b"foo", Some(b"".as_slice()), None, b"p"),
        ];
        for (subject, reply, headers, payload) in cases {
            let msg = Message {
                subject,
                reply,
                headers,
                payload,
            };
            let packed = pack(&msg);
            let mut target = RemoteTarget::default();
            let env = Envelope::new(&packed, &mut target);
            let back = env.message();
            assert_eq!(back.subject, subject);
            assert_eq!(back.reply, reply);
            assert_eq!(back.headers, headers);
            assert_eq!(back.payload, payload);
        }
    }
}
