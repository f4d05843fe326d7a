//! What shards send each other. Messages travel in *batches* over one bounded
//! channel per destination shard (batching measured ~15× faster than a send per
//! message here); control traffic (new sockets, interest changes, shutdown) has
//! its own unbounded channel so it can never be stuck behind data, and is bounded
//! in practice by connections and subscriptions, which have limits of their own.
//!
//! A full data mailbox stops the *publisher's* reads (its reader awaits the send),
//! never a shard's loop.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::nats::session::Message;
use crate::router::{InterestChange, QueueRef, RemoteTarget};

/// Batches a shard's data mailbox holds before publishers wait.
pub(crate) const MAILBOX_BATCHES_MAX: usize = 256;
/// Envelopes a reader gathers for one shard before it sends the batch mid-pass.
pub(crate) const BATCH_ENVELOPES_MAX: usize = 1024;
/// Message bytes a reader gathers for one shard before it sends the batch mid-pass
/// (a single larger message still travels whole, in a batch of its own).
pub(crate) const BATCH_BYTES_MAX: usize = 256 * 1024;

/// Messages for one destination shard. Every message's subject, reply, headers
/// and payload are copied back to back into `data`, so a batch costs two
/// allocations however many messages it carries: per-message allocations (and
/// freeing them on another thread) measured as the largest cost of cross-shard
/// delivery.
#[derive(Default)]
pub(crate) struct Batch {
    data: Vec<u8>,
    pub envelopes: Vec<Envelope>,
}

/// One message's place in its batch's `data`, and where it goes on the shard.
pub(crate) struct Envelope {
    start: u32,
    subject_len: u32,
    /// ABSENT: no reply subject.
    reply_len: u32,
    /// ABSENT: no headers (PUB); otherwise the header block's length (HPUB).
    headers_len: u32,
    payload_len: u32,
    pub plain: bool,
    pub queues: Vec<QueueRef>,
}

/// Marks an absent reply subject or header block.
const ABSENT: u32 = u32::MAX;

impl Batch {
    /// An empty batch sized like `self`, so a steady stream of batches does not
    /// regrow its buffers from zero each time.
    fn empty_like(&self) -> Batch {
        Batch {
            data: Vec::with_capacity(self.data.len()),
            envelopes: Vec::with_capacity(self.envelopes.len()),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
    }

    fn is_full(&self) -> bool {
        self.envelopes.len() >= BATCH_ENVELOPES_MAX || self.data.len() >= BATCH_BYTES_MAX
    }

    /// Appends a message for `target`.
    pub(crate) fn push(&mut self, msg: &Message<'_>, target: &mut RemoteTarget) {
        let start = self.data.len();
        let reply = msg.reply.unwrap_or_default();
        let headers = msg.headers.unwrap_or_default();
        self.data.extend_from_slice(msg.subject);
        self.data.extend_from_slice(reply);
        self.data.extend_from_slice(headers);
        self.data.extend_from_slice(msg.payload);
        // Lengths fit in u32: subjects are bounded by the control line and payloads
        // by max_payload, and a batch stops growing at BATCH_BYTES_MAX plus one
        // message, all far below 4 GiB.
        assert!(self.data.len() < ABSENT as usize, "batch data within u32");
        self.envelopes.push(Envelope {
            start: start as u32,
            subject_len: msg.subject.len() as u32,
            reply_len: msg.reply.map_or(ABSENT, |r| r.len() as u32),
            headers_len: msg.headers.map_or(ABSENT, |h| h.len() as u32),
            payload_len: msg.payload.len() as u32,
            plain: target.plain,
            queues: std::mem::take(&mut target.queues),
        });
    }

    /// The messages with their routing, borrowed from the batch.
    pub(crate) fn messages(&self) -> impl Iterator<Item = (Message<'_>, &Envelope)> {
        self.envelopes.iter().map(|e| (e.message(&self.data), e))
    }
}

impl Envelope {
    fn message<'a>(&self, data: &'a [u8]) -> Message<'a> {
        let mut at = self.start as usize;
        let mut take = |len: u32| {
            let slice = &data[at..at + len as usize];
            at += len as usize;
            slice
        };
        let subject = take(self.subject_len);
        let reply = (self.reply_len != ABSENT).then(|| take(self.reply_len));
        let headers = (self.headers_len != ABSENT).then(|| take(self.headers_len));
        let payload = take(self.payload_len);
        Message {
            subject,
            reply,
            headers,
            payload,
        }
    }
}

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

    /// Queues the message for every shard in `self.targets`; returns true when
    /// some batch is full and should be flushed before reading on.
    pub(crate) fn push_targets(&mut self, msg: &Message<'_>, shard_count: usize) -> bool {
        if self.batches.len() < shard_count {
            self.batches.resize_with(shard_count, Batch::default);
        }
        let mut full = false;
        for target in &mut self.targets {
            let batch = &mut self.batches[target.shard];
            batch.push(msg, target);
            full |= batch.is_full();
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
            let next = batch.empty_like();
            let batch = std::mem::replace(batch, next);
            match peers.data[shard].try_send(batch) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    let _ = peers.data[shard].send(batch).await;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Releases batch buffers, so idle connections stay small.
    pub(crate) fn shrink(&mut self) {
        self.batches = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trips_every_message_shape() {
        let cases = [
            (b"a".as_slice(), None, None, b"".as_slice()),
            (b"foo.bar", Some(b"_INBOX.1".as_slice()), None, b"hello"),
            (
                b"foo",
                None,
                Some(b"NATS/1.0\r\nA: b\r\n\r\n".as_slice()),
                b"x",
            ),
            (
                b"foo",
                Some(b"r".as_slice()),
                Some(b"NATS/1.0\r\n\r\n".as_slice()),
                b"",
            ),
            (b"foo", Some(b"".as_slice()), None, b"p"),
        ];
        let mut batch = Batch::default();
        for (subject, reply, headers, payload) in cases {
            let msg = Message {
                subject,
                reply,
                headers,
                payload,
            };
            batch.push(&msg, &mut RemoteTarget::default());
        }
        assert_eq!(batch.envelopes.len(), cases.len());
        for ((back, _), (subject, reply, headers, payload)) in batch.messages().zip(cases) {
            assert_eq!(back.subject, subject);
            assert_eq!(back.reply, reply);
            assert_eq!(back.headers, headers);
            assert_eq!(back.payload, payload);
        }
    }
}
