//! The subscription index's data structure: a token trie from subject patterns to values.
//!
//! Owns: storing one value per pattern, finding every stored pattern that matches a
//! literal subject (`*` = exactly one token, `>` = one or more trailing tokens), and
//! pruning nodes left empty so subscribe/unsubscribe churn leaves no garbage behind.
//!
//! Does not: validate patterns or subjects (the caller does, with nats-server's rules),
//! know anything about connections, sessions, queue groups or shards, or cache match
//! results (a caller keeps its own cache and drops it when `generation()` moves).
//!
//! Shape. A node has the value of the pattern ending at it, the value of the pattern
//! `<path>.>` (a `>` token is always last, so it needs no node of its own), a boxed `*`
//! child, and its literal children: a small `Vec` scanned linearly while there are at
//! most `LITERAL_CHILDREN_FEW_MAX` of them (most nodes: `sensors.<id>` has one child
//! `t`), a hash map keyed by token above that (`sensors` has one child per device).
//!
//! Bounds. The trie holds exactly one value per stored pattern and at most one node per
//! token of the stored patterns, so its size is bounded by the caller's subscription
//! limit times its control-line limit. Matching recurses once per subject token, so its
//! stack depth is the subject's token count (a 4096-byte control line allows at most
//! ~2048 tokens; each frame is a few words). Insert, lookup and remove recurse or loop
//! once per pattern token.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// Literal children kept in a linearly scanned `Vec` up to this many; above it, a hash
/// map. Comparing a handful of short tokens beats hashing one. Measured (x86-64, release):
/// always-a-map makes `sensors.1234.t` against 10k `sensors.<i>.t` 67 ns instead of 30 and
/// a one-pattern trie 23 ns instead of 5; a `Vec` and a map break even at about 8 children.
const LITERAL_CHILDREN_FEW_MAX: usize = 8;
/// A map shrinks back to a `Vec` at this many children or fewer. Below the promotion
/// threshold so a node hovering around it does not convert on every insert/remove.
const LITERAL_CHILDREN_DEMOTE_MAX: usize = LITERAL_CHILDREN_FEW_MAX / 2;
const _: () = assert!(LITERAL_CHILDREN_DEMOTE_MAX < LITERAL_CHILDREN_FEW_MAX);

const TOKEN_SEPARATOR: u8 = b'.';
const TOKEN_WILDCARD_ONE: &[u8] = b"*";
const TOKEN_WILDCARD_TAIL: &[u8] = b">";

/// A token trie from subject patterns to values. Patterns are already validated by the
/// caller (non-empty tokens, wildcards only as whole tokens, `>` last).
///
/// Every operation interprets a pattern as `pattern.split('.')`: a `*` token is the
/// one-token wildcard, a `>` token in last position is the tail wildcard, any other
/// token (including an invalid empty one, or a `>` not in last position) is a literal.
/// That keeps every method total on any bytes; invalid input is only ever a caller bug
/// and is caught by a `debug_assert!` in `entry`.
///
/// Literal patterns (no `*`, no tail `>`) live in a hash map beside the trie: a
/// literal matches only the identical subject, so one hash lookup finds it, and
/// the typical device subscription (`dev.<id>.cmd`, `_INBOX.<id>`) costs one map
/// entry instead of a chain of nodes. The trie holds only wildcard patterns.
pub struct SubjectTrie<V> {
    root: Node<V>,
    literal_patterns: HashMap<Box<[u8]>, V, TokenHashBuilder>,
    /// Number of stored patterns: `Some` values in the whole trie.
    pattern_count: usize,
    /// Bumped on every insert of a new pattern and every removal.
    generation: u64,
    /// Seeds the token hash of every literal map in this trie, so which tokens collide
    /// differs per process and per trie (clients choose subject tokens).
    hash_seed: u64,
}

impl<V> SubjectTrie<V> {
    pub fn new() -> Self {
        let hash_seed = RandomState::new().hash_one(0x7065_7263_685f_7472_u64);
        Self {
            root: Node::new(),
            literal_patterns: HashMap::with_hasher(TokenHashBuilder { seed: hash_seed }),
            pattern_count: 0,
            generation: 0,
            hash_seed,
        }
    }

    /// Number of patterns stored.
    pub fn len(&self) -> usize {
        self.pattern_count
    }

    pub fn is_empty(&self) -> bool {
        self.pattern_count == 0
    }

