//! Subject, wildcard and queue-name rules of nats-server 2.9.10, and a naive matcher.
//!
//! Owns: what SUB and pedantic PUB accept (probed against the live server, see
//! docs/nats-wire-notes.md) and [`subject_matches`], the slow obviously-correct
//! reference the router's trie is tested against.
//!
//! Deliberately does not: index subscriptions, allocate, or check UTF-8 — nats-server
//! 2.9.10 accepts any bytes but '.', whitespace and empty tokens (NUL, 0xFF and
//! non-ASCII all subscribe and publish fine). Length is bounded by the control line.

/// Bytes that may not appear in a subject or queue name. SUB arguments are already split
/// on space/tab/CR/LF, so only form feed can arrive through the protocol, but subjects
/// also come from config and JetStream requests.
#[inline]
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0x0c)
}

/// A subject a client may SUB to: non-empty '.'-separated tokens, no whitespace; `*` and
/// `>` are wildcards only as whole tokens (`foo*` is a literal) and `>` only as the last
/// token. nats-server 2.9.10 applies the same rule with and without pedantic.
pub fn is_valid_subject(s: &[u8]) -> bool {
    if s.is_empty() {
        return false;
    }
    let mut tokens = s.split(|&b| b == b'.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() || token.iter().any(|&b| is_blank(b)) {
            return false;
        }
        if token == b">" && tokens.peek().is_some() {
            return false;
        }
    }
    true
}

/// A subject a pedantic client may PUB to: valid and without wildcard tokens.
/// (Non-pedantic PUB is not checked at all; a subject with empty tokens then simply
/// matches no subscription.)
pub fn is_valid_publish_subject(s: &[u8]) -> bool {
    is_valid_subject(s) && s.split(|&b| b == b'.').all(|t| t != b"*" && t != b">")
}

/// A queue group name nats-server 2.9.10 accepts: any non-empty run of non-blank bytes
/// (`q.*`, `>`, `a..b`, NUL and 0xFF were all accepted by the live server).
pub fn is_valid_queue(s: &[u8]) -> bool {
    !s.is_empty() && !s.iter().any(|&b| is_blank(b))
}

/// Whether `subject` (taken literally: a `*` in it is just a token) is delivered to a
/// subscription on `pattern`. Naive token-by-token reference for testing the trie.
/// An invalid pattern, or a subject with an empty token, matches nothing.
pub fn subject_matches(pattern: &[u8], subject: &[u8]) -> bool {
    if !is_valid_subject(pattern) || subject.is_empty() {
        return false;
    }
    if subject.split(|&b| b == b'.').any(|t| t.is_empty()) {
        return false;
    }
    let mut subject_tokens = subject.split(|&b| b == b'.');
    for p in pattern.split(|&b| b == b'.') {
        match p {
            // `>` is last (the pattern is valid) and needs at least one more token.
            b">" => return subject_tokens.next().is_some(),
            b"*" => {
                if subject_tokens.next().is_none() {
                    return false;
                }
            }
            literal => {
                if subject_tokens.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One case: subject, valid for SUB, valid for pedantic PUB, valid as queue name.
    #[track_caller]
    fn check(s: &[u8], sub: bool, publish: bool, queue: bool) {
        let got = (
            is_valid_subject(s),
            is_valid_publish_subject(s),
            is_valid_queue(s),
        );
        assert_eq!(
            got,
            (sub, publish, queue),
            "{:?}",
            String::from_utf8_lossy(s)
        );
    }

    #[test]
    fn validity_as_probed_on_nats_server_2_9_10() {
        check(b"foo", true, true, true);
        check(b"foo.bar", true, true, true);
        check(b"foo..bar", false, false, true);
        check(b".foo", false, false, true);
        check(b"foo.", false, false, true);
        check(b".", false, false, true);
        check(b"", false, false, false);
        check(b"foo*", true, true, true);
        check(b"foo>", true, true, true);
        check(b"foo.*a", true, true, true);
        check(b"foo.**", true, true, true);
        check(b"foo.>>", true, true, true);
        check(b"*", true, false, true);
        check(b">", true, false, true);
        check(b"foo.>", true, false, true);
        check(b"foo.*.bar", true, false, true);
        check(b"*.*", true, false, true);
        check(b"foo.>.bar", false, false, true);
        check(b">.foo", false, false, true);
        check(b">.>", false, false, true);
        check(b"a\x00b", true, true, true);
        check(b"caf\xc3\xa9", true, true, true);
        check(b"\xff", true, true, true);
        check(b"foo.\x7f", true, true, true);
        check(b"$SYS.x", true, true, true);
        check(b"foo bar", false, false, false);
        check(b"foo\tbar", false, false, false);
        check(b"foo\x0cbar", false, false, false);
    }

    #[track_caller]
    fn check_match(pattern: &str, subject: &str, want: bool) {
        assert_eq!(
            subject_matches(pattern.as_bytes(), subject.as_bytes()),
            want,
            "{pattern} ~ {subject}"
        );
    }

    #[test]
    fn matching() {
        check_match("foo", "foo", true);
        check_match("foo", "foo.bar", false);
        check_match("foo.bar", "foo", false);
        check_match("*", "foo", true);
        check_match("*", "foo.bar", false);
        check_match("foo.*", "foo.bar", true);
        check_match("foo.*", "foo", false);
        check_match("foo.*.baz", "foo.bar.baz", true);
        check_match("*.*", "a.b", true);
        check_match(">", "foo", true);
        check_match(">", "foo.bar.baz", true);
        check_match("foo.>", "foo", false);
        check_match("foo.>", "foo.bar", true);
        check_match("foo.>", "foo.bar.baz", true);
        check_match("foo.*.>", "foo.bar", false);
        check_match("foo.*.>", "foo.bar.baz", true);
        check_match("foo*", "foo*", true);
        check_match("foo*", "foox", false);
        // Published subjects are literal: a `*` or `>` token in one is just a token.
        check_match("*", "*", true);
        check_match(">", "foo.>.bar", true);
        check_match("foo.>.bar", "foo.>.bar", false);
        // Subjects with empty tokens reach nobody (observed with PUB foo..bar).
        check_match(">", "foo..bar", false);
        check_match(">", ".foo", false);
        check_match(">", "foo.", false);
        check_match(">", "", false);
        check_match("", "", false);
    }
}
