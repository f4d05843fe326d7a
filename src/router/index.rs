//! A shard's routing table: which local subscriptions match a subject, and which
//! other shards have interest in it.
//!
//! Two tries: `local` holds this shard's subscriptions; `interest` is the
//! replicated view of every shard's interest (a bit per shard for plain
//! subscriptions, member counts per shard for queue groups). A shard's entry in
//! `interest` changes only when its local count for a pattern goes 0↔1 (plain) or
//! changes at all (queue groups, whose counts weight the choice of shard); such
//! changes are queued in an outbox that the runtime drains and broadcasts.
//!
//! Queue groups deliver each message to exactly one member across all shards:
//! the publishing shard picks a shard weighted by member counts, and the chosen
//! shard picks one of its members.
//!
//! Nothing here knows about sockets, threads or time.

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;

use super::trie::SubjectTrie;
use crate::nats::session::{Delivery, Message, Session, Subscription};

/// A change in one shard's interest, broadcast to every other shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterestChange {
    pub shard: usize,
    pub pattern: Bytes,
    pub kind: InterestKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterestKind {
    /// The shard now has (true) or no longer has (false) plain subscribers.
    Plain(bool),
    /// The shard now has `members` members of queue group `queue`.
    Queue { queue: Bytes, members: u32 },
}

/// A queue group chosen for a message on another shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRef {
    pub pattern: Bytes,
    pub queue: Bytes,
}

/// Where a message must go on one other shard.
#[derive(Debug, Default)]
pub struct RemoteTarget {
    pub shard: usize,
    /// Deliver to the shard's plain subscribers.
    pub plain: bool,
    /// Deliver to one member of each of these groups there.
    pub queues: Vec<QueueRef>,
}

#[derive(Default)]
struct LocalQueue {
    name: Box<[u8]>,
    members: Vec<Rc<Subscription>>,
}

#[derive(Default)]
struct LocalEntry {
    plain: Vec<Rc<Subscription>>,
    queues: Vec<LocalQueue>,
}

impl LocalEntry {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.queues.is_empty()
    }
}

struct RemoteQueue {
    pattern: Bytes,
    name: Bytes,
    members_per_shard: Box<[u32]>,
    members_total: u32,
}

#[derive(Default)]
struct InterestEntry {
    /// Bit k set: shard k has plain subscribers for this pattern.
    plain_shards: u64,
    queues: Vec<RemoteQueue>,
}

impl InterestEntry {
    fn is_empty(&self) -> bool {
        self.plain_shards == 0 && self.queues.is_empty()
    }
}

/// What routing one message did locally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteOutcome {
    /// Subscriptions on this shard that got the message.
    pub delivered_local: usize,
    /// Other shards the message must be sent to.
    pub remote_shards: usize,
}

pub struct Router {
    shard: usize,
    shard_count: usize,
    local: SubjectTrie<LocalEntry>,
    interest: SubjectTrie<InterestEntry>,
    outbox: VecDeque<InterestChange>,
    /// Subscriptions that delivered their last allowed message during a route.
    expired: Vec<Rc<Subscription>>,
    /// Scratch: which remote shards a route must reach, indexed by shard.
    targets: Vec<RemoteTarget>,
    rng: u64,
}

