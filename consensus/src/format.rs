//! Versions of what this node stores and sends: log entries, snapshots, Raft metadata and
//! node-to-node messages.
//!
//! Everything is bincode, which is positional: a field added to a struct, or a variant put
//! anywhere but at the end of an enum, changes what old bytes mean. So every stored value
//! and every message carries a [`Format`], and each build knows the range it reads
//! ([`Format::OLDEST`] to [`Format::CURRENT`]).
//!
//! ```text
//!  sealed value (sled): [crc32 LE of the rest][0xFF][format u16 LE][bincode]
//!  snapshot data:       [00 00 00 00 'W' 'S'][format u16 LE][lz4, size-prepended bincode]
//! ```
//!
//! - The `0xFF` after the checksum cannot begin a value sealed before formats existed (its
//!   first byte was a bincode varint or an `Option` tag), and the four zero bytes cannot
//!   begin an unversioned snapshot (they were its uncompressed size), so such data is
//!   refused by name ([`ReadError::Unversioned`]), never read as something else.
//! - A value is written in the *oldest* format that can carry it: a log entry whose
//!   commands all exist in format 1 is format 1 even on a build that speaks 2, so a node can
//!   be rolled back as long as nothing newer was written.
//! - A value newer than this build is a typed error naming both versions
//!   ([`ReadError::TooNew`]); the node stops rather than skip it or read it as something
//!   else.
//! - A leader proposes a command of a newer format only once every member has said, on the
//!   node-to-node link, that it reads it (`cluster`'s format gate).
//!
//! Adding a format: add a constant, make it [`Format::CURRENT`] (and move the test-only
//! `format-next` format one further), give [`command_format`] the commands it brings, and,
//! if an existing layout changed, a decoder for the old one in [`decode_entry`] / the
//! snapshot decoder (`Registry::decode_snapshot`) that converts to the new types. Then add `tests/fixtures/format-<n>/` (see `tests/formats.rs`): the fixtures of
//! every older format stay and must keep decoding.

use std::fmt;

use serde::{Deserialize, Serialize};

use warren_proto::policy::Expr;
use warren_proto::registry::{Kind, Policy, Resource, Route};

use crate::registry::{decode, AnyEntity, CodecError, Command};
use crate::types::{Entry, Proposal, Request};

/// A version of the stored and wire encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Format(pub u16);

impl Format {
    /// The first versioned format: the registry and commands as of the trust work (node
    /// roles in join tokens and nodes).
    pub const V1: Format = Format(1);
    /// Client devices and private resources: [`Command::RegisterDevice`],
    /// [`Command::TouchDevice`], `Route::Private`, `Kind::Device`, the `device` policy
    /// criterion, and the registry's device table and address counters (appended after
    /// format 1's fields, see `Registry::encode_snapshot`).
    pub const V2: Format = Format(2);
    /// Side fields and the cluster title: [`Command::WithSide`] (an identity provider's
    /// display name, `auto_create` and `post_logout_redirect`, a web resource's
    /// `prefix_rewrite`), [`Command::SetClusterTitle`], the refusal
    /// [`Command::RegisterJoiningNode`], `RegistryError::NotInvited`, and the registry's
    /// format-3 tail (the title and, in
    /// snapshots, the side fields).
    pub const V3: Format = Format(3);
    /// A format that exists only in builds with the `format-next` feature, to test rolling
    /// upgrades: it adds [`Command::Annotate`]. Always one past the newest real format.
    #[cfg(feature = "format-next")]
    pub const NEXT: Format = Format(4);
    /// The oldest format this build reads.
    pub const OLDEST: Format = Format::V1;
    /// The newest format this build reads and writes.
    #[cfg(not(feature = "format-next"))]
    pub const CURRENT: Format = Format::V3;
    /// The newest format this build reads and writes.
    #[cfg(feature = "format-next")]
    pub const CURRENT: Format = Format::NEXT;

    /// Whether this build reads values of this format.
    pub fn is_known(self) -> bool {
        (Format::OLDEST..=Format::CURRENT).contains(&self)
    }
}

