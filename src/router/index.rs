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
    /// Shards that already had this message for this group (bit per shard): a
    /// shard that finds no live member passes it on to one not tried yet.
    pub tried: u64,
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

/// Queue groups are rare beside plain subscriptions, so their list is boxed and
/// absent when empty: every pattern's entry (one per subscribed subject, on
/// every shard) stays small.
type Groups<T> = Option<Box<Vec<T>>>;

fn groups<T>(groups: &Groups<T>) -> &[T] {
    groups.as_deref().map_or(&[], Vec::as_slice)
}

fn groups_mut<T>(groups: &mut Groups<T>) -> &mut Vec<T> {
    groups.get_or_insert_with(Default::default)
}

/// Drops the list once it is empty.
fn groups_tidy<T>(groups: &mut Groups<T>) {
    if groups.as_ref().is_some_and(|g| g.is_empty()) {
        *groups = None;
    }
}

#[derive(Default)]
struct LocalEntry {
    plain: Vec<Rc<Subscription>>,
    queues: Groups<LocalQueue>,
}

impl LocalEntry {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.queues.is_none()
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
    queues: Groups<RemoteQueue>,
}

impl InterestEntry {
    fn is_empty(&self) -> bool {
        self.plain_shards == 0 && self.queues.is_none()
    }
}

/// A queue group that matched a message being routed.
struct QueueCandidate {
    name: Bytes,
    pattern: Bytes,
    members_total: u32,
    handled: bool,
}

/// How a message from another shard came: the shard whose client published
/// it (`ORIGIN_NONE` when that does not count for affinity) and its stamp.
#[derive(Clone, Copy, Debug)]
pub struct Via {
    pub origin: u8,
    pub stamp: u32,
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
    /// Scratch: the queue groups a route matched, and their members per shard
    /// (`shard_count` weights per candidate, flat).
    queue_candidates: Vec<QueueCandidate>,
    queue_weights: Vec<u32>,
    rng: u64,
    /// The newest connection move whose switch this shard applied: the stamp
    /// of what it routes itself (see `runtime/moves.rs`).
    pub switched: u32,
    /// A connection moving off (or onto) this shard: which copy of each
    /// message reaches its subscriptions is decided by the message's stamp.
    pub mark: Option<MoveMark>,
}

/// A connection move in progress on this shard (see `runtime/moves.rs`).
/// During a move a message for the connection's subscriptions can reach both
/// the old shard (the *shell* of its subscriptions) and the new one; the
/// stamp says which copy counts: routed before its origin switched to move
/// `id`, it goes through the shell; from the switch on, directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveMark {
    /// Deliver to session `session` (the shell) only what was stamped before `id`.
    Leaving { session: u64, id: u32 },
    /// Deliver to session `session` only what was stamped `id` or later.
    Arriving { session: u64, id: u32 },
}

impl MoveMark {
    #[inline]
    fn skips(self, session: u64, stamp: u32) -> bool {
        match self {
            MoveMark::Leaving { session: s, id } => s == session && stamp >= id,
            MoveMark::Arriving { session: s, id } => s == session && stamp < id,
        }
    }
}