impl Router {
    pub fn new(shard: usize, shard_count: usize) -> Router {
        assert!(
            shard < shard_count && shard_count <= 64,
            "shard {shard} of {shard_count}"
        );
        Router {
            shard,
            shard_count,
            local: SubjectTrie::new(),
            interest: SubjectTrie::new(),
            outbox: VecDeque::new(),
            expired: Vec::new(),
            targets: (0..shard_count)
                .map(|shard| RemoteTarget {
                    shard,
                    ..RemoteTarget::default()
                })
                .collect(),
            // Any odd seed works for xorshift; the shard index spreads them.
            rng: 0x9E37_79B9_7F4A_7C15 ^ ((shard as u64 + 1) << 17),
        }
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Whether interest changes are waiting to be broadcast.
    pub fn has_interest_changes(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// The next interest change to broadcast, if any.
    pub fn poll_interest_change(&mut self) -> Option<InterestChange> {
        self.outbox.pop_front()
    }

    pub fn subscription_count(&self) -> usize {
        self.local.len()
    }

    /// Adds a local subscription. Interest changes go to the outbox.
    pub fn subscribe(&mut self, sub: Rc<Subscription>) {
        let entry = self.local.entry(&sub.subject);
        let change = match &sub.queue {
            None => {
                entry.plain.push(Rc::clone(&sub));
                (entry.plain.len() == 1).then_some(InterestKind::Plain(true))
            }
            Some(queue) => {
                let group = match entry.queues.iter().position(|q| q.name == *queue) {
                    Some(i) => &mut entry.queues[i],
                    None => {
                        entry.queues.push(LocalQueue {
                            name: queue.clone(),
                            members: Vec::new(),
                        });
                        entry.queues.last_mut().expect("just pushed")
                    }
                };
                group.members.push(Rc::clone(&sub));
                Some(InterestKind::Queue {
                    queue: Bytes::copy_from_slice(queue),
                    members: group.members.len() as u32,
                })
            }
        };
        if let Some(kind) = change {
            self.publish_change(&sub.subject, kind);
        }
    }

    /// Removes a local subscription (no-op if it is not there).
    pub fn unsubscribe(&mut self, sub: &Rc<Subscription>) {
        let Some(entry) = self.local.get_mut(&sub.subject) else {
            return;
        };
        let mut change = None;
        match &sub.queue {
            None => {
                if let Some(i) = entry.plain.iter().position(|s| Rc::ptr_eq(s, sub)) {
                    entry.plain.swap_remove(i);
                    if entry.plain.is_empty() {
                        change = Some(InterestKind::Plain(false));
                    }
                }
            }
            Some(queue) => {
                if let Some(g) = entry.queues.iter().position(|q| q.name == *queue) {
                    let group = &mut entry.queues[g];
                    if let Some(i) = group.members.iter().position(|s| Rc::ptr_eq(s, sub)) {
                        group.members.swap_remove(i);
                        change = Some(InterestKind::Queue {
                            queue: Bytes::copy_from_slice(queue),
                            members: group.members.len() as u32,
                        });
                        if group.members.is_empty() {
                            entry.queues.swap_remove(g);
                        }
                    }
                }
            }
        }
        if entry.is_empty() {
            self.local.remove(&sub.subject);
        }
        if let Some(kind) = change {
            self.publish_change(&sub.subject, kind);
        }
    }

    fn publish_change(&mut self, pattern: &[u8], kind: InterestKind) {
        let change = InterestChange {
            shard: self.shard,
            pattern: Bytes::copy_from_slice(pattern),
            kind,
        };
        self.apply(&change);
        if self.shard_count > 1 {
            self.outbox.push_back(change);
        }
    }

    /// Applies an interest change (from any shard, this one included).
    pub fn apply(&mut self, change: &InterestChange) {
        assert!(
            change.shard < self.shard_count,
            "interest from unknown shard"
        );
        let shard_count = self.shard_count;
        let entry = self.interest.entry(&change.pattern);
        match &change.kind {
            InterestKind::Plain(present) => {
                let bit = 1u64 << change.shard;
                if *present {
                    entry.plain_shards |= bit;
                } else {
                    entry.plain_shards &= !bit;
                }
            }
            InterestKind::Queue { queue, members } => {
                let i = match entry.queues.iter().position(|q| q.name == *queue) {
                    Some(i) => i,
                    None => {
                        entry.queues.push(RemoteQueue {
                            pattern: change.pattern.clone(),
                            name: queue.clone(),
                            members_per_shard: vec![0; shard_count].into(),
                            members_total: 0,
                        });
                        entry.queues.len() - 1
                    }
                };
                let group = &mut entry.queues[i];
                let old = std::mem::replace(&mut group.members_per_shard[change.shard], *members);
                group.members_total = group.members_total - old + members;
                if group.members_total == 0 {
                    entry.queues.swap_remove(i);
                }
            }
        }
        if entry.is_empty() {
            self.interest.remove(&change.pattern);
        }
    }

    /// Routes a message published on this shard: delivers to local subscribers,
    /// picks queue members across shards, and returns the other shards that must
    /// receive it through `remote` (cleared first). `publisher` is None for
    /// messages that did not come from a local client.
    pub fn route(
        &mut self,
        msg: &Message<'_>,
        publisher: Option<&Session>,
        remote: &mut Vec<RemoteTarget>,
    ) -> RouteOutcome {
        remote.clear();
        let mut outcome = RouteOutcome::default();
        if has_empty_token(msg.subject) {
            // nats-server delivers such a subject to nobody, not even `>`.
            return outcome;
        }
        let skip_session = publisher.filter(|p| !p.flags().echo).map(|p| p.id);

        // Local plain subscribers.
        let expired = &mut self.expired;
        self.local.for_each_match(msg.subject, |entry| {
            for sub in &entry.plain {
                if skip_session == Some(sub.session.id) {
                    continue;
                }
                match sub.deliver(msg) {
                    Delivery::Delivered => outcome.delivered_local += 1,
                    Delivery::DeliveredLast => {
                        outcome.delivered_local += 1;
                        expired.push(Rc::clone(sub));
                    }
                    Delivery::Dead => {}
                }
            }
        });

        // Remote plain interest and queue groups everywhere.
        let me = self.shard;
        let mut picks: Vec<(usize, Bytes, Bytes)> = Vec::new();
        let mut rng = self.rng;
        let targets = &mut self.targets;
        self.interest.for_each_match(msg.subject, |entry| {
            let others = entry.plain_shards & !(1u64 << me);
            if others != 0 {
                let mut bits = others;
                while bits != 0 {
                    let shard = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    targets[shard].plain = true;
                }
            }
            for group in &entry.queues {
                rng = xorshift(rng);
                let mut pick = (rng % u64::from(group.members_total)) as u32;
                let shard = group
                    .members_per_shard
                    .iter()
                    .position(|&n| {
                        if pick < n {
                            true
                        } else {
                            pick -= n;
                            false
                        }
                    })
                    .expect("members_total is the sum of members_per_shard");
                picks.push((shard, group.pattern.clone(), group.name.clone()));
            }
        });
        self.rng = rng;

        for (shard, pattern, queue) in picks {
            if shard == me {
                if self.deliver_to_queue(msg, &pattern, &queue, skip_session) {
                    outcome.delivered_local += 1;
                }
            } else {
                self.targets[shard].queues.push(QueueRef { pattern, queue });
            }
        }
        for target in &mut self.targets {
            if target.plain || !target.queues.is_empty() {
                outcome.remote_shards += 1;
                remote.push(RemoteTarget {
                    shard: target.shard,
                    plain: target.plain,
                    queues: std::mem::take(&mut target.queues),
                });
                target.plain = false;
            }
        }
        self.remove_expired();
        outcome
    }

    /// Delivers a message that another shard routed here.
    pub fn deliver_remote(&mut self, msg: &Message<'_>, plain: bool, queues: &[QueueRef]) {
        if plain {
            let expired = &mut self.expired;
            self.local.for_each_match(msg.subject, |entry| {
                for sub in &entry.plain {
                    if sub.deliver(msg) == Delivery::DeliveredLast {
                        expired.push(Rc::clone(sub));
                    }
                }
            });
        }
        for group in queues {
            self.deliver_to_queue(msg, &group.pattern, &group.queue, None);
        }
        self.remove_expired();
    }

    /// Gives `msg` to one live member of a local queue group (never one of
    /// `skip_session`'s, the publisher without echo); false if none is left.
    fn deliver_to_queue(
        &mut self,
        msg: &Message<'_>,
        pattern: &[u8],
        queue: &[u8],
        skip_session: Option<u64>,
    ) -> bool {
        let start = self.random() as usize;
        let Some(entry) = self.local.get(pattern) else {
            return false;
        };
        let Some(group) = entry.queues.iter().find(|q| &*q.name == queue) else {
            return false;
        };
        let n = group.members.len();
        for k in 0..n {
            let sub = &group.members[(start + k) % n];
            if skip_session == Some(sub.session.id) {
                continue;
            }
            match sub.deliver(msg) {
                Delivery::Delivered => return true,
                Delivery::DeliveredLast => {
                    self.expired.push(Rc::clone(sub));
                    return true;
                }
                Delivery::Dead => continue,
            }
        }
        false
    }

    fn remove_expired(&mut self) {
        while let Some(sub) = self.expired.pop() {
            sub.session.forget_subscription(&sub);
            self.unsubscribe(&sub);
        }
    }
}

/// `foo..bar`, `.foo`, `foo.`: a subject no subscription can match.
fn has_empty_token(subject: &[u8]) -> bool {
    subject.is_empty()
        || subject[0] == b'.'
        || subject[subject.len() - 1] == b'.'
        || subject.windows(2).any(|w| w == b"..")
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats::session::SessionLimits;

    const LIMITS: SessionLimits = SessionLimits {
        pending_bytes_max: 1 << 20,
        subscriptions_max: 0,
    };

    fn sub(
        session: &Rc<Session>,
        sid: &str,
        subject: &str,
        queue: Option<&str>,
    ) -> Rc<Subscription> {
        Rc::new(Subscription::new(
            Rc::clone(session),
            sid.as_bytes(),
            subject.as_bytes(),
            queue.map(str::as_bytes),
        ))
    }

    fn msg(subject: &str) -> Message<'_> {
        Message {
            subject: subject.as_bytes(),
            reply: None,
            headers: None,
            payload: b"x",
        }
    }

    fn drain(router: &mut Router) -> Vec<InterestChange> {
        std::iter::from_fn(|| router.poll_interest_change()).collect()
    }

    #[test]
    fn plain_interest_changes_only_on_zero_one_transitions() {
        let mut router = Router::new(0, 2);
        let s = Session::new(1, LIMITS);
        let a = sub(&s, "1", "foo.*", None);
        let b = sub(&s, "2", "foo.*", None);
        router.subscribe(Rc::clone(&a));
        router.subscribe(Rc::clone(&b));
        assert_eq!(drain(&mut router).len(), 1);
        router.unsubscribe(&a);
        assert!(drain(&mut router).is_empty());
        router.unsubscribe(&b);
        let changes = drain(&mut router);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, InterestKind::Plain(false));
        assert_eq!(router.subscription_count(), 0);
    }