impl Default for Format {
    /// Format 1, the first: what a value that does not say is taken to be.
    fn default() -> Self {
        Format::V1
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a stored or received value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Written by a newer build. The fault is this node's binary: it must be upgraded
    /// before it can use this data.
    #[error("{what} is format {found}, this build reads up to {known}: upgrade this node")]
    TooNew {
        /// What was read (`log entry 812`, `the stored snapshot`).
        what: String,
        /// Its format.
        found: Format,
        /// The newest this build reads.
        known: Format,
    },
    /// Older than anything this build reads (never written by a released build yet: this
    /// can only be a data directory of a development build).
    #[error("{what} is format {found}, this build reads formats {oldest} to {known}")]
    TooOld {
        /// What was read.
        what: String,
        /// Its format.
        found: Format,
        /// The oldest this build reads.
        oldest: Format,
        /// The newest this build reads.
        known: Format,
    },
    /// Written before stored formats were versioned (a development build): not read.
    #[error("{what} was written by a build older than stored-format versioning, which this build does not read: move the data directory aside and join the node to the cluster again")]
    Unversioned {
        /// What was read.
        what: String,
    },
    /// Damaged, or not what it should be (storage corruption or a bug).
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl ReadError {
    /// Whether the data is whole but of a version this build cannot read (as opposed to
    /// damaged): such data must be kept, and the node must not go on without it.
    pub fn is_version(&self) -> bool {
        !matches!(self, ReadError::Codec(_))
    }

    /// The same error about `what` (callers that know more, such as the log index).
    pub fn about(self, what: String) -> Self {
        match self {
            ReadError::TooNew { found, known, .. } => ReadError::TooNew { what, found, known },
            ReadError::TooOld {
                found,
                oldest,
                known,
                ..
            } => ReadError::TooOld {
                what,
                found,
                oldest,
                known,
            },
            ReadError::Unversioned { .. } => ReadError::Unversioned { what },
            codec @ ReadError::Codec(_) => codec,
        }
    }
}

/// Checks that `found` is a format this build reads.
pub fn check(what: &str, found: Format) -> Result<(), ReadError> {
    if found > Format::CURRENT {
        return Err(ReadError::TooNew {
            what: what.to_owned(),
            found,
            known: Format::CURRENT,
        });
    }
    if found < Format::OLDEST {
        return Err(ReadError::TooOld {
            what: what.to_owned(),
            found,
            oldest: Format::OLDEST,
            known: Format::CURRENT,
        });
    }
    Ok(())
}

/// The oldest format that can carry `command`. Every command says which format brought
/// it: a new one goes at the end of [`Command`] with the format it needs (a new
/// [`Format`], unless nothing could have written it yet). Commands of format 1 that carry
/// entities need format 2 when an entity holds a value format 2 brought (a private route, a
/// `device` criterion, the device kind).
pub fn command_format(command: &Command) -> Format {
    match command {
        Command::Create(e) | Command::Update(e) => entity_format(e),
        Command::Delete { kind, .. } => {
            if *kind == Kind::Device {
                Format::V2
            } else {
                Format::V1
            }
        }
        Command::Apply { manifest, .. } => {
            let resources = manifest.resources.iter().flatten().map(resource_format);
            let policies = manifest.policies.iter().flatten().map(policy_format);
            resources.chain(policies).max().unwrap_or(Format::V1)
        }
        Command::RegisterDevice { .. }
        | Command::TouchDevice { .. }
        | Command::SetSiteKey { .. }
        | Command::SetNodeRelay { .. } => Format::V2,
        Command::WithSide { command, .. } => command_format(command).max(Format::V3),
        Command::SetClusterTitle { .. } | Command::RegisterJoiningNode { .. } => Format::V3,
        Command::Bootstrap { .. }
        | Command::CreateApiKey(_)
        | Command::RevokeApiKey { .. }
        | Command::CreateJoinToken(_)
        | Command::RevokeJoinToken { .. }
        | Command::RegisterNode { .. }
        | Command::UpdateNode { .. }
        | Command::DeleteNode { .. }
        | Command::SignIn { .. }
        | Command::RefreshSession { .. }
        | Command::RevokeSession { .. }
        | Command::ConsumeHandoff { .. }
        | Command::EnsureProxyKeys(_)
        | Command::CreateSiteToken(_)
        | Command::ConsumeSiteToken { .. }
        | Command::AcmeLease { .. }
        | Command::AcmeAccount(_)
        | Command::AcmeChallenge { .. }
        | Command::AcmeChallengeDone { .. }
        | Command::CreateSession(_)
        | Command::CreateShareLink(_)
        | Command::RevokeShareLink { .. }
        | Command::RotateSigningKey(_)
        | Command::ReserveAttempt { .. }
        | Command::ReleaseAttempt { .. }
        | Command::ConsumeEmailCode { .. } => Format::V1,
        #[cfg(feature = "format-next")]
        Command::Annotate { .. } => Format::NEXT,
    }
}

fn entity_format(e: &AnyEntity) -> Format {
    match e {
        AnyEntity::Resource(r) => resource_format(r),
        AnyEntity::Policy(p) => policy_format(p),
        AnyEntity::User(_)
        | AnyEntity::Role(_)
        | AnyEntity::IdentityProvider(_)
        | AnyEntity::Site(_)
        | AnyEntity::Certificate(_) => Format::V1,
    }
}

fn resource_format(r: &Resource) -> Format {
    match r.route {
        Route::Private { .. } => Format::V2,
        Route::Http { .. } | Route::Tcp { .. } | Route::Udp { .. } => Format::V1,
    }
}

fn policy_format(p: &Policy) -> Format {
    fn expr(e: &Expr) -> Format {
        match e {
            Expr::And(xs) | Expr::Or(xs) => xs.iter().map(expr).max().unwrap_or(Format::V1),
            Expr::Not(x) => expr(x),
            Expr::Device(_) => Format::V2,
            Expr::User(_)
            | Expr::Email(_)
            | Expr::EmailDomain(_)
            | Expr::Group(_)
            | Expr::Claim(_)
            | Expr::SourceCidr(_)
            | Expr::Method(_)
            | Expr::Path(_)
            | Expr::Time(_) => Format::V1,
        }
    }
    p.allow
        .iter()
        .chain(&p.deny)
        .map(expr)
        .max()
        .unwrap_or(Format::V1)
}

/// The format a request needs.
pub fn request_format(request: &Request) -> Format {
    command_format(&request.command)
}

/// The format a log entry needs: the newest any of its requests needs.
pub fn entry_format(entry: &Entry) -> Format {
    match &entry.payload {
        openraft::EntryPayload::Normal(Proposal(requests)) => requests
            .iter()
            .map(request_format)
            .max()
            .unwrap_or(Format::V1),
        openraft::EntryPayload::Blank | openraft::EntryPayload::Membership(_) => Format::V1,
    }
}

/// The format a batch of entries needs.
pub fn entries_format<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Format {
    entries
        .into_iter()
        .map(entry_format)
        .max()
        .unwrap_or(Format::V1)
}

/// Decodes the body of a stored log entry of format `format` (already checked with
/// [`check`]). Every format so far shares one entry layout: each later one only appends
/// variants (commands, routes, criteria, kinds).
pub fn decode_entry(format: Format, body: &[u8]) -> Result<Entry, ReadError> {
    check("a log entry", format)?;
    Ok(decode("log entry", body)?)
}
