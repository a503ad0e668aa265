//! Access decisions: policies compiled once per registry version, then evaluated against
//! every request.
//!
//! A resource lists policies. The request is denied when any policy's `deny` matches;
//! otherwise it is allowed when some policy's `allow` matches; otherwise (and always when
//! the resource lists no policy) it is denied. Criteria about the person never match an
//! anonymous request, so `not: {group: x}` is the only way an anonymous request matches a
//! person criterion.
//!
//! Evaluation allocates nothing and reads no clock: the caller passes the time.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

use crate::policy::{Expr, PathMatch, TimeWindow};
use crate::registry::{FieldError, Policy};

/// Who is asking, as the session knows them.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// The user's registry name.
    pub user: &'a str,
    /// The user's verified e-mail address (compared without regard to ASCII case); empty
    /// when the address is not verified, so that it matches no `email` or `email_domain`
    /// criterion (see `Session::verified_email`).
    pub email: &'a str,
    /// Roles in the registry and groups from the identity provider.
    pub groups: &'a [String],
    /// The ID token's claims (`Null` when there are none).
    pub claims: &'a serde_json::Value,
}

/// Everything a decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The signed-in person; `None` for an anonymous request.
    pub identity: Option<Identity<'a>>,
    /// Where the request comes from.
    pub source: IpAddr,
    /// HTTP method, upper case (`None` for TCP/UDP flows).
    pub method: Option<&'a str>,
    /// Request path (`None` for TCP/UDP flows).
    pub path: Option<&'a str>,
    /// The registered device a flow comes from (`None` for web requests, which then match
    /// no `device` criterion).
    pub device: Option<&'a str>,
    /// Now, in seconds since the Unix epoch.
    pub now: i64,
}

/// The outcome, and why: the access log records both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'p> {
    /// The `allow` of this policy matched and no `deny` did.
    Allow {
        /// The policy's name.
        policy: &'p str,
    },
    /// The `deny` of this policy matched.
    DeniedBy {
        /// The policy's name.
        policy: &'p str,
    },
    /// No `allow` matched.
    NoAllowMatched,
    /// The resource lists no policy.
    NoPolicy,
}

impl Decision<'_> {
    /// Whether access is granted.
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// A short reason for logs and deny pages.
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow { policy } => format!("allowed by policy {policy}"),
            Decision::DeniedBy { policy } => format!("denied by policy {policy}"),
            Decision::NoAllowMatched => "no policy allows this request".into(),
            Decision::NoPolicy => "the resource has no policy".into(),
        }
    }
}

/// A policy ready for evaluation.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    name: String,
    allow: Option<Node>,
    deny: Option<Node>,
}

#[derive(Debug, Clone)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    User(String),
    Email(String),
    /// `@domain`.
    EmailDomain(String),
    Group(String),
    Claim(Vec<String>, String),
    Cidr(IpNet),
    Method(String),
    PathExact(String),
    PathPrefix(String),
    PathRegex(Regex),
    Time(Window),
    Device(String),
}

#[derive(Debug, Clone)]
struct Window {
    /// Bit `d` set: the window starts on weekday `d` (Monday = 0).
    days: u8,
    from: u16,
    to: u16,
    tz: jiff::tz::TimeZone,
}

