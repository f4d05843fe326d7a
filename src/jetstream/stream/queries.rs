//! Read-only questions the API asks a stream (subject counts for stream info,
//! next message by subject, where a purge that keeps N messages starts).

use std::collections::BTreeMap;

use super::{ReadError, StoredMessage, Stream};
use crate::nats::subject::subject_matches;
use crate::store::Directory;

impl<D: Directory> Stream<D> {
    /// Live messages per subject for the subjects matching `filter`
    /// (stream info's `subjects_filter`).
    pub fn subject_counts(&self, filter: &[u8]) -> BTreeMap<String, u64> {
        self.index
            .subjects
            .iter()
            .filter(|(subject, seqs)| !seqs.is_empty() && subject_matches(filter, subject))
            .map(|(subject, seqs)| {
                (
                    String::from_utf8_lossy(subject).into_owned(),
                    seqs.len() as u64,
                )
            })
            .collect()
    }

    /// The first live message at or after `from_seq` whose subject matches `filter`.
    pub fn get_next_by_subject(
        &self,
        filter: &[u8],
        from_seq: u64,
    ) -> Result<StoredMessage, ReadError> {
        let seq = self
            .index
            .live
            .range(from_seq..)
            .find(|(_, meta)| subject_matches(filter, &meta.subject))
            .map(|(seq, _)| seq)
            .ok_or(ReadError::NotFound)?;
        self.get(seq)
    }

    /// The sequence below which a purge leaves exactly the newest `keep` live
    /// messages matching `filter` (all subjects when `None`).
    pub fn seq_keeping_newest(&self, filter: Option<&[u8]>, keep: u64) -> u64 {
        let matching = self
            .index
            .live
            .iter()
            .rev()
            .filter(|(_, meta)| filter.is_none_or(|f| subject_matches(f, &meta.subject)));
        let mut kept = 0;
        let mut below = self.first_seq();
        for (seq, _) in matching {
            kept += 1;
            below = seq;
            if kept == keep {
                return below;
            }
        }
        below.min(self.first_seq())
    }
}
