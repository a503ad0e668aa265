//! The policy model: a tree of `and` / `or` / `not` over criteria about the person, the
//! request and where it comes from.
//!
//! The same policies decide web requests and the TCP/UDP flows of private resources. A
//! criterion that a kind of request does not have never matches it: `method` and `path`
//! never match a flow, `device` never matches a web request.
//!
//! A policy has an optional `allow` and an optional `deny` expression. Deny wins; with no
//! matching allow the answer is deny. In YAML:
//!
//! ```yaml
//! allow:
//!   or:
//!     - group: admins
//!     - and:
//!         - email_domain: example.com
//!         - source_cidr: 10.0.0.0/8
//! deny:
//!   or:
//!     - path: { prefix: /admin }
//!     - not:
//!         time: { days: [mon, tue, wed, thu, fri], from: "07:00", to: "20:00", timezone: Europe/Paris }
//! ```
//!
//! This module holds the model and its checks; [`crate::access`] compiles policies and
//! decides requests.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::registry::FieldError;
use crate::Name;

/// A boolean expression over request criteria.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Expr {
    /// True when every operand is true (and when there are none).
    And(Vec<Expr>),
    /// True when at least one operand is true (false when there are none).
    Or(Vec<Expr>),
    /// True when the operand is false.
    Not(Box<Expr>),
    /// The signed-in user has this name.
    User(Name),
    /// The signed-in user has this e-mail address (case-insensitive).
    Email(String),
    /// The user's e-mail address is in this domain.
    EmailDomain(String),
    /// The user is in this role, or the identity provider lists this group.
    Group(String),
    /// An ID token claim has this value.
    Claim(ClaimMatch),
    /// The request comes from an address in this network.
    SourceCidr(IpNet),
    /// The HTTP method is this one (upper case, like `GET`).
    Method(String),
    /// The request path matches.
    Path(PathMatch),
    /// The request comes within this weekly time window.
    Time(TimeWindow),
    /// The flow comes from this registered device (a `warren` client's machine). Never
    /// matches a web request, which comes from no device.
    Device(Name),
}

/// Days of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// Monday is 0.
    pub fn index(self) -> u8 {
        self as u8
    }
}

/// A weekly window of local time: on `days` (every day when empty), from `from` up to
/// (not including) `to`, both `HH:MM` in `timezone` (an IANA name like `Europe/Paris`).
/// A window with `to` before `from` runs past midnight into the next day; `24:00` is the
/// end of the day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    /// The days the window starts on; empty means every day.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// Start, `HH:MM`.
    pub from: String,
    /// End, `HH:MM` (exclusive).
    pub to: String,
    /// IANA time zone name.
    pub timezone: String,
}

impl TimeWindow {
    /// `from` and `to` in minutes after midnight.
    pub fn minutes(&self) -> Result<(u16, u16), FieldError> {
        let from = parse_hhmm(&self.from, false).map_err(|e| FieldError::new("from", e))?;
        let to = parse_hhmm(&self.to, true).map_err(|e| FieldError::new("to", e))?;
        if from == to {
            return Err(FieldError::new(
                "to",
                "the window is empty: `to` equals `from` (use 00:00 to 24:00 for a whole day)",
            ));
        }
        Ok((from, to))
    }
}

fn parse_hhmm(s: &str, end: bool) -> Result<u16, String> {
    let bad = || format!("{s:?} is not a time like 09:30");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if (h == 24 && m == 0 && end) || (h < 24 && m < 60) {
        Ok(h * 60 + m)
    } else {
        Err(bad())
    }
}

/// A claim criterion: the claim at `path` (dot separated, like `org.team`) equals `value`,
/// or, for a list claim, contains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimMatch {
    /// Dot-separated path into the ID token claims.
    pub path: String,
    /// The value to find.
    pub value: String,
}

/// How a path criterion matches the request path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// The whole path equals this.
    Exact(String),
    /// The path starts with this.
    Prefix(String),
    /// The path matches this regular expression (anchored at both ends).
    Regex(String),
}

impl Expr {
    /// The deepest nesting accepted.
    pub const MAX_DEPTH: usize = 32;
    /// The largest number of nodes accepted in one expression.
    pub const MAX_NODES: usize = 1024;

    /// Checks the whole tree; the error names the path to the bad node, like
    /// `or[1].source_cidr`.
    pub fn validate(&self) -> Result<(), FieldError> {
        let mut nodes = 0;
        self.validate_at(0, &mut nodes)
    }

