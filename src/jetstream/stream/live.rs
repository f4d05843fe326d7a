//! The live messages of a stream by sequence: a window of slots from the first
//! live sequence to the last, instead of a B-tree entry per message. Sequences
//! only grow, so appends are a push at the back and trimming the front is a pop;
//! reopening a 1 GiB stream of small messages inserts millions of them.
//!
//! The interface is the subset of `BTreeMap<u64, MessageMeta>` the stream uses,
//! with the same meaning (keys by value: a slot's sequence is its position), so the stream reads as if it held a map. The cost of the
//! layout: a deleted message between the first and the last live one keeps its
//! (empty) slot until the front passes it.

use std::collections::VecDeque;
use std::ops::{Bound, RangeBounds};

use super::MessageMeta;

#[derive(Debug, Default)]
pub(super) struct LiveMessages {
    /// `slots[i]` is sequence `base + i`, when live. Never starts or ends with an
    /// empty slot.
    slots: VecDeque<Option<MessageMeta>>,
    base: u64,
    len: usize,
}

impl LiveMessages {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `seq`, which must come after every live sequence.
    pub fn insert(&mut self, seq: u64, meta: MessageMeta) {
        if self.slots.is_empty() {
            self.base = seq;
        }
        let end = self.base + self.slots.len() as u64;
        assert!(seq >= end, "live sequences only grow");
        for _ in end..seq {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(meta));
        self.len += 1;
    }

    pub fn remove(&mut self, seq: &u64) -> Option<MessageMeta> {
        let index = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let meta = self.slots.get_mut(index)?.take()?;
        self.len -= 1;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        while matches!(self.slots.back(), Some(None)) {
            self.slots.pop_back();
        }
        Some(meta)
    }

    pub fn contains_key(&self, seq: &u64) -> bool {
        self.get(*seq).is_some()
    }

    pub fn get(&self, seq: u64) -> Option<&MessageMeta> {
        let index = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.slots.get(index)?.as_ref()
    }

    pub fn get_mut(&mut self, seq: u64) -> Option<&mut MessageMeta> {
        let index = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.slots.get_mut(index)?.as_mut()
    }

    pub fn first_key_value(&self) -> Option<(u64, &MessageMeta)> {
        Some((self.base, self.slots.front()?.as_ref()?))
    }

    pub fn last_key_value(&self) -> Option<(u64, &MessageMeta)> {
        let meta = self.slots.back()?.as_ref()?;
        Some((self.base + self.slots.len() as u64 - 1, meta))
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, &MessageMeta)> {
        self.range(..)
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.iter().map(|(seq, _)| seq)
    }

    pub fn range<R: RangeBounds<u64>>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = (u64, &MessageMeta)> {
        let index = |seq: u64| seq.saturating_sub(self.base).min(self.slots.len() as u64) as usize;
        let start = match range.start_bound() {
            Bound::Included(&seq) => index(seq),
            Bound::Excluded(&seq) => index(seq.saturating_add(1)),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&seq) => index(seq.saturating_add(1)),
            Bound::Excluded(&seq) => index(seq),
            Bound::Unbounded => self.slots.len(),
        };
        let base = self.base;
        (start..end.max(start))
            .zip(self.slots.range(start..end.max(start)))
            .filter_map(move |(index, slot)| slot.as_ref().map(|meta| (base + index as u64, meta)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::rc::Rc;

    use super::*;

    fn meta(seq: u64) -> MessageMeta {
        MessageMeta {
            subject: Rc::from(&b"s"[..]),
            bytes: seq,
            timestamp_ns: 0,
        }
    }

    /// Random appends and removals agree with a B-tree at every step.
    #[test]
    fn behaves_like_a_btree_map() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut live = LiveMessages::default();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut last = 0;
        for _ in 0..20_000 {
            if next() % 3 != 0 || model.is_empty() {
                last += 1 + next() % 3;
                live.insert(last, meta(last));
                model.insert(last, last);
            } else {
                let keys: Vec<u64> = model.keys().copied().collect();
                let seq = keys[(next() % keys.len() as u64) as usize];
                let victim = if next() % 4 == 0 { seq + 1 } else { seq };
                assert_eq!(live.remove(&victim).map(|m| m.bytes), model.remove(&victim));
            }
            assert_eq!(live.len(), model.len());
            assert_eq!(
                live.first_key_value().map(|(k, _)| k),
                model.keys().next().copied()
            );
            assert_eq!(
                live.last_key_value().map(|(k, _)| k),
                model.keys().last().copied()
            );
            let probe = next() % (last + 2);
            assert_eq!(live.contains_key(&probe), model.contains_key(&probe));
            let (a, b) = (next() % (last + 2), next() % (last + 2));
            let got: Vec<u64> = live.range(a.min(b)..a.max(b)).map(|(k, _)| k).collect();
            let want: Vec<u64> = model.range(a.min(b)..a.max(b)).map(|(k, _)| *k).collect();
            assert_eq!(got, want);
            let got: Vec<u64> = live.range(a..).rev().map(|(k, _)| k).take(3).collect();
            let want: Vec<u64> = model.range(a..).rev().map(|(k, _)| *k).take(3).collect();
            assert_eq!(got, want);
            let got: Vec<u64> = live.range(..=b).map(|(k, _)| k).collect();
            let want: Vec<u64> = model.range(..=b).map(|(k, _)| *k).collect();
            assert_eq!(got, want);
        }
    }
}
