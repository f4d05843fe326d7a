//! Predefined topic ids: a server-side table of subject templates, so one
//! firmware constant (`1 = "sensors.{client}.temp"`) serves every device
//! without per-device configuration. `{client}` is replaced by the device's
//! client id (which must then be a valid subject token).

use std::collections::BTreeMap;

/// The table, built once from the config and shared by every shard.
#[derive(Clone, Debug, Default)]
pub struct Predefined {
    templates: BTreeMap<u32, Template>,
}

#[derive(Clone, Debug)]
struct Template {
    /// The template split at each `{client}`: `prefix {client} middle … suffix`.
    parts: Vec<Box<[u8]>>,
}

const CLIENT_PLACEHOLDER: &[u8] = b"{client}";

/// Why a template was refused at start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// Ids start at 1 (0 is never a topic).
    #[error("predefined topic id 0 is reserved")]
    ZeroId,
    /// The template with `{client}` filled in is not a valid publish subject.
    #[error("predefined topic {0} is not a valid subject template: {1:?}")]
    InvalidSubject(u32, String),
}

impl Predefined {
    pub fn new(entries: &BTreeMap<u32, String>) -> Result<Predefined, TemplateError> {
        let mut templates = BTreeMap::new();
        for (&id, template) in entries {
            if id == 0 {
                return Err(TemplateError::ZeroId);
            }
            let bytes = template.as_bytes();
            let mut parts = Vec::new();
            let mut rest = bytes;
            while let Some(at) = find(rest, CLIENT_PLACEHOLDER) {
                parts.push(rest[..at].into());
                rest = &rest[at + CLIENT_PLACEHOLDER.len()..];
            }
            parts.push(rest.into());
            let parsed = Template { parts };
            let sample = parsed.fill(b"x");
            if !crate::nats::subject::is_valid_publish_subject(&sample) {
                return Err(TemplateError::InvalidSubject(id, template.clone()));
            }
            templates.insert(id, parsed);
        }
        Ok(Predefined { templates })
    }

    /// The subject of predefined id `id` for `client_id`; None if the id is
    /// unknown or the filled-in subject is invalid (a client id with a dot,
    /// space or wildcard cannot stand for one token).
    pub fn subject(&self, id: u32, client_id: &[u8]) -> Option<Vec<u8>> {
        let template = self.templates.get(&id)?;
        if template.parts.len() > 1 && !is_token(client_id) {
            return None;
        }
        Some(template.fill(client_id))
    }

    /// The predefined id whose subject for `client_id` is `subject`, if any
    /// (deliveries use it instead of registering the subject).
    pub fn id_for(&self, subject: &[u8], client_id: &[u8]) -> Option<u32> {
        self.templates
            .keys()
            .copied()
            .find(|&id| self.subject(id, client_id).is_some_and(|s| s == subject))
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }
}

impl Template {
    fn fill(&self, client_id: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(client_id);
            }
            out.extend_from_slice(part);
        }
        out
    }
}

fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|&b| !matches!(b, b'.' | b'*' | b'>' | b' ' | b'\t' | b'\r' | b'\n' | 0))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(u32, &str)]) -> Result<Predefined, TemplateError> {
        Predefined::new(&entries.iter().map(|(i, t)| (*i, t.to_string())).collect())
    }

    #[test]
    fn templates_fill_in_the_client_id() {
        let t = table(&[
            (1, "sensors.{client}.temp"),
            (2, "fleet.alarms"),
            (3, "{client}.{client}"),
        ])
        .expect("valid");
        assert_eq!(
            t.subject(1, b"dev42").as_deref(),
            Some(&b"sensors.dev42.temp"[..])
        );
        assert_eq!(
            t.subject(2, b"anything.goes").as_deref(),
            Some(&b"fleet.alarms"[..])
        );
        assert_eq!(t.subject(3, b"a").as_deref(), Some(&b"a.a"[..]));
        assert_eq!(t.subject(9, b"dev42"), None);
        assert_eq!(t.subject(1, b"a.b"), None, "a dotted id is not one token");
        assert_eq!(t.subject(1, b"*"), None);
        assert_eq!(t.id_for(b"sensors.dev42.temp", b"dev42"), Some(1));
        assert_eq!(t.id_for(b"sensors.dev42.temp", b"dev43"), None);
        assert_eq!(t.id_for(b"fleet.alarms", b"x"), Some(2));
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(table(&[(0, "a")]).err(), Some(TemplateError::ZeroId));
        assert!(matches!(
            table(&[(1, "a..{client}")]),
            Err(TemplateError::InvalidSubject(1, _))
        ));
        assert!(matches!(
            table(&[(1, "a.*")]),
            Err(TemplateError::InvalidSubject(1, _))
        ));
    }
}