impl CompiledPolicy {
    /// Compiles a policy (validating it again: registry contents are trusted only so far).
    pub fn compile(policy: &Policy) -> Result<Self, FieldError> {
        Ok(Self {
            name: policy.name.to_string(),
            allow: policy
                .allow
                .as_ref()
                .map(|e| compile(e).map_err(|e| e.within("allow")))
                .transpose()?,
            deny: policy
                .deny
                .as_ref()
                .map(|e| compile(e).map_err(|e| e.within("deny")))
                .transpose()?,
        })
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether evaluating it may read ID token claims (callers parse them only then).
    pub fn uses_claims(&self) -> bool {
        fn any(n: &Node) -> bool {
            match n {
                Node::And(v) | Node::Or(v) => v.iter().any(any),
                Node::Not(n) => any(n),
                Node::Claim(..) => true,
                _ => false,
            }
        }
        self.allow.as_ref().is_some_and(any) || self.deny.as_ref().is_some_and(any)
    }
}

/// Decides a request against the resource's policies.
pub fn decide<'p>(
    policies: impl IntoIterator<Item = &'p CompiledPolicy> + Clone,
    facts: &Facts<'_>,
) -> Decision<'p> {
    let mut any = false;
    for p in policies.clone() {
        any = true;
        if p.deny.as_ref().is_some_and(|d| eval(d, facts)) {
            return Decision::DeniedBy { policy: &p.name };
        }
    }
    if !any {
        return Decision::NoPolicy;
    }
    for p in policies {
        if p.allow.as_ref().is_some_and(|a| eval(a, facts)) {
            return Decision::Allow { policy: &p.name };
        }
    }
    Decision::NoAllowMatched
}

fn compile(e: &Expr) -> Result<Node, FieldError> {
    e.validate()?;
    Ok(compile_checked(e))
}

fn compile_checked(e: &Expr) -> Node {
    match e {
        Expr::And(xs) => Node::And(xs.iter().map(compile_checked).collect()),
        Expr::Or(xs) => Node::Or(xs.iter().map(compile_checked).collect()),
        Expr::Not(x) => Node::Not(Box::new(compile_checked(x))),
        Expr::User(u) => Node::User(u.to_string()),
        Expr::Email(m) => Node::Email(m.clone()),
        Expr::EmailDomain(d) => Node::EmailDomain(format!("@{d}")),
        Expr::Group(g) => Node::Group(g.clone()),
        Expr::Claim(c) => Node::Claim(
            c.path.split('.').map(str::to_owned).collect(),
            c.value.clone(),
        ),
        Expr::SourceCidr(n) => Node::Cidr(*n),
        Expr::Method(m) => Node::Method(m.clone()),
        Expr::Path(PathMatch::Exact(p)) => Node::PathExact(p.clone()),
        Expr::Path(PathMatch::Prefix(p)) => Node::PathPrefix(p.clone()),
        Expr::Path(PathMatch::Regex(r)) => Node::PathRegex(
            regex::RegexBuilder::new(&format!("^(?:{r})$"))
                .size_limit(1 << 20)
                .build()
                .expect("validated"),
        ),
        Expr::Time(w) => Node::Time(window(w)),
        Expr::Device(d) => Node::Device(d.to_string()),
    }
}

fn window(w: &TimeWindow) -> Window {
    let (from, to) = w.minutes().expect("validated");
    let days = if w.days.is_empty() {
        0x7f
    } else {
        w.days.iter().fold(0u8, |acc, d| acc | (1 << d.index()))
    };
    Window {
        days,
        from,
        to,
        tz: jiff::tz::TimeZone::get(&w.timezone).expect("validated"),
    }
}

fn eval(n: &Node, f: &Facts<'_>) -> bool {
    match n {
        Node::And(xs) => xs.iter().all(|x| eval(x, f)),
        Node::Or(xs) => xs.iter().any(|x| eval(x, f)),
        Node::Not(x) => !eval(x, f),
        Node::User(u) => f.identity.is_some_and(|i| i.user == u),
        Node::Email(m) => f.identity.is_some_and(|i| i.email.eq_ignore_ascii_case(m)),
        Node::EmailDomain(d) => f.identity.is_some_and(|i| {
            i.email.len() > d.len() && i.email[i.email.len() - d.len()..].eq_ignore_ascii_case(d)
        }),
        Node::Group(g) => f.identity.is_some_and(|i| i.groups.iter().any(|x| x == g)),
        Node::Claim(path, value) => f
            .identity
            .is_some_and(|i| claim_matches(i.claims, path, value)),
        Node::Cidr(net) => net.contains(&canonical(f.source)),
        Node::Method(m) => f.method == Some(m.as_str()),
        Node::PathExact(p) => f.path == Some(p.as_str()),
        Node::PathPrefix(p) => f
            .path
            .is_some_and(|x| crate::canonical::prefix_matches(x, p)),
        Node::PathRegex(r) => f.path.is_some_and(|x| r.is_match(x)),
        Node::Time(w) => w.contains(f.now),
        Node::Device(d) => f.device == Some(d.as_str()),
    }
}