    /// A counter bumped on every insert/remove, so callers can keep a match-result cache.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The value stored at exactly `pattern`, created with `V::default()` if absent.
    pub fn entry(&mut self, pattern: &[u8]) -> &mut V
    where
        V: Default,
    {
        debug_assert!(
            pattern_is_valid(pattern),
            "caller passed an invalid pattern {:?}",
            String::from_utf8_lossy(pattern)
        );
        if is_literal(pattern) {
            if !self.literal_patterns.contains_key(pattern) {
                self.pattern_count += 1;
                self.generation = self.generation.wrapping_add(1);
            }
            return self.literal_patterns.entry(pattern.into()).or_default();
        }
        let hash_seed = self.hash_seed;
        let mut node = &mut self.root;
        let mut pattern_rest = pattern;
        // Bounded: one iteration per pattern token.
        let token_last = loop {
            let (token, tail) = split_first_token(pattern_rest);
            match tail {
                None => break token,
                Some(tail) => {
                    node = node.child_or_insert(token, hash_seed);
                    pattern_rest = tail;
                }
            }
        };
        let slot = if token_last == TOKEN_WILDCARD_TAIL {
            &mut node.tail_wildcard_value
        } else {
            &mut node.child_or_insert(token_last, hash_seed).value
        };
        if slot.is_none() {
            self.pattern_count += 1;
            self.generation = self.generation.wrapping_add(1);
        }
        slot.get_or_insert_with(V::default)
    }

    pub fn get(&self, pattern: &[u8]) -> Option<&V> {
        if is_literal(pattern) {
            return self.literal_patterns.get(pattern);
        }
        let mut node = &self.root;
        let mut pattern_rest = pattern;
        // Bounded: one iteration per pattern token.
        loop {
            let (token, tail) = split_first_token(pattern_rest);
            match tail {
                None if token == TOKEN_WILDCARD_TAIL => return node.tail_wildcard_value.as_ref(),
                None => return node.child(token)?.value.as_ref(),
                Some(tail) => {
                    node = node.child(token)?;
                    pattern_rest = tail;
                }
            }
        }
    }

    pub fn get_mut(&mut self, pattern: &[u8]) -> Option<&mut V> {
        if is_literal(pattern) {
            return self.literal_patterns.get_mut(pattern);
        }
        let mut node = &mut self.root;
        let mut pattern_rest = pattern;
        // Bounded: one iteration per pattern token.
        loop {
            let (token, tail) = split_first_token(pattern_rest);
            match tail {
                None if token == TOKEN_WILDCARD_TAIL => return node.tail_wildcard_value.as_mut(),
                None => return node.child_mut(token)?.value.as_mut(),
                Some(tail) => {
                    node = node.child_mut(token)?;
                    pattern_rest = tail;
                }
            }
        }
    }

    /// Removes the value at `pattern` and prunes nodes left empty. Returns it.
    pub fn remove(&mut self, pattern: &[u8]) -> Option<V> {
        let removed = if is_literal(pattern) {
            let removed = self.literal_patterns.remove(pattern)?;
            if self.literal_patterns.capacity() > 64
                && self.literal_patterns.len() * 4 < self.literal_patterns.capacity()
            {
                self.literal_patterns.shrink_to_fit();
            }
            removed
        } else {
            self.root.remove(pattern)?
        };
        assert!(self.pattern_count > 0, "a stored value was not counted");
        self.pattern_count -= 1;
        self.generation = self.generation.wrapping_add(1);
        if self.pattern_count == 0 {
            assert!(self.root.is_empty(), "no patterns left but nodes remain");
        }
        Some(removed)
    }

    /// Calls `f` with the value of every stored pattern that matches the literal
    /// `subject`, each exactly once. Allocates nothing; recursion depth is the
    /// subject's token count.
    ///
    /// The order is nats-server's (its sublist walk), so that one message
    /// matching several subscriptions of a client is delivered to them in the
    /// same order: at each level `>` first; then, before the last token, the
    /// `*` branch before the literal one; at the last token the literal pattern
    /// before the `*` one. The identical literal pattern sits where that walk
    /// would reach it along the subject's own tokens.
    pub fn for_each_match(&self, subject: &[u8], mut f: impl FnMut(&V)) {
        let mut literal = self.literal_patterns.get(subject);
        if !self.root.is_empty() {
            self.root
                .for_each_match(subject, true, &mut literal, &mut f);
        }
        if let Some(value) = literal {
            f(value);
        }
    }

    /// Same as `for_each_match`, with mutable access (used to bump delivery counters).
    pub fn for_each_match_mut(&mut self, subject: &[u8], mut f: impl FnMut(&mut V)) {
        if let Some(value) = self.literal_patterns.get_mut(subject) {
            f(value);
        }
        if !self.root.is_empty() {
            self.root.for_each_match_mut(subject, &mut f);
        }
    }

