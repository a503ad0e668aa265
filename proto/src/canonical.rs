//! The one canonical view of an HTTP request that the proxy routes, checks and forwards.
//!
//! A backend behind the proxy reads the request-target its own way: nginx and most web
//! frameworks percent-decode the path, merge slashes and remove dot segments, Tomcat cuts
//! `;` parameters, some servers treat `\` as `/`. If the proxy decided on the raw path and
//! sent it on, `//admin` or `/x/../admin` would pass a `deny /admin` policy and be served as
//! `/admin`. So the proxy computes one canonical path, decides on it, and sends exactly it
//! upstream; a path that canonical form cannot make unambiguous is refused.
//!
//! ```text
//!   raw request-target path
//!     │  %XX of a character that may stand unescaped in a path  -> that character
//!     │  %XX of anything else                                   -> kept, upper-case hex
//!     │  %2F %5C %3B (/ \ ;), %00-%1F, %7F, malformed %         -> refused (400)
//!     │  raw \ ; # or controls                                  -> refused (400)
//!     │  raw characters not allowed in a path ([ ] { } | ^ ...) -> escaped
//!     │  decoded bytes not UTF-8 (overlong %C0%AE, %FF)         -> refused (400)
//!     ▼  repeated slashes merged, `.` and `..` segments removed (RFC 3986 5.2.4)
//!   canonical path: routing, bypass rules, policies, and the request sent upstream
//! ```
//!
//! `%25` stays escaped: `%252e` is a literal `%2e`, never a dot. Matching is case-sensitive
//! (RFC 3986); prefixes match on segment boundaries ([`prefix_matches`]).

use std::borrow::Cow;

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The client sent a path that does not start with `/` (asterisk or authority form).
    #[error("the request path must start with '/'")]
    NotAbsolute,
    /// The client sent `%` not followed by two hex digits.
    #[error("the request path has a malformed percent-escape")]
    MalformedEscape,
    /// The client escaped a character that separates path parts (`%2F`, `%5C`, `%3B`):
    /// backends disagree on whether it separates, so the proxy cannot decide for them.
    #[error("the request path has an escaped '/', '\\' or ';'")]
    EscapedSeparator,
    /// The client sent `\` or `;` unescaped (read as `/` or a parameter by some backends).
    #[error("the request path has a '\\' or ';'")]
    AmbiguousCharacter,
    /// The client sent a control character, raw or escaped, or a fragment.
    #[error("the request path has a control character or '#'")]
    ControlCharacter,
    /// The decoded path is not UTF-8 (overlong or stray bytes some decoders accept).
    #[error("the request path is not UTF-8 once decoded")]
    NotUtf8,
}