/// An IPv4 address in IPv6 clothing (`::ffff:10.0.0.1`, as a dual-stack socket reports
/// it) is matched as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn claim_matches(claims: &serde_json::Value, path: &[String], value: &str) -> bool {
    let mut at = claims;
    for p in path {
        match at.get(p) {
            Some(v) => at = v,
            None => return false,
        }
    }
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s == value,
        serde_json::Value::Bool(b) => value == if *b { "true" } else { "false" },
        serde_json::Value::Number(n) => n.to_string() == value,
        _ => false,
    };
    match at {
        serde_json::Value::Array(xs) => xs.iter().any(scalar),
        v => scalar(v),
    }
}

impl Window {
    fn contains(&self, now: i64) -> bool {
        let Ok(ts) = jiff::Timestamp::from_second(now) else {
            return false;
        };
        let local = self.tz.to_datetime(ts);
        let day = local.weekday().to_monday_zero_offset() as u8;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        let starts_on = |d: u8| self.days & (1 << d) != 0;
        if self.from < self.to {
            starts_on(day) && minute >= self.from && minute < self.to
        } else {
            // Past midnight: the evening part starts today, the morning part yesterday.
            let yesterday = (day + 6) % 7;
            (starts_on(day) && minute >= self.from) || (starts_on(yesterday) && minute < self.to)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ClaimMatch, Weekday};
    use crate::Name;

    fn policy(name: &str, allow: Option<Expr>, deny: Option<Expr>) -> CompiledPolicy {
        CompiledPolicy::compile(&Policy {
            name: Name::new(name).unwrap(),
            description: String::new(),
            allow,
            deny,
            revision: 0,
        })
        .unwrap()
    }

    struct Person {
        user: &'static str,
        email: &'static str,
        groups: Vec<String>,
        claims: serde_json::Value,
    }

    impl Person {
        fn new(user: &'static str, email: &'static str, groups: &[&str]) -> Self {
            Self {
                user,
                email,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                claims: serde_json::json!({"org": {"team": ["infra", "db"]}, "level": 3, "admin": true}),
            }
        }

        fn facts(&self, source: &str) -> Facts<'_> {
            Facts {
                identity: Some(Identity {
                    user: self.user,
                    email: self.email,
                    groups: &self.groups,
                    claims: &self.claims,
                }),
                source: source.parse().unwrap(),
                method: Some("GET"),
                path: Some("/app/index.html"),
                device: None,
                // Wednesday 2026-11-25 10:00 UTC (11:00 in Paris).
                now: 1_795_600_800,
            }
        }
    }

    #[test]
    fn deny_wins_and_no_allow_means_deny() {
        let admins = policy("admins", Some(Expr::Group("admins".into())), None);
        let no_admin_path = policy(
            "no-admin-path",
            Some(Expr::EmailDomain("example.com".into())),
            Some(Expr::Path(PathMatch::Prefix("/admin".into()))),
        );
        let alice = Person::new("alice", "alice@example.com", &["admins"]);
        let bob = Person::new("bob", "bob@other.org", &["staff"]);
        let both = [admins.clone(), no_admin_path.clone()];
        assert_eq!(
            decide(&both, &alice.facts("10.0.0.1")),
            Decision::Allow { policy: "admins" }
        );
        assert_eq!(
            decide(&both, &bob.facts("10.0.0.1")),
            Decision::NoAllowMatched
        );
        let mut f = alice.facts("10.0.0.1");
        f.path = Some("/admin/users");
        assert_eq!(
            decide(&both, &f),
            Decision::DeniedBy {
                policy: "no-admin-path"
            }
        );
        assert_eq!(
            decide(&[] as &[CompiledPolicy], &alice.facts("10.0.0.1")),
            Decision::NoPolicy
        );
    }