    /// Every (pattern, value) pair, for snapshots sent to a newly started shard.
    /// Order is unspecified. Allocates a pattern per item and a stack of at most one
    /// entry per node.
    pub fn iter(&self) -> impl Iterator<Item = (Vec<u8>, &V)> + '_ {
        // (pattern of the node, is it the root, node). The root's path is empty and its
        // children's patterns have no leading separator.
        let mut nodes: Vec<(Vec<u8>, bool, &Node<V>)> = vec![(Vec::new(), true, &self.root)];
        let mut ready: Vec<(Vec<u8>, &V)> = Vec::with_capacity(2);
        std::iter::from_fn(move || {
            // Bounded: each pass pops one node, and each node is pushed once.
            loop {
                if let Some(item) = ready.pop() {
                    return Some(item);
                }
                let (path, is_root, node) = nodes.pop()?;
                let join = |token: &[u8]| {
                    let mut pattern = Vec::with_capacity(path.len() + 1 + token.len());
                    pattern.extend_from_slice(&path);
                    if !is_root {
                        pattern.push(TOKEN_SEPARATOR);
                    }
                    pattern.extend_from_slice(token);
                    pattern
                };
                if let Some(value) = &node.tail_wildcard_value {
                    ready.push((join(TOKEN_WILDCARD_TAIL), value));
                }
                if let Some(star) = &node.star {
                    nodes.push((join(TOKEN_WILDCARD_ONE), false, star));
                }
                node.literals
                    .for_each(|token, child| nodes.push((join(token), false, child)));
                if let Some(value) = &node.value {
                    ready.push((path, value));
                }
            }
        })
        .chain(self.literal_patterns.iter().map(|(p, v)| (p.to_vec(), v)))
    }

    /// Nodes below the root; zero when the trie is empty.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        self.root.descendant_count()
    }
}

impl<V> Default for SubjectTrie<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Invariant: every node except the root is non-empty (`!is_empty()`); `remove` prunes a
/// child the moment it becomes empty.
struct Node<V> {
    /// Value of the pattern whose last token leads to this node.
    value: Option<V>,
    /// Value of the pattern `<path to this node>.>`.
    tail_wildcard_value: Option<V>,
    /// Child for a `*` token.
    star: Option<Box<Node<V>>>,
    literals: Literals<V>,
}

impl<V> Node<V> {
    fn new() -> Self {
        Self {
            value: None,
            tail_wildcard_value: None,
            star: None,
            literals: Literals::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.tail_wildcard_value.is_none()
            && self.star.is_none()
            && self.literals.is_empty()
    }

    fn child(&self, token: &[u8]) -> Option<&Node<V>> {
        if token == TOKEN_WILDCARD_ONE {
            self.star.as_deref()
        } else {
            self.literals.get(token)
        }
    }

    fn child_mut(&mut self, token: &[u8]) -> Option<&mut Node<V>> {
        if token == TOKEN_WILDCARD_ONE {
            self.star.as_deref_mut()
        } else {
            self.literals.get_mut(token)
        }
    }

    fn child_or_insert(&mut self, token: &[u8], hash_seed: u64) -> &mut Node<V> {
        if token == TOKEN_WILDCARD_ONE {
            self.star.get_or_insert_with(|| Box::new(Node::new()))
        } else {
            self.literals.get_or_insert(token, hash_seed)
        }
    }

    fn remove_child(&mut self, token: &[u8]) {
        if token == TOKEN_WILDCARD_ONE {
            self.star = None;
        } else {
            self.literals.remove(token);
        }
    }

    /// Removes the value of `pattern_rest` below this node, pruning children left empty.
    /// Recursion depth: the pattern's token count.
    fn remove(&mut self, pattern_rest: &[u8]) -> Option<V> {
        let (token, tail) = split_first_token(pattern_rest);
        if tail.is_none() && token == TOKEN_WILDCARD_TAIL {
            return self.tail_wildcard_value.take();
        }
        let child = self.child_mut(token)?;
        let removed = match tail {
            None => child.value.take(),
            Some(tail) => child.remove(tail),
        };
        if child.is_empty() {
            self.remove_child(token);
        }
        removed
    }

    /// Recursion depth: the token count of `subject_rest`.
    /// `on_literal_path`: every token so far matched a literal child, so the
    /// subject's own literal pattern (`literal`, kept outside the trie) is
    /// reached here; it is called, and taken, at the last token.
    fn for_each_match<'a>(
        &'a self,
        subject_rest: &[u8],
        on_literal_path: bool,
        literal: &mut Option<&'a V>,
        f: &mut impl FnMut(&'a V),
    ) {
        let (token, tail) = split_first_token(subject_rest);
        // `subject_rest` holds at least one token, which is what `>` needs.
        if let Some(value) = &self.tail_wildcard_value {
            f(value);
        }
        match tail {
            Some(tail) => {
                if let Some(child) = &self.star {
                    child.for_each_match(tail, false, literal, f);
                }
                if let Some(child) = self.literals.get(token) {
                    child.for_each_match(tail, on_literal_path, literal, f);
                }
            }
            None => {
                if let Some(value) = self.literals.get(token).and_then(|c| c.value.as_ref()) {
                    f(value);
                }
                if on_literal_path {
                    if let Some(value) = literal.take() {
                        f(value);
                    }
                }
                if let Some(value) = self.star.as_ref().and_then(|c| c.value.as_ref()) {
                    f(value);
                }
            }
        }
    }

    /// Mirror of `for_each_match`; keep the two in step.
    fn for_each_match_mut(&mut self, subject_rest: &[u8], f: &mut impl FnMut(&mut V)) {
        let (token, tail) = split_first_token(subject_rest);
        if let Some(value) = &mut self.tail_wildcard_value {
            f(value);
        }
        if let Some(child) = self.literals.get_mut(token) {
            child.for_each_match_mut_at(tail, f);
        }
        if let Some(child) = &mut self.star {
            child.for_each_match_mut_at(tail, f);
        }
    }

    #[inline]
    fn for_each_match_mut_at(&mut self, tail: Option<&[u8]>, f: &mut impl FnMut(&mut V)) {
        match tail {
            None => {
                if let Some(value) = &mut self.value {
                    f(value);
                }
            }
            Some(tail) => self.for_each_match_mut(tail, f),
        }
    }

    #[cfg(test)]
    fn descendant_count(&self) -> usize {
        let mut count = 0;
        if let Some(star) = &self.star {
            assert!(!star.is_empty(), "an empty node was not pruned");
            count += 1 + star.descendant_count();
        }
        self.literals.for_each(|_, child| {
            assert!(!child.is_empty(), "an empty node was not pruned");
            count += 1 + child.descendant_count();
        });
        count
    }
}

/// A node's literal children, keyed by token.
enum Literals<V> {
    /// At most `LITERAL_CHILDREN_FEW_MAX` children, unordered, tokens unique.
    Few(Vec<(Box<[u8]>, Node<V>)>),
    /// More than `LITERAL_CHILDREN_DEMOTE_MAX` children.
    Many(HashMap<Box<[u8]>, Node<V>, TokenHashBuilder>),
}

impl<V> Literals<V> {
    fn new() -> Self {
        Literals::Few(Vec::new())
    }

