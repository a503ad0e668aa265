//! The stored sign-in: `token.json` in the configuration directory.
//!
//! The directory is `$WARREN_CONFIG_DIR`, else `$XDG_CONFIG_HOME/warren`, else
//! `~/.config/warren`; it is made (or tightened to) mode 0700, and the file is only ever
//! written as a fresh mode-0600 file that is then renamed over the old one, so no other user
//! can read it at any moment and a crash leaves the old file or the new one, never half of one.
//!
//! Tokens are [`Secret`]s: their `Debug` shows `<redacted>` and they have no `Display`.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The file name of the stored sign-in inside the configuration directory.
pub const TOKEN_FILE: &str = "token.json";

/// A token or other credential; `Debug` never shows it and there is no `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The credential itself: only for sending it where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What `warren login` stores: who signed in where, and the tokens the provider issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    /// The provider's issuer URL, exactly as its discovery document names it.
    pub issuer: String,
    /// The OAuth client id the tokens were issued to.
    pub client_id: String,
    /// The access token.
    pub access_token: Secret,
    /// The refresh token, if the provider issued one (scope `offline_access`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// The ID token (a JWT), verified when it was received.
    pub id_token: Secret,
    /// When the access token expires.
    #[serde(with = "rfc3339")]
    pub expires_at: jiff::Timestamp,
    /// The signed-in person's e-mail address, if the provider gave one.
    #[serde(default)]
    pub email: Option<String>,
}

mod rfc3339 {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &jiff::Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<jiff::Timestamp, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The configuration directory: `$WARREN_CONFIG_DIR`, else `$XDG_CONFIG_HOME/warren`, else
/// `$HOME/.config/warren`.
pub fn config_dir() -> anyhow::Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("WARREN_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    if let Some(xdg) = var("XDG_CONFIG_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Ok(xdg.join("warren"));
        }
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".config").join("warren")),
        None => anyhow::bail!(
            "cannot tell where to keep the sign-in: set WARREN_CONFIG_DIR (or HOME) to a directory"
        ),
    }
}

/// The path of `token.json`.
pub fn token_path() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join(TOKEN_FILE))
}

/// Writes `token` to `path` (mode 0600, atomically), making its directory (mode 0700) if
/// needed.
pub fn save(path: &Path, token: &StoredToken) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(token).context("encoding the sign-in")?;
    write_private(path, &json)
}

/// Writes `bytes` and a newline to `path` as a fresh mode-0600 file renamed over the old one,
/// making its directory (mode 0700) if needed: no other user can read it at any moment, and
/// a crash leaves the old file or the new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    private_dir(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(TOKEN_FILE);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A stale file of ours from a crash: it may have any mode, so never reuse it.
    let _ = fs::remove_file(&tmp);
    let written = (|| -> std::io::Result<()> {
        // create_new: never follow a link someone planted, never reuse an existing file's mode.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// Makes `dir` (and missing parents) with mode 0700, or tightens an existing `dir` to 0700.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| {
            format!(
                "creating {}: set WARREN_CONFIG_DIR to a directory you can write",
                dir.display()
            )
        })?;
    let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| {
            format!(
                "{} is open to other users and cannot be made private (chmod 700)",
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// Reads the stored sign-in; `None` if there is none.
pub fn load(path: &Path) -> anyhow::Result<Option<StoredToken>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Ok(meta) = fs::metadata(path) {
        if meta.mode() & 0o077 != 0 {
            eprintln!(
                "warren: warning: {} can be read by other users (mode {:o}); run `chmod 600 {}`",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            );
        }
    }
    // serde_json's messages name positions and types, never the values.
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "{} is damaged ({e}): run `warren logout`, then `warren login` again",
            path.display()
        )
    })
}

/// Deletes the stored sign-in; false if there was none.
pub fn remove(path: &Path) -> anyhow::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("deleting {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredToken {
        StoredToken {
            issuer: "https://idp.example".into(),
            client_id: "cli".into(),
            access_token: Secret::new("at-secret"),
            refresh_token: Some(Secret::new("rt-secret")),
            id_token: Secret::new("idt-secret"),
            expires_at: jiff::Timestamp::from_second(1_700_000_000).unwrap(),
            email: Some("a@example.test".into()),
        }
    }

    #[test]
    fn debug_redacts_tokens() {
        let s = format!("{:?}", sample());
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("a@example.test"), "{s}");
    }

    #[test]
    fn save_is_private_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cfg");
        let path = dir.join(TOKEN_FILE);
        save(&path, &sample()).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"expires_at\": \"2023-11-14T22:13:20Z\""),
            "{text}"
        );
        assert_eq!(load(&path).unwrap(), Some(sample()));
        // Overwriting keeps the mode even if someone loosened the old file.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        save(&path, &sample()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temp file left");
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
        assert_eq!(load(&path).unwrap(), None);
    }
}