    #[test]
    fn person_criteria() {
        let alice = Person::new("alice", "Alice@Example.com", &["admins"]);
        let f = alice.facts("10.0.0.1");
        let yes = |e: Expr| decide(&[policy("p", Some(e), None)], &f).allowed();
        assert!(yes(Expr::User(Name::new("alice").unwrap())));
        assert!(!yes(Expr::User(Name::new("bob").unwrap())));
        assert!(yes(Expr::Email("alice@example.COM".into())));
        assert!(yes(Expr::EmailDomain("example.com".into())));
        assert!(
            !yes(Expr::EmailDomain("ample.com".into())),
            "a domain is not a suffix"
        );
        assert!(yes(Expr::Claim(ClaimMatch {
            path: "org.team".into(),
            value: "db".into()
        })));
        assert!(yes(Expr::Claim(ClaimMatch {
            path: "level".into(),
            value: "3".into()
        })));
        assert!(yes(Expr::Claim(ClaimMatch {
            path: "admin".into(),
            value: "true".into()
        })));
        assert!(!yes(Expr::Claim(ClaimMatch {
            path: "org.team.x".into(),
            value: "db".into()
        })));
        // Anonymous requests match no person criterion.
        let anon = Facts {
            identity: None,
            ..f
        };
        let p = [policy(
            "p",
            Some(Expr::Not(Box::new(Expr::Group("admins".into())))),
            None,
        )];
        assert!(decide(&p, &anon).allowed());
        assert!(!decide(&p, &f).allowed());
    }

    #[test]
    fn no_verified_address_matches_no_address_criterion() {
        // What the proxy passes for a session whose address the provider did not verify.
        let mallory = Person::new("dave", "", &["admins"]);
        let f = mallory.facts("10.0.0.1");
        let yes = |e: Expr| decide(&[policy("p", Some(e), None)], &f).allowed();
        assert!(!yes(Expr::EmailDomain("example.test".into())));
        assert!(!yes(Expr::Email("dave@example.test".into())));
        assert!(yes(Expr::Not(Box::new(Expr::EmailDomain(
            "example.test".into()
        )))));
        assert!(
            yes(Expr::Group("admins".into())),
            "other criteria still apply"
        );
    }

    #[test]
    fn request_criteria() {
        let alice = Person::new("alice", "alice@example.com", &[]);
        let yes = |e: Expr, source: &str| {
            decide(&[policy("p", Some(e), None)], &alice.facts(source)).allowed()
        };
        let cidr = Expr::SourceCidr("10.0.0.0/8".parse().unwrap());
        assert!(yes(cidr.clone(), "10.1.2.3"));
        assert!(yes(cidr.clone(), "::ffff:10.1.2.3"));
        assert!(!yes(cidr, "192.168.1.1"));
        assert!(yes(Expr::Method("GET".into()), "1.1.1.1"));
        assert!(!yes(Expr::Method("POST".into()), "1.1.1.1"));
        assert!(yes(
            Expr::Path(PathMatch::Prefix("/app/".into())),
            "1.1.1.1"
        ));
        assert!(!yes(Expr::Path(PathMatch::Exact("/app".into())), "1.1.1.1"));
        assert!(yes(
            Expr::Path(PathMatch::Regex(r"/app/[a-z]+\.html".into())),
            "1.1.1.1"
        ));
        assert!(
            !yes(Expr::Path(PathMatch::Regex("/app".into())), "1.1.1.1"),
            "regexes are anchored"
        );
    }