    fn is_empty(&self) -> bool {
        match self {
            Literals::Few(children) => children.is_empty(),
            Literals::Many(children) => children.is_empty(),
        }
    }

    #[inline]
    fn get(&self, token: &[u8]) -> Option<&Node<V>> {
        match self {
            Literals::Few(children) => children
                .iter()
                .find(|(key, _)| **key == *token)
                .map(|(_, child)| child),
            Literals::Many(children) => children.get(token),
        }
    }

    #[inline]
    fn get_mut(&mut self, token: &[u8]) -> Option<&mut Node<V>> {
        match self {
            Literals::Few(children) => children
                .iter_mut()
                .find(|(key, _)| **key == *token)
                .map(|(_, child)| child),
            Literals::Many(children) => children.get_mut(token),
        }
    }

    fn get_or_insert(&mut self, token: &[u8], hash_seed: u64) -> &mut Node<V> {
        if let Literals::Few(children) = self {
            let is_new = !children.iter().any(|(key, _)| **key == *token);
            if is_new && children.len() >= LITERAL_CHILDREN_FEW_MAX {
                let mut map = HashMap::with_capacity_and_hasher(
                    2 * LITERAL_CHILDREN_FEW_MAX,
                    TokenHashBuilder { seed: hash_seed },
                );
                map.extend(children.drain(..));
                *self = Literals::Many(map);
            }
        }
        match self {
            Literals::Few(children) => {
                let index = match children.iter().position(|(key, _)| **key == *token) {
                    Some(index) => index,
                    None => {
                        children.push((token.into(), Node::new()));
                        children.len() - 1
                    }
                };
                &mut children[index].1
            }
            Literals::Many(children) => {
                // Two lookups on insert so that finding an existing child allocates no key.
                if !children.contains_key(token) {
                    children.insert(token.into(), Node::new());
                }
                children
                    .get_mut(token)
                    .expect("the child is present: inserted just above")
            }
        }
    }

    /// Removes a child and gives memory back: a map at most a quarter full shrinks, and
    /// one left with few children becomes a `Vec` again.
    fn remove(&mut self, token: &[u8]) {
        match self {
            Literals::Few(children) => {
                if let Some(index) = children.iter().position(|(key, _)| **key == *token) {
                    children.swap_remove(index);
                }
                if children.is_empty() {
                    *children = Vec::new();
                }
            }
            Literals::Many(children) => {
                children.remove(token);
                if children.len() <= LITERAL_CHILDREN_DEMOTE_MAX {
                    *self = Literals::Few(children.drain().collect());
                } else if children.len() * 4 <= children.capacity() {
                    children.shrink_to(children.len() * 2);
                }
            }
        }
    }