    #[test]
    fn remote_interest_targets_other_shards_only() {
        let mut router = Router::new(0, 3);
        router.apply(&InterestChange {
            shard: 2,
            pattern: Bytes::from_static(b"a.>"),
            kind: InterestKind::Plain(true),
        });
        let mut remote = Vec::new();
        let outcome = router.route(&msg("a.b"), None, &mut remote);
        assert_eq!(outcome.remote_shards, 1);
        assert_eq!(remote[0].shard, 2);
        assert!(remote[0].plain);
        assert_eq!(router.route(&msg("a"), None, &mut remote).remote_shards, 0);
    }

    #[test]
    fn queue_group_picks_exactly_one_member_across_shards() {
        let mut router = Router::new(0, 2);
        let s = Session::new(1, LIMITS);
        router.subscribe(sub(&s, "1", "q", Some("g")));
        router.apply(&InterestChange {
            shard: 1,
            pattern: Bytes::from_static(b"q"),
            kind: InterestKind::Queue {
                queue: Bytes::from_static(b"g"),
                members: 3,
            },
        });
        let mut remote = Vec::new();
        let (mut local, mut far) = (0, 0);
        for _ in 0..4000 {
            let outcome = router.route(&msg("q"), None, &mut remote);
            assert_eq!(
                outcome.delivered_local + remote.iter().map(|t| t.queues.len()).sum::<usize>(),
                1
            );
            local += outcome.delivered_local;
            far += remote.len();
        }
        // Weighted 1:3 by member counts; allow generous noise.
        assert!((700..1300).contains(&local), "local {local} far {far}");
    }

    #[test]
    fn auto_unsubscribe_removes_after_max() {
        let mut router = Router::new(0, 1);
        let s = Session::new(1, LIMITS);
        let a = sub(&s, "1", "x", None);
        router.subscribe(Rc::clone(&a));
        a.set_max_msgs(2);
        let mut remote = Vec::new();
        for _ in 0..5 {
            router.route(&msg("x"), None, &mut remote);
        }
        assert_eq!(a.delivered(), 2);
        assert_eq!(router.subscription_count(), 0);
    }
}