    #[test]
    fn device_criteria_match_flows_and_http_criteria_never_do() {
        let alice = Person::new("alice", "alice@example.com", &["admins"]);
        let web = alice.facts("10.0.0.1");
        let flow = Facts {
            method: None,
            path: None,
            device: Some("alice-laptop"),
            ..web
        };
        let yes = |e: Expr, f: &Facts<'_>| decide(&[policy("p", Some(e), None)], f).allowed();
        let laptop = || Expr::Device(Name::new("alice-laptop").unwrap());
        assert!(yes(laptop(), &flow));
        assert!(!yes(Expr::Device(Name::new("alice-phone").unwrap()), &flow));
        assert!(!yes(laptop(), &web), "a web request comes from no device");
        assert!(yes(Expr::Not(Box::new(laptop())), &web));
        for http in [
            Expr::Method("GET".into()),
            Expr::Path(PathMatch::Prefix("/".into())),
            Expr::Path(PathMatch::Exact("/app/index.html".into())),
            Expr::Path(PathMatch::Regex(".*".into())),
        ] {
            assert!(yes(http.clone(), &web), "{http:?} matches the web request");
            assert!(!yes(http.clone(), &flow), "{http:?} never matches a flow");
        }
        // The criteria that make sense for flows still apply to them.
        assert!(yes(
            Expr::And(vec![
                Expr::Group("admins".into()),
                Expr::SourceCidr("10.0.0.0/8".parse().unwrap()),
                laptop(),
            ]),
            &flow
        ));
        // A deny on a path cannot be dodged by a flow, but it does not block one either.
        let p = [policy(
            "p",
            Some(laptop()),
            Some(Expr::Path(PathMatch::Prefix("/admin".into()))),
        )];
        assert!(decide(&p, &flow).allowed());
    }

    fn window(days: &[Weekday], from: &str, to: &str, tz: &str) -> Expr {
        Expr::Time(TimeWindow {
            days: days.to_vec(),
            from: from.into(),
            to: to.into(),
            timezone: tz.into(),
        })
    }

    #[test]
    fn time_windows_in_their_time_zone() {
        let alice = Person::new("alice", "alice@example.com", &[]);
        let at = |now: i64, e: Expr| {
            let mut f = alice.facts("1.1.1.1");
            f.now = now;
            decide(&[policy("p", Some(e), None)], &f).allowed()
        };
        let wed_10_utc = 1_795_600_800;
        use Weekday::*;
        let office = || window(&[Mon, Tue, Wed, Thu, Fri], "09:00", "17:00", "Europe/Paris");
        assert!(at(wed_10_utc, office()), "11:00 in Paris on a Wednesday");
        assert!(!at(wed_10_utc + 7 * 3600, office()), "18:00 in Paris");
        assert!(!at(wed_10_utc + 3 * 86400, office()), "Saturday");
        assert!(
            !at(
                wed_10_utc,
                window(&[], "09:00", "17:00", "America/New_York")
            ),
            "05:00 in New York"
        );
        // Past midnight: Friday 22:00 to 06:00 covers Saturday 02:00 but not Friday 02:00.
        let night = || window(&[Fri], "22:00", "06:00", "UTC");
        let fri_02 = wed_10_utc + 2 * 86400 - 8 * 3600;
        assert!(!at(fri_02, night()));
        assert!(at(fri_02 + 86400, night()));
        assert!(at(fri_02 + 20 * 3600, night()), "Friday 22:00");
        assert!(at(wed_10_utc, window(&[], "00:00", "24:00", "UTC")));
    }

    #[test]
    fn bad_windows_are_refused_with_the_field() {
        let bad = |e: Expr| e.validate().unwrap_err().field;
        assert_eq!(bad(window(&[], "9:00", "17:00", "UTC")), "time.from");
        assert_eq!(bad(window(&[], "09:00", "24:01", "UTC")), "time.to");
        assert_eq!(bad(window(&[], "24:00", "06:00", "UTC")), "time.from");
        assert_eq!(bad(window(&[], "09:00", "09:00", "UTC")), "time.to");
        assert_eq!(
            bad(window(&[], "09:00", "17:00", "Mars/Olympus")),
            "time.timezone"
        );
    }
}