/// The canonical form of a request path (no query). Borrows when the path is already
/// canonical, which is the common case, so the request path allocates nothing then.
pub fn canonical_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut needs_rewrite = false;
    let mut high = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match class(b) {
            Class::Keep => {}
            Class::Escape => needs_rewrite = true,
            Class::Refuse(e) => return Err(e),
            Class::Percent => {
                let v = escaped_byte(bytes, i)?;
                if decode_escaped(v)?
                    || bytes[i + 1].is_ascii_lowercase()
                    || bytes[i + 2].is_ascii_lowercase()
                {
                    needs_rewrite = true;
                }
                high |= v >= 0x80;
                i += 2;
            }
        }
        i += 1;
    }
    if !needs_rewrite && !has_dot_or_empty_segment(raw) {
        if high {
            check_utf8(raw)?;
        }
        return Ok(Cow::Borrowed(raw));
    }
    // Pass 1: one spelling per character.
    let mut decoded = String::with_capacity(raw.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match class(b) {
            Class::Keep => decoded.push(b as char),
            Class::Escape => push_escaped(&mut decoded, b),
            Class::Refuse(e) => return Err(e),
            Class::Percent => {
                let v = escaped_byte(bytes, i)?;
                if decode_escaped(v)? {
                    decoded.push(v as char);
                } else {
                    push_escaped(&mut decoded, v);
                }
                i += 2;
            }
        }
        i += 1;
    }
    if high || decoded.bytes().any(|b| b >= 0x80) {
        check_utf8(&decoded)?;
    }
    // Pass 2: merge slashes, remove dot segments.
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Whether `path` is under `prefix` at a segment boundary: `/admin` covers `/admin` and
/// `/admin/x`, never `/administrator`; a prefix ending in `/` covers what starts with it.
pub fn prefix_matches(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Whether a path given in configuration (a route, bypass or policy prefix) is in
/// canonical form, so that it can match canonical request paths. `Err` holds the form to
/// write instead, or `None` when no form of it can ever match.
pub fn check_configured_path(p: &str) -> Result<(), Option<String>> {
    match canonical_path(p) {
        Ok(c) if c == p => Ok(()),
        Ok(c) => Err(Some(c.into_owned())),
        Err(_) => Err(None),
    }
}

/// Why a request method was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    /// Methods are case-sensitive (RFC 9110 9.1); a backend that upper-cases `get` would
    /// run what a policy on `GET` did not match, so only upper-case methods are taken.
    #[error("the request method must be upper case")]
    NotUpperCase,
    /// `CONNECT` and `TRACE` are never forwarded: one opens a tunnel past the proxy, the
    /// other echoes the request (and its credentials) back.
    #[error("this method is not allowed through the proxy")]
    NotAllowed,
}

/// Checks a request method (a token, already syntax-checked by the HTTP parser).
pub fn check_method(m: &str) -> Result<(), MethodError> {
    if m.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(MethodError::NotUpperCase);
    }
    if m == "CONNECT" || m == "TRACE" {
        return Err(MethodError::NotAllowed);
    }
    Ok(())
}

/// A request's host and port, as the proxy routes on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority<'a> {
    /// Lower case, without a trailing dot; IPv6 literals keep their brackets.
    pub host: Cow<'a, str>,
    /// The port, if the client named one.
    pub port: Option<u16>,
}

impl<'a> Authority<'a> {
    /// Parses `host[:port]` (no user info); `None` if it is not a valid authority.
    pub fn parse(raw: &'a str) -> Option<Self> {
        let (host, port) = if raw.starts_with('[') {
            let end = raw.find(']')?;
            let rest = &raw[end + 1..];
            let port = match rest.strip_prefix(':') {
                Some(p) => Some(parse_port(p)?),
                None if rest.is_empty() => None,
                None => return None,
            };
            let inner = &raw[1..end];
            inner.parse::<std::net::Ipv6Addr>().ok()?;
            (&raw[..=end], port)
        } else {
            match raw.rsplit_once(':') {
                Some((h, p)) => (h, Some(parse_port(p)?)),
                None => (raw, None),
            }
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let valid = !host.is_empty()
            && host.len() <= 253
            && (host.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
        if !valid {
            return None;
        }
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        Some(Self { host, port })
    }

    /// Whether two authorities name the same host and port (`default_port` stands in for
    /// a missing one).
    pub fn same_as(&self, other: &Authority<'_>, default_port: u16) -> bool {
        self.host == other.host
            && self.port.unwrap_or(default_port) == other.port.unwrap_or(default_port)
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

enum Class {
    /// May stand raw in a canonical path.
    Keep,
    /// Not allowed raw in a path, harmless escaped.
    Escape,
    /// The start of an escape.
    Percent,
    /// Never accepted.
    Refuse(PathError),
}

/// How a byte of the path is treated: RFC 3986 `pchar` and `/` stand raw, except `;`.
fn class(b: u8) -> Class {
    match b {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => Class::Keep,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@' => {
            Class::Keep
        }
        b'/' => Class::Keep,
        b'%' => Class::Percent,
        b'\\' | b';' => Class::Refuse(PathError::AmbiguousCharacter),
        0..=0x1f | 0x7f | b'#' => Class::Refuse(PathError::ControlCharacter),
        // Space, '"', '<', '>', '?', '[', ']', '^', '`', '{', '|', '}', and non-ASCII.
        _ => Class::Escape,
    }
}

/// Whether an escaped byte is decoded (`true`) or stays escaped (`false`).
fn decode_escaped(v: u8) -> Result<bool, PathError> {
    match v {
        b'/' | b'\\' | b';' => Err(PathError::EscapedSeparator),
        0..=0x1f | 0x7f => Err(PathError::ControlCharacter),
        _ => Ok(matches!(class(v), Class::Keep)),
    }
}

fn escaped_byte(bytes: &[u8], at: usize) -> Result<u8, PathError> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    match (
        bytes.get(at + 1).and_then(|b| hex(*b)),
        bytes.get(at + 2).and_then(|b| hex(*b)),
    ) {
        (Some(h), Some(l)) => Ok(h << 4 | l),
        _ => Err(PathError::MalformedEscape),
    }
}

fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 0xf)] as char);
}