    fn validate_at(&self, depth: usize, nodes: &mut usize) -> Result<(), FieldError> {
        *nodes += 1;
        if *nodes > Self::MAX_NODES {
            return Err(FieldError::new(
                "",
                format!("an expression has at most {} parts", Self::MAX_NODES),
            ));
        }
        if depth >= Self::MAX_DEPTH {
            return Err(FieldError::new(
                "",
                format!("expressions nest at most {} deep", Self::MAX_DEPTH),
            ));
        }
        match self {
            Expr::And(xs) | Expr::Or(xs) => {
                let op = if matches!(self, Expr::And(_)) {
                    "and"
                } else {
                    "or"
                };
                for (i, x) in xs.iter().enumerate() {
                    x.validate_at(depth + 1, nodes)
                        .map_err(|e| e.within(&format!("{op}[{i}]")))?;
                }
                Ok(())
            }
            Expr::Not(x) => x.validate_at(depth + 1, nodes).map_err(|e| e.within("not")),
            Expr::User(_) | Expr::SourceCidr(_) | Expr::Device(_) => Ok(()),
            Expr::Email(e) => {
                if e.contains('@') && e.len() <= 254 && !e.chars().any(char::is_whitespace) {
                    Ok(())
                } else {
                    Err(FieldError::new(
                        "email",
                        format!("{e:?} is not an e-mail address"),
                    ))
                }
            }
            Expr::EmailDomain(d) => {
                crate::registry::check_hostname(d, false).map_err(|e| e.within("email_domain"))
            }
            Expr::Group(g) => {
                if g.is_empty() || g.len() > 256 || g.chars().any(char::is_control) {
                    Err(FieldError::new(
                        "group",
                        "expected 1 to 256 printable characters",
                    ))
                } else {
                    Ok(())
                }
            }
            Expr::Claim(c) => {
                if c.path.is_empty() || c.path.len() > 256 || c.path.split('.').any(str::is_empty) {
                    return Err(FieldError::new(
                        "claim.path",
                        "expected a dot-separated claim path like `org.team`",
                    ));
                }
                if c.value.len() > 1024 {
                    return Err(FieldError::new("claim.value", "at most 1024 bytes"));
                }
                Ok(())
            }
            Expr::Method(m) => {
                let ok =
                    !m.is_empty() && m.len() <= 32 && m.chars().all(|c| c.is_ascii_uppercase());
                if ok {
                    Ok(())
                } else {
                    Err(FieldError::new(
                        "method",
                        format!("{m:?} is not an upper-case HTTP method like GET"),
                    ))
                }
            }
            Expr::Path(p) => p.validate().map_err(|e| e.within("path")),
            Expr::Time(w) => {
                w.minutes().map_err(|e| e.within("time"))?;
                jiff::tz::TimeZone::get(&w.timezone).map_err(|_| {
                    FieldError::new(
                        "time.timezone",
                        format!(
                            "{:?} is not an IANA time zone like Europe/Paris",
                            w.timezone
                        ),
                    )
                })?;
                Ok(())
            }
        }
    }
}

impl PathMatch {
    fn validate(&self) -> Result<(), FieldError> {
        match self {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => {
                let field = if matches!(self, PathMatch::Exact(_)) {
                    "exact"
                } else {
                    "prefix"
                };
                if !p.starts_with('/') || p.len() > 1024 {
                    return Err(FieldError::new(
                        field,
                        "a path starts with '/' and has at most 1024 bytes",
                    ));
                }
                crate::registry::canonical_form(p).map_err(|e| e.within(field))
            }
            PathMatch::Regex(r) => {
                if r.len() > 1024 {
                    return Err(FieldError::new("regex", "at most 1024 bytes"));
                }
                regex::RegexBuilder::new(r)
                    .size_limit(1 << 20)
                    .build()
                    .map(|_| ())
                    .map_err(|e| FieldError::new("regex", format!("not a valid regex: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// YAML as the CLI reads it: enums as single-key maps.
    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, serde_norway::Error> {
        serde_norway::with::singleton_map_recursive::deserialize(
            serde_norway::Deserializer::from_str(s),
        )
    }

    #[test]
    fn yaml_reads_as_people_write_it() {
        let e: Expr = yaml(
            "or:\n  - group: admins\n  - and:\n      - email_domain: example.com\n      - source_cidr: 10.0.0.0/8\n  - not:\n      method: DELETE\n",
        )
        .unwrap();
        assert!(e.validate().is_ok());
        let Expr::Or(xs) = e else {
            panic!("expected or")
        };
        assert_eq!(xs[0], Expr::Group("admins".into()));
        assert!(matches!(&xs[1], Expr::And(v) if v.len() == 2));
    }

    #[test]
    fn bad_leaves_are_named_by_path() {
        let e: Expr =
            yaml("and:\n  - group: ok\n  - or:\n      - path: {regex: '(unclosed'}\n").unwrap();
        assert_eq!(e.validate().unwrap_err().field, "and[1].or[0].path.regex");
        let e: Expr = yaml("method: get\n").unwrap();
        assert_eq!(e.validate().unwrap_err().field, "method");
    }

    #[test]
    fn time_windows_read_from_yaml() {
        let e: Expr = yaml(
            "time: {days: [mon, fri], from: \"22:00\", to: \"06:00\", timezone: Europe/Paris}\n",
        )
        .unwrap();
        assert!(e.validate().is_ok());
        let Expr::Time(w) = e else {
            panic!("expected a time window")
        };
        assert_eq!(w.days, vec![Weekday::Mon, Weekday::Fri]);
        assert_eq!(w.minutes().unwrap(), (22 * 60, 6 * 60));
        assert!(yaml::<Expr>(
            "time: {days: [someday], from: \"09:00\", to: \"10:00\", timezone: UTC}\n"
        )
        .is_err());
    }

    #[test]
    fn bad_cidr_and_unknown_criteria_fail_to_parse() {
        assert!(yaml::<Expr>("source_cidr: 10.0.0.0/33\n").is_err());
        assert!(yaml::<Expr>("colour: red\n").is_err());
    }

    #[test]
    fn device_criteria_read_from_yaml() {
        let e: Expr = yaml("and:\n  - device: alice-laptop\n  - group: admins\n").unwrap();
        assert!(e.validate().is_ok());
        let Expr::And(xs) = e else {
            panic!("expected and")
        };
        assert_eq!(xs[0], Expr::Device(Name::new("alice-laptop").unwrap()));
        assert!(yaml::<Expr>("device: Not A Name\n").is_err());
    }

    #[test]
    fn depth_is_bounded() {
        let mut e = Expr::Group("g".into());
        for _ in 0..Expr::MAX_DEPTH {
            e = Expr::Not(Box::new(e));
        }
        assert!(e.validate().is_err());
    }
}
