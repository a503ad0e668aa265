//! This machine as a device: its WireGuard key pair, its name, and `warren device
//! list|delete` for the user's own devices.
//!
//! The private key lives in `wg.key` in the configuration directory (standard base64, mode
//! 0600, created once with `O_EXCL` and then reused on every login from this machine, so
//! the node keeps one device per machine); it is never sent anywhere, only its public half.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::session;
use crate::token;

/// The file name of the device's private key inside the configuration directory.
pub const KEY_FILE: &str = "wg.key";

/// `warren device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// List your devices (this one is marked).
    List {
        /// Print the node's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete one of your devices: it can no longer reach anything, and its address is
    /// never given out again.
    Delete {
        /// The device's name.
        name: String,
    },
}

/// Runs `warren device list|delete`.
pub async fn run(cmd: DeviceCmd) -> anyhow::Result<()> {
    let active = session::active()?;
    match cmd {
        DeviceCmd::List { json } => {
            let devices = active.client.devices().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
                return Ok(());
            }
            let rows: Vec<Value> = devices
                .iter()
                .map(|d| {
                    let this = if d.name == active.device.name {
                        " (this device)"
                    } else {
                        ""
                    };
                    json!({
                        "name": format!("{}{this}", d.name),
                        "address": d.address.to_string(),
                        "os": d.os,
                        "created": time(d.created_at),
                        "last_seen": time(d.last_seen),
                    })
                })
                .collect();
            let rows: Vec<&Value> = rows.iter().collect();
            println!(
                "{}",
                crate::output::table(&rows, &["name", "address", "os", "created", "last_seen"])
            );
        }
        DeviceCmd::Delete { name } => {
            active.client.delete_device(&name).await?;
            println!("Deleted device {name}");
            if name == active.device.name {
                eprintln!(
                    "warren: note: that was this machine; run `warren login` to register it again"
                );
            }
        }
    }
    Ok(())
}

fn time(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .filter(|&s| s > 0)
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| "-".to_owned(), |t| t.to_string())
}

/// The path of `wg.key`.
pub fn key_path() -> anyhow::Result<PathBuf> {
    Ok(token::config_dir()?.join(KEY_FILE))
}

/// This machine's WireGuard private key from `path`, made (mode 0600) if there is none yet.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<StaticSecret> {
    if let Some(key) = load_key(path)? {
        return Ok(key);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    token::private_dir(dir)?;
    let bytes: [u8; 32] = rand::random();
    let secret = StaticSecret::from(bytes);
    let text = base64::engine::general_purpose::STANDARD.encode(secret.to_bytes());
    // create_new: two logins at once keep one key (the loser reads the winner's), and a
    // planted link or file is never written through.
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut f) => {
            f.write_all(text.as_bytes())
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_key(path)?
            .with_context(|| format!("{} vanished while it was being read", path.display())),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// The key stored at `path`, if any.
pub fn load_key(path: &Path) -> anyhow::Result<Option<StaticSecret>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.mode() & 0o077 != 0 {
            anyhow::bail!(
                "{} can be read by other users (mode {:o}): the device key may be known to \
                 them; delete the file and run `warren login` to register a new key",
                path.display(),
                meta.mode() & 0o777
            );
        }
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| {
            format!(
                "{} is not a WireGuard private key (32 bytes, base64); delete it and run \
                 `warren login` to make a new one",
                path.display()
            )
        })?;
    Ok(Some(StaticSecret::from(bytes)))
}

/// The public key of `secret`, standard base64 (44 characters), as the node expects it.
pub fn public_key_base64(secret: &StaticSecret) -> String {
    base64::engine::general_purpose::STANDARD.encode(PublicKey::from(secret).as_bytes())
}

/// The default device name: `<user>-<hostname>`, made a valid name.
pub fn default_name(user: &str, hostname: &str) -> String {
    let host = hostname.split('.').next().unwrap_or_default();
    sanitize_name(&format!("{user}-{host}"))
}

/// `raw` as a device name: lowercase ASCII letters, digits and '-', no leading, trailing or
/// doubled '-', at most 63 characters; `device` if nothing is left.
pub fn sanitize_name(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    out.truncate(warren_proto::Name::MAX_LEN);
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        "device".to_owned()
    } else {
        out
    }
}

/// This machine's host name, or `host` if it cannot be read.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// The operating system name sent with the registration.
pub fn os() -> &'static str {
    std::env::consts::OS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_valid() {
        assert_eq!(default_name("alice", "Laptop.example.com"), "alice-laptop");
        assert_eq!(
            sanitize_name("Bob_Smith--MacBook Pro"),
            "bob-smith-macbook-pro"
        );
        assert_eq!(sanitize_name("--x--"), "x");
        assert_eq!(sanitize_name("Ünï"), "n");
        assert_eq!(sanitize_name("***"), "device");
        let long = sanitize_name(&format!("{}-{}", "a".repeat(62), "b".repeat(10)));
        assert_eq!(long, "a".repeat(62));
        for s in ["alice-laptop", &long, "device", "n"] {
            assert!(warren_proto::Name::new(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn key_is_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cfg").join(KEY_FILE);
        let a = load_or_create_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let b = load_or_create_key(&path).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let public = public_key_base64(&a);
        assert_eq!(public.len(), 44);
        assert_ne!(
            public,
            base64::engine::general_purpose::STANDARD.encode(a.to_bytes())
        );

        // A key others can read is refused rather than used.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_key(&path).is_err());
        std::fs::write(&path, "garbage").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_key(&path).is_err());
    }
}