/// Whether the fully decoded path is UTF-8 (`path` is known to be well-formed).
fn check_utf8(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(escaped_byte(bytes, i)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    std::str::from_utf8(&out)
        .map(|_| ())
        .map_err(|_| PathError::NotUtf8)
}

/// Whether the path has an empty, `.` or `..` segment (after the leading `/`).
fn has_dot_or_empty_segment(path: &str) -> bool {
    path.contains("//") || path.split('/').any(|s| s == "." || s == "..")
}

/// Merges repeated slashes and removes `.` and `..` segments; `..` at the root stays there.
/// A path ending in `/`, `/.` or `/..` keeps a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in path[1..].split('/') {
        trailing = false;
        match seg {
            "" | "." => trailing = true,
            ".." => {
                segments.pop();
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    out.push('/');
    out.push_str(&segments.join("/"));
    if trailing && !segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canon(p: &str) -> Result<String, PathError> {
        canonical_path(p).map(Cow::into_owned)
    }

    #[test]
    fn canonical_paths_stay_as_they_are_without_copying() {
        for p in [
            "/",
            "/app/index.html",
            "/a/b/",
            "/a-b_c~d.e",
            "/x!$&'()*+,=:@",
            "/%C3%A9t%C3%A9",
            "/%25",
            "/%3F%23%20",
        ] {
            assert!(
                matches!(canonical_path(p), Ok(Cow::Borrowed(c)) if c == p),
                "{p}: {:?}",
                canonical_path(p)
            );
        }
    }

    #[test]
    fn every_spelling_of_admin_is_admin() {
        for p in [
            "//admin",
            "///admin",
            "/./admin",
            "/x/../admin",
            "/x/y/../../admin",
            "/../admin",
            "/../../admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/x/%2e%2e/admin",
            "/x/.%2e/admin",
            "/public/../admin",
            "/admin/.",
            "/admin/x/..",
        ] {
            let c = canon(p).unwrap();
            assert!(c == "/admin" || c == "/admin/", "{p} -> {c}");
            assert!(prefix_matches(&c, "/admin"), "{p} -> {c}");
        }
        assert_eq!(canon("//admin//x//").unwrap(), "/admin/x/");
        assert_eq!(canon("/a/b/..").unwrap(), "/a/");
        assert_eq!(canon("/..").unwrap(), "/");
        assert_eq!(canon("/.").unwrap(), "/");
        assert_eq!(canon("/%7e%41").unwrap(), "/~A");
        assert_eq!(canon("/%2b%40").unwrap(), "/+@");
        assert_eq!(canon("/%c3%a9").unwrap(), "/%C3%A9");
        assert_eq!(canon("/%3f").unwrap(), "/%3F");
        assert_eq!(canon("/a%252e%252e/b").unwrap(), "/a%252e%252e/b");
        assert_eq!(canon("/{x}|[y]^`").unwrap(), "/%7Bx%7D%7C%5By%5D%5E%60");
        // Dots that are not whole segments are names.
        assert_eq!(canon("/a/..b/...").unwrap(), "/a/..b/...");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use PathError::*;
        for (p, e) in [
            ("", NotAbsolute),
            ("*", NotAbsolute),
            ("admin", NotAbsolute),
            ("/%zz", MalformedEscape),
            ("/%4", MalformedEscape),
            ("/%", MalformedEscape),
            ("/a%2fadmin", EscapedSeparator),
            ("/a%2Fadmin", EscapedSeparator),
            ("/public%2f..%2fadmin", EscapedSeparator),
            ("/a%5cadmin", EscapedSeparator),
            ("/admin%3bx", EscapedSeparator),
            ("/a\\admin", AmbiguousCharacter),
            ("/admin;jsessionid=1", AmbiguousCharacter),
            ("/admin..;/x", AmbiguousCharacter),
            ("/admin%00", ControlCharacter),
            ("/admin%0a", ControlCharacter),
            ("/admin%7f", ControlCharacter),
            ("/admin\t", ControlCharacter),
            ("/admin#x", ControlCharacter),
            ("/%c0%ae%c0%ae/admin", NotUtf8),
            ("/%ff", NotUtf8),
            ("/%e2%82", NotUtf8),
        ] {
            assert_eq!(canonical_path(p), Err(e), "{p:?}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/admin", "/admin"));
        assert!(prefix_matches("/admin/", "/admin"));
        assert!(prefix_matches("/admin/x", "/admin"));
        assert!(!prefix_matches("/administrator", "/admin"));
        assert!(!prefix_matches("/admi", "/admin"));
        assert!(prefix_matches("/admin/x", "/admin/"));
        assert!(!prefix_matches("/admin", "/admin/"));
        assert!(prefix_matches("/anything", "/"));
    }

    #[test]
    fn configured_paths_must_be_canonical() {
        assert_eq!(check_configured_path("/admin"), Ok(()));
        assert_eq!(check_configured_path("/admin/"), Ok(()));
        assert_eq!(check_configured_path("//admin"), Err(Some("/admin".into())));
        assert_eq!(
            check_configured_path("/%61dmin"),
            Err(Some("/admin".into()))
        );
        assert_eq!(check_configured_path("/a;b"), Err(None));
    }

    #[test]
    fn methods() {
        assert_eq!(check_method("GET"), Ok(()));
        assert_eq!(check_method("M-SEARCH"), Ok(()));
        assert_eq!(check_method("PROPFIND"), Ok(()));
        assert_eq!(check_method("get"), Err(MethodError::NotUpperCase));
        assert_eq!(check_method("Get"), Err(MethodError::NotUpperCase));
        assert_eq!(check_method("CONNECT"), Err(MethodError::NotAllowed));
        assert_eq!(check_method("TRACE"), Err(MethodError::NotAllowed));
    }

    #[test]
    fn authorities() {
        let a = Authority::parse("App.Example.COM.:8443").unwrap();
        assert_eq!(a.host, "app.example.com");
        assert_eq!(a.port, Some(8443));
        let b = Authority::parse("app.example.com").unwrap();
        assert!(!a.same_as(&b, 443));
        assert!(b.same_as(&Authority::parse("app.example.com:443").unwrap(), 443));
        let v6 = Authority::parse("[::1]:80").unwrap();
        assert_eq!((v6.host.as_ref(), v6.port), ("[::1]", Some(80)));
        for bad in [
            "", ":80", "a:b", "a:", "a:99999", "a b", "a_b", "[::1", "[zz]", "[::1]x", "a/b", "u@a",
        ] {
            assert_eq!(Authority::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn canonical_form_is_a_fixed_point(raw in "/[a-zA-Z0-9./%~_!:@-]{0,40}") {
            if let Ok(c) = canonical_path(&raw) {
                let again = canonical_path(&c).expect("a canonical path is accepted");
                prop_assert_eq!(again.as_ref(), c.as_ref());
                prop_assert!(!c.contains("//"));
                prop_assert!(!c.split('/').any(|s| s == "." || s == ".."));
            }
        }
    }
}
