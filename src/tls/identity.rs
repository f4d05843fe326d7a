//! The identities of a client certificate that `map` (nats-server's
//! `verify_and_map`) looks users up by, in the reference's order: email SANs,
//! then DNS SANs, then URI SANs, then the subject DN as Go's
//! `pkix.RDNSequence.String()` writes it (RFC 2253 order, last RDN first:
//! `CN=alice,O=Acme,C=US`; attribute types Go has no name for as
//! `1.2.840.113549.1.9.1=#<hex of the DER value>`).
//!
//! A small DER reader of exactly the certificate fields this needs, not an
//! X.509 library: the certificate was already verified by rustls (webpki)
//! against the configured CAs before anything here runs, so this only reads
//! names. Malformed input gives fewer identities, never a panic.

/// One DER element: its tag and its contents.
#[derive(Clone, Copy)]
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
}

/// Reads DER elements one after another from a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next element with its whole encoding (tag, length, contents).
    fn next_raw(&mut self) -> Option<(Element<'a>, &'a [u8])> {
        let bytes = self.rest;
        let (&tag, after_tag) = bytes.split_first()?;
        // Multi-byte tags never occur in the fields read here.
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, mut after_len) = after_tag.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || after_len.len() < count {
                return None;
            }
            let (len_bytes, rest) = after_len.split_at(count);
            after_len = rest;
            len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if after_len.len() < len {
            return None;
        }
        let (contents, rest) = after_len.split_at(len);
        let whole = &bytes[..bytes.len() - rest.len()];
        self.rest = rest;
        Some((Element { tag, contents }, whole))
    }

    fn next(&mut self) -> Option<Element<'a>> {
        self.next_raw().map(|(e, _)| e)
    }

    /// The next element, which must have `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        let e = self.next()?;
        (e.tag == tag).then_some(e.contents)
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
/// subjectAltName, 2.5.29.17.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The certificate's names for `map`, in the order the reference tries them.
/// `der` is the client's end-entity certificate.
pub fn certificate_identities(der: &[u8]) -> Vec<String> {
    let Some(Names { subject, alt_names }) = subject_and_alt_names(der) else {
        return Vec::new();
    };
    let mut emails = Vec::new();
    let mut dns = Vec::new();
    let mut uris = Vec::new();
    if let Some(alt_names) = alt_names {
        let mut names = Reader::new(alt_names);
        while let Some(name) = names.next() {
            let Ok(text) = std::str::from_utf8(name.contents) else {
                continue;
            };
            // GeneralName, context-specific implicit tags.
            match name.tag {
                0x81 => emails.push(text.to_string()),
                0x82 => dns.push(text.to_string()),
                0x86 => uris.push(text.to_string()),
                _ => {}
            }
        }
    }
    let mut identities = emails;
    identities.append(&mut dns);
    identities.append(&mut uris);
    if let Some(dn) = subject.and_then(distinguished_name) {
        if !dn.is_empty() {
            identities.push(dn);
        }
    }
    identities
}

/// Where a certificate's names are.
struct Names<'a> {
    /// The subject Name's contents.
    subject: Option<&'a [u8]>,
    /// The subjectAltName extension's GeneralNames contents, if present.
    alt_names: Option<&'a [u8]>,
}

fn subject_and_alt_names(der: &[u8]) -> Option<Names<'_>> {
    let certificate = Reader::new(der).expect(SEQUENCE)?;
    let tbs = Reader::new(certificate).expect(SEQUENCE)?;
    let mut fields = Reader::new(tbs);
    if fields.next()?.tag == 0xa0 {
        // That was the [0] EXPLICIT version; this is the serial number.
        fields.next()?;
    }
    // Then signature, issuer, validity.
    for _ in 0..3 {
        fields.next()?;
    }
    let subject = fields.expect(SEQUENCE);
    fields.next()?; // subjectPublicKeyInfo
    let mut alt_names = None;
    while let Some(field) = fields.next() {
        if field.tag != 0xa3 {
            continue; // issuerUniqueID, subjectUniqueID
        }
        let mut extensions = Reader::new(Reader::new(field.contents).expect(SEQUENCE)?);
        while let Some(extension) = extensions.next() {
            let mut parts = Reader::new(extension.contents);
            if parts.expect(OID) != Some(OID_SUBJECT_ALT_NAME) {
                continue;
            }
            let mut value = parts.next()?;
            if value.tag == 0x01 {
                value = parts.next()?; // critical BOOLEAN
            }
            if value.tag != OCTET_STRING {
                return None;
            }
            alt_names = Reader::new(value.contents).expect(SEQUENCE);
        }
    }
    Some(Names { subject, alt_names })
}