    fn for_each<'a>(&'a self, mut f: impl FnMut(&'a [u8], &'a Node<V>)) {
        match self {
            Literals::Few(children) => children.iter().for_each(|(key, child)| f(key, child)),
            Literals::Many(children) => children.iter().for_each(|(key, child)| f(key, child)),
        }
    }
}

/// Splits off the first token: `(token, Some(rest after the separator))`, or
/// `(whole input, None)` when it is the last token.
#[inline]
/// A pattern without wildcard tokens (`*` anywhere, `>` last): it matches only
/// the identical subject.
fn is_literal(pattern: &[u8]) -> bool {
    let mut tokens = pattern.split(|&b| b == TOKEN_SEPARATOR).peekable();
    while let Some(token) = tokens.next() {
        if token == TOKEN_WILDCARD_ONE || (token == TOKEN_WILDCARD_TAIL && tokens.peek().is_none())
        {
            return false;
        }
    }
    true
}

fn split_first_token(subject: &[u8]) -> (&[u8], Option<&[u8]>) {
    match subject.iter().position(|&byte| byte == TOKEN_SEPARATOR) {
        Some(index) => (&subject[..index], Some(&subject[index + 1..])),
        None => (subject, None),
    }
}

/// Non-empty tokens and `>` only as the last token: what the caller promised.
fn pattern_is_valid(pattern: &[u8]) -> bool {
    let token_count = pattern.split(|&byte| byte == TOKEN_SEPARATOR).count();
    pattern
        .split(|&byte| byte == TOKEN_SEPARATOR)
        .enumerate()
        .all(|(index, token)| {
            !token.is_empty() && (token != TOKEN_WILDCARD_TAIL || index + 1 == token_count)
        })
}

/// Builds `TokenHasher`s for one trie's literal maps.
#[derive(Clone, Copy)]
struct TokenHashBuilder {
    seed: u64,
}

impl BuildHasher for TokenHashBuilder {
    type Hasher = TokenHasher;

    fn build_hasher(&self) -> TokenHasher {
        TokenHasher { state: self.seed }
    }
}

/// An FxHash-style hash over 8-byte words with a multiply-fold finish. Tokens are short
/// (2–30 bytes), so a few multiplies beat SipHash several times over. Not a defense
/// against a determined collision attack; the per-trie seed makes blind ones miss, and
/// the subscription limit bounds how much a collision can cost.
struct TokenHasher {
    state: u64,
}

impl TokenHasher {
    /// FxHash's constant (from rustc-hash).
    const MULTIPLIER: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    /// Odd constant for the finishing multiply (from wyhash).
    const FINISH_MULTIPLIER: u64 = 0xa076_1d64_78bd_642f;

    #[inline]
    fn add_word(&mut self, word: u64) {
        self.state = (self.state.rotate_left(5) ^ word).wrapping_mul(Self::MULTIPLIER);
    }
}