/// `origin` for a delivery that counts for no shard's round trips.
pub const ORIGIN_NONE: u8 = u8::MAX;

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
            queue_candidates: Vec::new(),
            queue_weights: Vec::new(),
            rng: 0x9E37_79B9_7F4A_7C15 ^ ((shard as u64 + 1) << 17),
            switched: 0,
            mark: None,
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

    /// Whether any client on any shard is subscribed to a pattern matching `subject`
    /// (JetStream delivers to a push consumer only while someone listens).
    pub fn has_interest(&self, subject: &[u8]) -> bool {
        let mut found = false;
        self.local
            .for_each_match(subject, |entry| found |= !entry.is_empty());
        if !found {
            self.interest
                .for_each_match(subject, |entry| found |= !entry.is_empty());
        }
        found
    }

    /// Adds a local subscription. Interest changes go to the outbox.
    pub fn subscribe(&mut self, sub: Rc<Subscription>) {
        let entry = self.local.entry(sub.subject());
        let change = match sub.queue() {
            None => {
                entry.plain.push(Rc::clone(&sub));
                (entry.plain.len() == 1).then_some(InterestKind::Plain(true))
            }
            Some(queue) => {
                let queues = groups_mut(&mut entry.queues);
                let group = match queues.iter().position(|q| *q.name == *queue) {
                    Some(i) => &mut queues[i],
                    None => {
                        queues.push(LocalQueue {
                            name: queue.into(),
                            members: Vec::new(),
                        });
                        queues.last_mut().expect("just pushed")
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
            self.publish_change(sub.subject(), kind);
        }
    }

    /// Removes a local subscription (no-op if it is not there).
    pub fn unsubscribe(&mut self, sub: &Rc<Subscription>) {
        let Some(entry) = self.local.get_mut(sub.subject()) else {
            return;
        };
        let mut change = None;
        match sub.queue() {
            None => {
                if let Some(i) = entry.plain.iter().position(|s| Rc::ptr_eq(s, sub)) {
                    entry.plain.swap_remove(i);
                    if entry.plain.is_empty() {
                        change = Some(InterestKind::Plain(false));
                    }
                }
            }
            Some(queue) => {
                let queues = groups_mut(&mut entry.queues);
                if let Some(g) = queues.iter().position(|q| *q.name == *queue) {
                    let group = &mut queues[g];
                    if let Some(i) = group.members.iter().position(|s| Rc::ptr_eq(s, sub)) {
                        group.members.swap_remove(i);
                        change = Some(InterestKind::Queue {
                            queue: Bytes::copy_from_slice(queue),
                            members: group.members.len() as u32,
                        });
                        if group.members.is_empty() {
                            queues.swap_remove(g);
                        }
                    }
                }
                groups_tidy(&mut entry.queues);
            }
        }
        if entry.is_empty() {
            self.local.remove(sub.subject());
        }
        if let Some(kind) = change {
            self.publish_change(sub.subject(), kind);
        }
    }

    /// Removes a closed session's subscriptions (already killed) in one pass
    /// per subject: removing them one by one would scan each subject's list once
    /// per subscription, quadratic for a client with many on one subject.
    pub fn unsubscribe_dead(&mut self, subs: &[Rc<Subscription>]) {
        let mut done: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        let mut changes = Vec::new();
        for sub in subs {
            assert!(!sub.is_live(), "only killed subscriptions are swept");
            let subject = sub.subject();
            if !done.insert(subject) {
                continue;
            }
            let Some(entry) = self.local.get_mut(subject) else {
                continue;
            };
            let had_plain = !entry.plain.is_empty();
            entry.plain.retain(|s| s.is_live());
            if had_plain && entry.plain.is_empty() {
                changes.push(InterestKind::Plain(false));
            }
            if let Some(queues) = entry.queues.as_mut() {
                for group in queues.iter_mut() {
                    let before = group.members.len();
                    group.members.retain(|s| s.is_live());
                    if group.members.len() != before {
                        changes.push(InterestKind::Queue {
                            queue: Bytes::copy_from_slice(&group.name),
                            members: group.members.len() as u32,
                        });
                    }
                }
                queues.retain(|g| !g.members.is_empty());
            }
            groups_tidy(&mut entry.queues);
            if entry.is_empty() {
                self.local.remove(subject);
            }
            for kind in changes.drain(..) {
                self.publish_change(subject, kind);
            }
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
                let queues = groups_mut(&mut entry.queues);
                let i = match queues.iter().position(|q| *q.name == *queue) {
                    Some(i) => i,
                    None => {
                        queues.push(RemoteQueue {
                            pattern: change.pattern.clone(),
                            name: queue.clone(),
                            members_per_shard: vec![0; shard_count].into(),
                            members_total: 0,
                        });
                        queues.len() - 1
                    }
                };
                let group = &mut queues[i];
                let old = std::mem::replace(&mut group.members_per_shard[change.shard], *members);
                group.members_total = group.members_total - old + members;
                if group.members_total == 0 {
                    queues.swap_remove(i);
                }
                groups_tidy(&mut entry.queues);
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
        self.route_as(msg.subject, msg, publisher, remote)
    }

    /// [`Router::route`] matching subscriptions against `route_subject` while the
    /// delivered message shows its own subject: how JetStream delivers a stored
    /// message (`MSG <stored subject> <sid> $JS.ACK…`) to a pull request's inbox or
    /// a push consumer's deliver subject.
    #[inline]
    pub fn route_as(
        &mut self,
        route_subject: &[u8],
        msg: &Message<'_>,
        publisher: Option<&Session>,
        remote: &mut Vec<RemoteTarget>,
    ) -> RouteOutcome {
        remote.clear();
        let mut outcome = RouteOutcome::default();
        if has_empty_token(route_subject) {
            // nats-server delivers such a subject to nobody, not even `>`.
            return outcome;
        }
        let skip_session = publisher.filter(|p| !p.flags().echo).map(|p| p.id);
        // A client's message counts for the receivers' round trips with this shard.
        let origin = if publisher.is_some() {
            self.shard as u8
        } else {
            ORIGIN_NONE
        };

        // Local plain subscribers.
        let expired = &mut self.expired;
        let (mark, stamp) = (self.mark, self.switched);
        self.local.for_each_match(route_subject, |entry| {
            for sub in &entry.plain {
                if skip_session == Some(sub.session.id) {
                    continue;
                }
                if mark.is_some_and(|m| m.skips(sub.session.id, stamp)) {
                    continue;
                }
                match sub.deliver(msg) {
                    Delivery::Delivered => {
                        outcome.delivered_local += 1;
                        sub.session.note_origin(origin);
                    }
                    Delivery::Filtered => outcome.delivered_local += 1,
                    Delivery::DeliveredLast => {
                        outcome.delivered_local += 1;
                        expired.push(Rc::clone(sub));
                    }
                    Delivery::Dead => {}
                }
            }
        });

        // Remote plain interest, and every queue group that matches, anywhere.
        let me = self.shard;
        let targets = &mut self.targets;
        let candidates = &mut self.queue_candidates;
        let weights = &mut self.queue_weights;
        candidates.clear();
        weights.clear();
        self.interest.for_each_match(route_subject, |entry| {
            let others = entry.plain_shards & !(1u64 << me);
            if others != 0 {
                let mut bits = others;
                while bits != 0 {
                    let shard = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    targets[shard].plain = true;
                }
            }
            for group in groups(&entry.queues) {
                candidates.push(QueueCandidate {
                    name: group.name.clone(),
                    pattern: group.pattern.clone(),
                    members_total: group.members_total,
                    handled: false,
                });
                weights.extend_from_slice(&group.members_per_shard);
            }
        });
        if !self.queue_candidates.is_empty() {
            outcome.delivered_local += self.pick_queue_members(route_subject, msg, skip_session);
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

    /// Each queue *name* gets the message once, however many of the matched
    /// patterns carry a group of that name (nats-server merges them by name):
    /// one draw over the members of all of them, on every shard, weighted by
    /// member counts. A local pick that finds no live member (closing, or only
    /// the publisher's own without echo) falls back to another shard that has
    /// members. Returns the local deliveries.
    fn pick_queue_members(
        &mut self,
        route_subject: &[u8],
        msg: &Message<'_>,
        skip_session: Option<u64>,
    ) -> usize {
        let shards = self.shard_count;
        let mut delivered = 0;
        for first in 0..self.queue_candidates.len() {
            if self.queue_candidates[first].handled {
                continue;
            }
            let name = self.queue_candidates[first].name.clone();
            let same = |c: &QueueCandidate| c.name == name;
            let total: u64 = self
                .queue_candidates
                .iter()
                .filter(|c| same(c))
                .map(|c| u64::from(c.members_total))
                .sum();
            let mut draw = self.random() % total.max(1);
            let mut chosen = None;
            for (i, candidate) in self.queue_candidates.iter_mut().enumerate() {
                if !same(candidate) {
                    continue;
                }
                candidate.handled = true;
                for shard in 0..shards {
                    let n = u64::from(self.queue_weights[i * shards + shard]);
                    if chosen.is_none() && draw < n {
                        chosen = Some((i, shard));
                    } else if chosen.is_none() {
                        draw -= n;
                    }
                }
            }
            let (i, shard) = chosen.expect("a matched group has members");
            let pattern = self.queue_candidates[i].pattern.clone();
            let group = QueueRef {
                pattern,
                queue: name,
                tried: 1 << shard,
            };
            if shard != self.shard {
                self.targets[shard].queues.push(group);
                continue;
            }
            if self.deliver_to_queue(msg, &group.pattern, &group.queue, skip_session) {
                delivered += 1;
                continue;
            }
            // No live local member: another shard with members takes it.
            if let Some((other, group)) = self.pass_on(route_subject, &group) {
                self.targets[other].queues.push(group);
            }
        }
        delivered
    }

    /// Delivers a message that another shard routed here.
    pub fn deliver_remote(&mut self, msg: &Message<'_>, plain: bool, queues: &[QueueRef]) {
        let mut passed_on = Vec::new();
        let via = Via {
            origin: ORIGIN_NONE,
            stamp: self.switched,
        };
        self.deliver_remote_as(msg.subject, msg, plain, queues, via, &mut passed_on);
    }

    /// [`Router::deliver_remote`] for a message routed with [`Router::route_as`].
    /// A queue group picked here whose members all left meanwhile (UNSUB, max
    /// reached, closed) while the pick travelled gets the message from another
    /// local group of that name, else from another shard with members: those go
    /// to `passed_on` (cleared first), like [`Router::route`]'s targets. Each
    /// shard is tried at most once per message and group, so nothing loops.
    #[inline]
    pub fn deliver_remote_as(
        &mut self,
        route_subject: &[u8],
        msg: &Message<'_>,
        plain: bool,
        queues: &[QueueRef],
        via: Via,
        passed_on: &mut Vec<RemoteTarget>,
    ) {
        passed_on.clear();
        if plain {
            let expired = &mut self.expired;
            let mark = self.mark;
            self.local.for_each_match(route_subject, |entry| {
                for sub in &entry.plain {
                    if mark.is_some_and(|m| m.skips(sub.session.id, via.stamp)) {
                        continue;
                    }
                    match sub.deliver(msg) {
                        Delivery::Delivered => sub.session.note_origin(via.origin),
                        Delivery::DeliveredLast => expired.push(Rc::clone(sub)),
                        Delivery::Dead | Delivery::Filtered => {}
                    }
                }
            });
        }
        for group in queues {
            if self.deliver_to_queue(msg, &group.pattern, &group.queue, None)
                || self.deliver_to_queue_named(route_subject, msg, &group.queue)
            {
                continue;
            }
            if let Some((shard, next)) = self.pass_on(route_subject, group) {
                match passed_on.iter_mut().find(|t| t.shard == shard) {
                    Some(target) => target.queues.push(next),
                    None => passed_on.push(RemoteTarget {
                        shard,
                        plain: false,
                        queues: vec![next],
                    }),
                }
            }
        }
        self.remove_expired();
    }

    /// Gives `msg` to a live member of any local group named `queue` whose
    /// pattern matches (the picked pattern's members are gone).
    fn deliver_to_queue_named(
        &mut self,
        route_subject: &[u8],
        msg: &Message<'_>,
        queue: &[u8],
    ) -> bool {
        let mut patterns: Vec<Bytes> = Vec::new();
        self.local.for_each_match(route_subject, |entry| {
            for group in groups(&entry.queues) {
                if &*group.name == queue {
                    if let Some(first) = group.members.first() {
                        patterns.push(Bytes::copy_from_slice(first.subject()));
                    }
                }
            }
        });
        patterns
            .iter()
            .any(|pattern| self.deliver_to_queue(msg, pattern, queue, None))
    }

    /// Another shard, not yet tried, with members of a group named like
    /// `group` whose pattern matches, weighted by member count.
    fn pass_on(&mut self, route_subject: &[u8], group: &QueueRef) -> Option<(usize, QueueRef)> {
        let tried = group.tried | 1 << self.shard;
        let mut choices: Vec<(usize, Bytes, u64)> = Vec::new();
        self.interest.for_each_match(route_subject, |entry| {
            for remote in groups(&entry.queues) {
                if remote.name != group.queue {
                    continue;
                }
                for (shard, &members) in remote.members_per_shard.iter().enumerate() {
                    if members > 0 && tried & (1 << shard) == 0 {
                        choices.push((shard, remote.pattern.clone(), u64::from(members)));
                    }
                }
            }
        });
        let total: u64 = choices.iter().map(|c| c.2).sum();
        if total == 0 {
            return None;
        }
        let mut draw = self.random() % total;
        let (shard, pattern, _) = choices
            .into_iter()
            .find(|c| {
                let hit = draw < c.2;
                draw = draw.saturating_sub(c.2);
                hit
            })
            .expect("the draw is below the total");
        Some((
            shard,
            QueueRef {
                pattern,
                queue: group.queue.clone(),
                tried: tried | 1 << shard,
            },
        ))
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
        let Some(group) = groups(&entry.queues).iter().find(|q| &*q.name == queue) else {
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
                Delivery::Dead | Delivery::Filtered => continue,
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
    fn queue_groups_of_one_name_get_each_message_once_across_patterns() {
        let mut router = Router::new(0, 1);
        let s = Session::new(1, LIMITS);
        let star = sub(&s, "1", "foo.*", Some("workers"));
        let tail = sub(&s, "2", "foo.>", Some("workers"));
        let other = sub(&s, "3", "foo.>", Some("auditors"));
        for q in [&star, &tail, &other] {
            router.subscribe(Rc::clone(q));
        }
        let mut remote = Vec::new();
        for _ in 0..200 {
            let outcome = router.route(&msg("foo.bar"), None, &mut remote);
            assert_eq!(outcome.delivered_local, 2, "one per queue name");
        }
        assert_eq!(star.delivered() + tail.delivered(), 200);
        assert!(star.delivered() > 0 && tail.delivered() > 0);
        assert_eq!(other.delivered(), 200);
    }

    #[test]
    fn closing_many_subscriptions_on_one_subject_clears_interest_once() {
        let mut router = Router::new(0, 2);
        let s = Session::new(1, LIMITS);
        let subs: Vec<_> = (0..10_000)
            .map(|i| sub(&s, &i.to_string(), "same", None))
            .collect();
        for one in &subs {
            router.subscribe(Rc::clone(one));
        }
        assert_eq!(drain(&mut router).len(), 1);
        for one in &subs {
            one.kill();
        }
        router.unsubscribe_dead(&subs);
        let changes = drain(&mut router);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, InterestKind::Plain(false));
        assert_eq!(router.subscription_count(), 0);
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