/// Go's names for attribute types; others are written as dotted OIDs.
fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.6" => "C",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.3" => "CN",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.17" => "POSTALCODE",
        _ => return None,
    })
}

/// The subject as Go's `RDNSequence.String()`: RDNs last to first, joined by
/// `,`; attributes within one RDN joined by `+`.
fn distinguished_name(name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    let mut reader = Reader::new(name);
    while !reader.is_empty() {
        let set = reader.expect(SET)?;
        let mut attributes = Vec::new();
        let mut set_reader = Reader::new(set);
        while let Some(attribute) = set_reader.next() {
            if attribute.tag != SEQUENCE {
                return None;
            }
            let mut parts = Reader::new(attribute.contents);
            let oid = dotted_oid(parts.expect(OID)?)?;
            let (value, value_der) = parts.next_raw()?;
            let text = match (attribute_name(&oid), string_value(value)) {
                (Some(name), Some(text)) => format!("{name}={}", escape(&text)),
                (None, Some(text)) => format!("{oid}=#{}", hex(&go_string_der(&text))),
                (_, None) => format!("{oid}=#{}", hex(value_der)),
            };
            attributes.push(text);
        }
        rdns.push(attributes.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// A DER string value as text (the string types Go decodes to a string).
fn string_value(value: Element<'_>) -> Option<String> {
    match value.tag {
        // UTF8String, PrintableString, IA5String, NumericString, T61String
        0x0c | 0x13 | 0x16 | 0x12 => std::str::from_utf8(value.contents).ok().map(String::from),
        // T61String: Go reads it as Latin-1.
        0x14 => Some(value.contents.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UTF-16BE.
        0x1e => {
            if !value.contents.len().is_multiple_of(2) {
                return None;
            }
            let units = value
                .contents
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

/// How Go's `asn1.Marshal` encodes a string value: PrintableString when every
/// character is allowed there, UTF8String otherwise.
fn go_string_der(text: &str) -> Vec<u8> {
    let printable = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b" '()+,-./:=?*".contains(&b));
    let mut der = vec![if printable { 0x13 } else { 0x0c }];
    let len = text.len();
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let bytes = (len as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        der.push(0x80 | (4 - skip) as u8);
        der.extend_from_slice(&bytes[skip..]);
    }
    der.extend_from_slice(text.as_bytes());
    der
}

/// RFC 2253 escaping as Go does it: `,+"\<>;` always, a space at either end,
/// a `#` at the start.
fn escape(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let mut out = String::with_capacity(value.len());
    for (i, &c) in chars.iter().enumerate() {
        let needs = match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => true,
            ' ' => i == 0 || i == chars.len() - 1,
            '#' => i == 0,
            _ => false,
        };
        if needs {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OID's contents as `2.5.4.3`.
fn dotted_oid(contents: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for (i, &b) in contents.iter().enumerate() {
        if value > (u64::MAX >> 7) {
            return None;
        }
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        } else if i == contents.len() - 1 {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    Some(
        arcs.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join("."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_and_escaping() {
        assert_eq!(dotted_oid(&[0x55, 0x04, 0x03]).as_deref(), Some("2.5.4.3"));
        assert_eq!(
            dotted_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]).as_deref(),
            Some("1.2.840.113549.1.9.1")
        );
        assert_eq!(dotted_oid(&[0x86]), None);
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape(" #x "), "\\ #x\\ ");
        assert_eq!(escape("#x#"), "\\#x#");
    }

    #[test]
    fn garbage_gives_no_identity_and_no_panic() {
        assert!(certificate_identities(&[]).is_empty());
        assert!(certificate_identities(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_empty());
        assert!(certificate_identities(&[0x30, 0x03, 0x30, 0x01, 0x02]).is_empty());
        for len in 0..64u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ 0x30).collect();
            let _ = certificate_identities(&bytes);
        }
    }

    /// A name with two RDNs and an attribute Go has no name for.
    #[test]
    fn distinguished_name_is_written_as_go_does() {
        // SEQUENCE { SET { SEQ { 2.5.4.6, PrintableString "US" } },
        //            SET { SEQ { 2.5.4.3, UTF8String "a,b" } },
        //            SET { SEQ { 1.2.840.113549.1.9.1, IA5String "x@y" } } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'U', b'S', //
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, b'a', b',', b'b',
            0x31, 0x12, 0x30, 0x10, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09,
            0x01, 0x16, 0x03, b'x', b'@', b'y',
        ];
        assert_eq!(
            distinguished_name(&name).as_deref(),
            Some("1.2.840.113549.1.9.1=#0c03784079,CN=a\\,b,C=US")
        );
    }
}
