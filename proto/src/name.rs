//! Names of registry entities.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The name of a registry entity: 1 to 63 characters of lowercase ASCII letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit.
///
/// Names are the identity of an entity in the admin API and the CLI, and what other
/// entities use to refer to it.
///
/// Cloning is a reference-count increment: names are keys of persistent maps whose nodes
/// are copied on write.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(Arc<str>);

/// Why a string is not a valid [`Name`]; the caller gave a bad name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The string is empty.
    #[error("a name cannot be empty")]
    Empty,
    /// The string is longer than [`Name::MAX_LEN`] bytes.
    #[error("a name is at most {max} characters, this one has {0}", max = Name::MAX_LEN)]
    TooLong(usize),
    /// The string has a character outside `[a-z0-9._-]` or does not start with `[a-z0-9]`.
    #[error(
        "a name uses lowercase letters, digits, '-', '_' and '.', and starts with a letter or digit; {0:?} does not"
    )]
    BadCharacter(String),
}

impl Name {
    /// The longest name accepted, in bytes.
    pub const MAX_LEN: usize = 63;

    /// Checks `s` and wraps it.
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
        if !(first_ok && rest_ok) {
            return Err(NameError::BadCharacter(s));
        }
        Ok(Self(Arc::from(s)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Name {
    type Error = NameError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0.as_ref().to_owned()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_names() {
        for ok in ["a", "alice", "db-1", "hq.eu_west", "0day"] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert_eq!(Name::new("a".repeat(64)), Err(NameError::TooLong(64)));
        for bad in ["Alice", "-a", ".a", "a b", "a/b", "é", "a\n"] {
            assert!(
                matches!(Name::new(bad), Err(NameError::BadCharacter(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn deserializing_validates() {
        let err = serde_json::from_str::<Name>("\"Bad Name\"").unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
    }
}