impl Hasher for TokenHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        // Bounded: one iteration per 8 bytes of the token.
        for word in &mut words {
            self.add_word(u64::from_le_bytes(
                word.try_into().expect("chunks_exact yields 8"),
            ));
        }
        let remainder = words.remainder();
        if !remainder.is_empty() {
            // Zero padding is unambiguous: `[u8]`'s `Hash` writes the length first.
            let mut word = [0u8; 8];
            word[..remainder.len()].copy_from_slice(remainder);
            self.add_word(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.add_word(value as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits, which pick the bucket, poorly mixed; folding
        // the 128-bit product brings the high bits down.
        let product = u128::from(self.state) * u128::from(Self::FINISH_MULTIPLIER);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The specification: `*` matches exactly one token, `>` one or more trailing tokens.
    fn subject_matches(pattern: &str, subject: &str) -> bool {
        let pattern_tokens: Vec<&str> = pattern.split('.').collect();
        let subject_tokens: Vec<&str> = subject.split('.').collect();
        for (index, pattern_token) in pattern_tokens.iter().enumerate() {
            if *pattern_token == ">" && index + 1 == pattern_tokens.len() {
                return subject_tokens.len() > index;
            }
            match subject_tokens.get(index) {
                None => return false,
                Some(subject_token) => {
                    if *pattern_token != "*" && pattern_token != subject_token {
                        return false;
                    }
                }
            }
        }
        pattern_tokens.len() == subject_tokens.len()
    }

    fn trie_of(patterns: &[&str]) -> SubjectTrie<String> {
        let mut trie = SubjectTrie::new();
        for pattern in patterns {
            *trie.entry(pattern.as_bytes()) = pattern.to_string();
        }
        trie
    }

    fn matches_of(trie: &SubjectTrie<String>, subject: &str) -> Vec<String> {
        let mut matched = Vec::new();
        trie.for_each_match(subject.as_bytes(), |value| matched.push(value.clone()));
        matched.sort();
        matched
    }

    /// Stores `patterns`, matches `subject`, and compares with `expected` and with the
    /// naive matcher.
    #[track_caller]
    fn check(patterns: &[&str], subject: &str, expected: &[&str]) {
        let trie = trie_of(patterns);
        let mut expected: Vec<String> = expected.iter().map(|p| p.to_string()).collect();
        expected.sort();
        assert_eq!(matches_of(&trie, subject), expected, "subject {subject:?}");
        let mut naive: Vec<String> = patterns
            .iter()
            .filter(|pattern| subject_matches(pattern, subject))
            .map(|pattern| pattern.to_string())
            .collect();
        naive.sort();
        naive.dedup();
        assert_eq!(
            naive, expected,
            "the naive matcher disagrees on {subject:?}"
        );
    }

    #[test]
    fn matching() {
        let all = [
            "foo",
            "foo.bar",
            "foo.*",
            "foo.>",
            "*.bar",
            ">",
            "*",
            "*.*",
            "foo.bar.baz",
        ];
        check(&all, "foo", &["foo", ">", "*"]);
        check(
            &all,
            "foo.bar",
            &["foo.bar", "foo.*", "foo.>", "*.bar", ">", "*.*"],
        );
        check(&all, "foo.bar.baz", &["foo.>", ">", "foo.bar.baz"]);
        check(&all, "foo.baz", &["foo.*", "foo.>", ">", "*.*"]);
        check(&all, "bar", &[">", "*"]);
        check(&all, "qux.quux.corge", &[">"]);
        check(&["foo.>"], "foo", &[]);
        check(&["foo.*"], "foo", &[]);
        check(&["foo.*"], "foo.bar.baz", &[]);
        check(&["*.*.*"], "a.b.c", &["*.*.*"]);
        check(&["*.*.*"], "a.b", &[]);
        check(
            &["a.*.c", "a.>", "a.b.>"],
            "a.b.c",
            &["a.*.c", "a.>", "a.b.>"],
        );
        check(&["a.b.>"], "a.b", &[]);
        // A wildcard counts only as a whole token.
        check(&["foo*", "foo.ba>"], "foo.bar", &[]);
        check(&["foo*"], "foo*", &["foo*"]);
        check(&["foo.ba>"], "foo.ba>", &["foo.ba>"]);
        check(&[], "foo", &[]);
        check(
            &["sensors.>", "sensors.12.t", "sensors.*.t"],
            "sensors.12.t",
            &["sensors.>", "sensors.12.t", "sensors.*.t"],
        );
        check(&["_INBOX.abc.*"], "_INBOX.abc.7", &["_INBOX.abc.*"]);
        check(&["_INBOX.abc.*"], "_INBOX.abd.7", &[]);
    }

    #[test]
    fn many_literal_children_switch_to_a_map_and_back() {
        // Wildcard patterns: literal ones live in the side map, not in nodes.
        let patterns: Vec<String> = (0..100).map(|i| format!("s.{i}.>")).collect();
        let subject = |pattern: &str| pattern.replace('>', "t");
        let mut trie = SubjectTrie::new();
        for pattern in &patterns {
            *trie.entry(pattern.as_bytes()) = pattern.clone();
        }
        assert!(matches!(
            trie.root.literals.get(b"s").map(|n| &n.literals),
            Some(Literals::Many(_))
        ));
        for (index, pattern) in patterns.iter().enumerate() {
            assert_eq!(matches_of(&trie, &subject(pattern)), vec![pattern.clone()]);
            if index % 3 != 0 {
                assert_eq!(trie.remove(pattern.as_bytes()), Some(pattern.clone()));
            }
        }
        assert_eq!(trie.len(), 34);
        for (index, pattern) in patterns.iter().enumerate() {
            let expected = if index % 3 == 0 {
                vec![pattern.clone()]
            } else {
                vec![]
            };
            assert_eq!(matches_of(&trie, &subject(pattern)), expected);
            if index % 3 == 0 {
                trie.remove(pattern.as_bytes());
            }
            let remaining = trie.len();
            if remaining > 0 && remaining <= LITERAL_CHILDREN_DEMOTE_MAX {
                let literals = trie.root.literals.get(b"s").map(|n| &n.literals);
                assert!(matches!(literals, Some(Literals::Few(_))));
            }
        }
        assert!(trie.is_empty());
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn entry_get_remove_and_generation() {
        let mut trie: SubjectTrie<u32> = SubjectTrie::default();
        assert!(trie.is_empty());
        assert_eq!(trie.generation(), 0);
        *trie.entry(b"a.b") += 1;
        *trie.entry(b"a.b") += 1;
        assert_eq!(
            trie.generation(),
            1,
            "a second entry on a pattern inserts nothing"
        );
        *trie.entry(b"a.>") = 7;
        *trie.entry(b"a.*") = 8;
        *trie.entry(b"a") = 9;
        assert_eq!(trie.len(), 4);
        assert_eq!(trie.generation(), 4);
        assert_eq!(trie.get(b"a.b"), Some(&2));
        assert_eq!(trie.get(b"a.>"), Some(&7));
        assert_eq!(trie.get(b"a.*"), Some(&8));
        assert_eq!(trie.get(b"a"), Some(&9));
        assert_eq!(trie.get(b"a.c"), None);
        assert_eq!(trie.get(b"a.b.c"), None);
        assert_eq!(trie.get(b"x.>"), None);
        *trie.get_mut(b"a.*").expect("stored") += 1;
        assert_eq!(trie.get(b"a.*"), Some(&9));
        assert_eq!(trie.get_mut(b"b"), None);

        assert_eq!(trie.remove(b"a.c"), None);
        assert_eq!(trie.remove(b"a.b.c"), None);
        assert_eq!(
            trie.generation(),
            4,
            "removing an absent pattern changes nothing"
        );
        assert_eq!(trie.remove(b"a"), Some(9));
        assert_eq!(
            trie.get(b"a.b"),
            Some(&2),
            "children survive their parent's removal"
        );
        assert_eq!(trie.remove(b"a.>"), Some(7));
        assert_eq!(trie.remove(b"a.>"), None);
        assert_eq!(trie.remove(b"a.b"), Some(2));
        assert_eq!(trie.remove(b"a.*"), Some(9));
        assert_eq!(trie.generation(), 8);
        assert!(trie.is_empty());
        assert_eq!(trie.node_count(), 0);
    }

    #[test]
    fn for_each_match_mut_reaches_every_match_once() {
        let mut trie: SubjectTrie<u32> = SubjectTrie::new();
        for pattern in ["a.b", "a.*", "a.>", ">", "*.b", "a.b.c"] {
            trie.entry(pattern.as_bytes());
        }
        trie.for_each_match_mut(b"a.b", |count| *count += 1);
        trie.for_each_match_mut(b"a.b", |count| *count += 1);
        let counts: BTreeMap<Vec<u8>, u32> = trie.iter().map(|(p, c)| (p, *c)).collect();
        let expected: BTreeMap<Vec<u8>, u32> = [
            ("a.b", 2),
            ("a.*", 2),
            ("a.>", 2),
            (">", 2),
            ("*.b", 2),
            ("a.b.c", 0),
        ]
        .into_iter()
        .map(|(p, c)| (p.as_bytes().to_vec(), c))
        .collect();
        assert_eq!(counts, expected);
    }

    #[test]
    fn iter_yields_every_pattern() {
        let patterns = [
            "a",
            "a.b",
            "a.*",
            "a.>",
            ">",
            "*",
            "*.>",
            "x.y.z",
            "_INBOX.q.*",
        ];
        let trie = trie_of(&patterns);
        let mut listed: Vec<(Vec<u8>, String)> = trie
            .iter()
            .map(|(pattern, value)| (pattern, value.clone()))
            .collect();
        listed.sort();
        let mut expected: Vec<(Vec<u8>, String)> = patterns
            .iter()
            .map(|p| (p.as_bytes().to_vec(), p.to_string()))
            .collect();
        expected.sort();
        assert_eq!(listed, expected);
        assert_eq!(SubjectTrie::<u8>::new().iter().count(), 0);
    }

    #[test]
    fn deepest_subject_a_control_line_allows() {
        // 4096 bytes hold at most 2048 one-byte tokens; recursion is one frame per token.
        let subject = vec!["a"; 2048].join(".");
        let star_pattern = vec!["*"; 2048].join(".");
        let tail_pattern = format!("{}.>", vec!["a"; 2046].join("."));
        check(
            &[&subject, &star_pattern, &tail_pattern],
            &subject,
            &[&subject, &star_pattern, &tail_pattern],
        );
        let mut trie = trie_of(&[&subject, &star_pattern, &tail_pattern]);
        for pattern in [&subject, &star_pattern, &tail_pattern] {
            assert_eq!(trie.remove(pattern.as_bytes()).as_ref(), Some(pattern));
        }
        assert_eq!(trie.node_count(), 0);
    }

    /// A small deterministic generator so the churn test needs no dependency.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }
    }

    fn random_pattern(random: &mut SplitMix64) -> String {
        let token_count = 1 + random.below(6);
        let mut tokens = Vec::new();
        for index in 0..token_count {
            let token = match random.below(10) {
                0 => "*".to_string(),
                1 if index + 1 == token_count => ">".to_string(),
                2..=4 => format!("t{}", random.below(4)),
                _ => format!("{:x}", random.next() >> random.below(64)),
            };
            tokens.push(token);
        }
        tokens.join(".")
    }

    #[test]
    fn churn_leaves_no_nodes_behind() {
        let mut random = SplitMix64(0x5eed);
        let mut trie: SubjectTrie<u64> = SubjectTrie::new();
        let mut model: BTreeMap<String, u64> = BTreeMap::new();
        for round in 0..10_000 {
            let pattern = random_pattern(&mut random);
            *trie.entry(pattern.as_bytes()) = round;
            model.insert(pattern, round);
        }
        assert_eq!(trie.len(), model.len());
        assert!(trie.node_count() >= model.len() / 6);
        // Remove in a different order than inserted.
        let mut patterns: Vec<&String> = model.keys().collect();
        patterns.sort_by_key(|pattern| pattern.len() % 7);
        for pattern in patterns {
            assert_eq!(trie.remove(pattern.as_bytes()), model.get(pattern).copied());
        }
        assert!(trie.is_empty());
        assert_eq!(trie.node_count(), 0);
        assert!(trie.root.is_empty());
        match &trie.root.literals {
            Literals::Few(children) => assert_eq!(children.capacity(), 0),
            Literals::Many(_) => panic!("an empty map was not demoted"),
        }
    }

    #[test]
    fn hash_spreads_similar_tokens() {
        let builder = TokenHashBuilder { seed: 1 };
        let mut low_bits = std::collections::HashSet::new();
        for i in 0..1024u32 {
            low_bits.insert(builder.hash_one(i.to_string().as_bytes()) & 1023);
        }
        // 1024 balls into 1024 bins leave ~63% of bins filled; a weak hash fills far fewer.
        assert!(
            low_bits.len() > 550,
            "only {} distinct buckets",
            low_bits.len()
        );
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let literal = prop::sample::select(vec!["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]);
        let token = prop_oneof![4 => literal, 1 => Just("*")];
        (prop::collection::vec(token, 1..5), any::<bool>()).prop_map(|(mut tokens, tail)| {
            if tail {
                tokens.push(">");
            }
            tokens.join(".")
        })
    }

    fn subject_strategy() -> impl Strategy<Value = String> {
        // Subjects may use tokens no pattern has ("k"), and one past the pattern depth.
        let token =
            prop::sample::select(vec!["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]);
        prop::collection::vec(token, 1..7).prop_map(|tokens| tokens.join("."))
    }

    proptest! {
        #[test]
        fn agrees_with_the_naive_matcher(
            operations in prop::collection::vec((any::<bool>(), pattern_strategy()), 0..200),
            subjects in prop::collection::vec(subject_strategy(), 1..20),
        ) {
            let mut trie: SubjectTrie<String> = SubjectTrie::new();
            let mut model: BTreeMap<String, ()> = BTreeMap::new();
            for (is_insert, pattern) in &operations {
                let generation_before = trie.generation();
                if *is_insert {
                    let is_new = model.insert(pattern.clone(), ()).is_none();
                    *trie.entry(pattern.as_bytes()) = pattern.clone();
                    prop_assert_eq!(trie.generation() != generation_before, is_new);
                } else {
                    let was_present = model.remove(pattern).is_some();
                    prop_assert_eq!(trie.remove(pattern.as_bytes()).is_some(), was_present);
                    prop_assert_eq!(trie.generation() != generation_before, was_present);
                }
                prop_assert_eq!(trie.len(), model.len());
            }
            trie.node_count(); // asserts no empty node survived
            for subject in &subjects {
                let expected: Vec<String> =
                    model.keys().filter(|p| subject_matches(p, subject)).cloned().collect();
                prop_assert_eq!(matches_of(&trie, subject), expected.clone());
                let mut matched_mut = Vec::new();
                trie.for_each_match_mut(subject.as_bytes(), |value| matched_mut.push(value.clone()));
                matched_mut.sort();
                prop_assert_eq!(matched_mut, expected);
            }
            let mut listed: Vec<String> = trie
                .iter()
                .map(|(pattern, value)| {
                    assert_eq!(pattern, value.as_bytes());
                    value.clone()
                })
                .collect();
            listed.sort();
            prop_assert_eq!(listed, model.keys().cloned().collect::<Vec<_>>());
            for pattern in model.keys() {
                prop_assert_eq!(trie.get(pattern.as_bytes()), Some(pattern));
            }
        }
    }
}
