//! The cluster secret at work: key derivation, datagram tags, the replay window, and the rpc
//! credential.
//!
//! Every secret yields three values through HKDF-SHA256, salted with the cluster name so one
//! secret shared by two clusters does not let them into each other:
//!
//! - a 32-bit key id (`info = "peergrid key id v1"`), carried by every datagram, so a member
//!   configured with several secrets knows which one signed it;
//! - the gossip key (`"peergrid gossip v1"`): datagram tags are HMAC-SHA256 under it,
//!   truncated to 128 bits, over the whole datagram before the tag;
//! - the rpc credential (`"peergrid rpc v1"`), sent as `x-peergrid-auth: <key id>.<credential>`
//!   in hex on every call and compared in constant time.
//!
//! Replays are caught by [`ReplayGuard`]: each datagram names its sender's instance (a random
//! number drawn when the member starts), a counter, and the sender's clock. A datagram is
//! accepted once, and only within the replay window of the receiver's clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{SecurityConfig, TlsConfig};
use crate::error::ConfigError;

type HmacSha256 = Hmac<Sha256>;

/// Length of a datagram tag in bytes (HMAC-SHA256 truncated to 128 bits).
pub(crate) const TAG_LEN: usize = 16;

/// One secret's derived values.
struct Key {
    id: u32,
    /// The HMAC state keyed with the gossip key, cloned per datagram.
    gossip: HmacSha256,
    /// `"<id>.<credential>"` in hex, as sent.
    rpc_credential: String,
}

/// The keys a member signs with and accepts.
pub(crate) struct Keyring {
    /// The signing key first, then the accepted ones. Empty: no secret configured.
    keys: Vec<Key>,
}

/// Why a datagram's authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// It carries no tag but one is required, or a tag this member has no secret to check.
    Missing,
    /// Its key id is not one of this member's secrets.
    UnknownKey,
    /// The tag does not match: tampered with, or signed by another secret.
    BadTag,
}

impl Keyring {
    pub(crate) fn new(cluster_name: &str, security: &SecurityConfig) -> Self {
        let keys = security
            .secret
            .iter()
            .chain(&security.accepted_secrets)
            .map(|secret| {
                let hk = hkdf::Hkdf::<Sha256>::new(Some(cluster_name.as_bytes()), secret.bytes());
                let mut id = [0u8; 4];
                let mut gossip = [0u8; 32];
                let mut rpc = [0u8; 32];
                // Output lengths far below HKDF's limit of 255 blocks: expand cannot fail.
                let _ = hk.expand(b"peergrid key id v1", &mut id);
                let _ = hk.expand(b"peergrid gossip v1", &mut gossip);
                let _ = hk.expand(b"peergrid rpc v1", &mut rpc);
                // Key id 0 means "unsigned" on the wire.
                let id = u32::from_be_bytes(id).max(1);
                Key {
                    id,
                    gossip: <HmacSha256 as Mac>::new_from_slice(&gossip)
                        .expect("HMAC takes keys of any length"),
                    rpc_credential: format!("{id:08x}.{}", hex(&rpc)),
                }
            })
            .collect();
        Keyring { keys }
    }

    /// Whether a secret is configured.
    pub(crate) fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The id of the signing key; 0 without a secret.
    pub(crate) fn signing_id(&self) -> u32 {
        self.keys.first().map_or(0, |k| k.id)
    }

    /// The tag of `data` under the signing key; `None` without a secret.
    pub(crate) fn sign(&self, data: &[u8]) -> Option<[u8; TAG_LEN]> {
        self.keys.first().map(|key| tag(key, data))
    }

    /// Checks `tag` over `data` under the key `key_id` names.
    pub(crate) fn verify(
        &self,
        key_id: u32,
        data: &[u8],
        tag_bytes: &[u8],
    ) -> Result<(), AuthError> {
        if key_id == 0 || !self.is_enabled() {
            return Err(AuthError::Missing);
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or(AuthError::UnknownKey)?;
        if bool::from(tag(key, data).ct_eq(tag_bytes)) {
            Ok(())
        } else {
            Err(AuthError::BadTag)
        }
    }

    /// The credential this member sends on its rpc calls; `None` without a secret.
    pub(crate) fn rpc_credential(&self) -> Option<&str> {
        self.keys.first().map(|k| k.rpc_credential.as_str())
    }

    /// Whether an rpc call's credential is one of this member's (always true without a secret).
    pub(crate) fn admits_rpc(&self, credential: Option<&[u8]>) -> bool {
        if !self.is_enabled() {
            return true;
        }
        let Some(credential) = credential else {
            return false;
        };
        // Every key is compared, so the time taken does not tell which one came close.
        self.keys.iter().fold(false, |ok, key| {
            ok | bool::from(key.rpc_credential.as_bytes().ct_eq(credential))
        })
    }
}

fn tag(key: &Key, data: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = key.gossip.clone();
    mac.update(data);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&full[..TAG_LEN]);
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Why a datagram was taken for a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplayError {
    /// Its timestamp is outside the replay window of this member's clock.
    OutsideWindow,
    /// This member accepted it before (or its counter fell too far behind the sender's
    /// newest to tell).
    Seen,
}

/// How many counters behind a sender's newest one are still told apart.
const WINDOW_BITS: u64 = 128;
/// Most senders tracked at once; beyond it the longest-silent one is forgotten.
const MAX_SENDERS: usize = 4096;

/// The counters recently accepted from one sender instance.
struct SenderWindow {
    /// The newest counter accepted.
    newest: u64,
    /// Bit `i` set: counter `newest - i` was accepted.
    seen: u128,
    last_heard: Instant,
}

/// Accepts each (instance, counter) at most once, within a window of the local clock.
///
/// A sender's state is kept while it keeps sending and forgotten twice the window after it
/// fell silent: by then every datagram it ever sent is older than the window and refused by its
/// timestamp alone.
pub(crate) struct ReplayGuard {
    window: Duration,
    senders: HashMap<u64, SenderWindow>,
    last_sweep: Instant,
}

impl ReplayGuard {
    pub(crate) fn new(window: Duration) -> Self {
        ReplayGuard {
            window,
            senders: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Accepts a datagram of `instance` numbered `counter`, stamped `sent_ms` (Unix ms, the
    /// sender's clock), at the local time `now_ms` (Unix ms) and `now`.
    pub(crate) fn check(
        &mut self,
        instance: u64,
        counter: u64,
        sent_ms: u64,
        now_ms: u64,
        now: Instant,
    ) -> Result<(), ReplayError> {
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        if sent_ms.abs_diff(now_ms) > window_ms {
            return Err(ReplayError::OutsideWindow);
        }
        self.sweep(now);
        let Some(sender) = self.senders.get_mut(&instance) else {
            if self.senders.len() >= MAX_SENDERS
                && let Some(oldest) = self
                    .senders
                    .iter()
                    .min_by_key(|(_, s)| s.last_heard)
                    .map(|(id, _)| *id)
            {
                self.senders.remove(&oldest);
            }
            self.senders.insert(
                instance,
                SenderWindow {
                    newest: counter,
                    seen: 1,
                    last_heard: now,
                },
            );
            return Ok(());
        };
        if counter > sender.newest {
            let shift = counter - sender.newest;
            sender.seen = if shift >= WINDOW_BITS {
                1
            } else {
                (sender.seen << shift) | 1
            };
            sender.newest = counter;
        } else {
            let behind = sender.newest - counter;
            if behind >= WINDOW_BITS || sender.seen & (1u128 << behind) != 0 {
                return Err(ReplayError::Seen);
            }
            sender.seen |= 1u128 << behind;
        }
        sender.last_heard = now;
        Ok(())
    }

    /// Forgets senders silent for twice the window, at most once per window.
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < self.window {
            return;
        }
        self.last_sweep = now;
        let keep = self.window * 2 + Duration::from_secs(1);
        self.senders
            .retain(|_, s| now.duration_since(s.last_heard) < keep);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.senders.len()
    }
}

/// The TLS settings of the rpc server and client, read from the configured PEM files.
#[derive(Clone)]
pub(crate) struct TlsMaterial {
    pub(crate) server: tonic::transport::ServerTlsConfig,
    pub(crate) client: tonic::transport::ClientTlsConfig,
}

/// Reads the PEM files of `tls` and checks that rustls takes them.
/// The TLS material `security` asks for, if any (see [`load_tls`]).
pub(crate) fn load_configured_tls(
    security: &crate::SecurityConfig,
) -> Result<Option<TlsMaterial>, ConfigError> {
    security.tls.as_ref().map(load_tls).transpose()
}

pub(crate) fn load_tls(tls: &TlsConfig) -> Result<TlsMaterial, ConfigError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
    let read = |field: &'static str, path: &std::path::Path| {
        let bytes = std::fs::read(path).map_err(|e| ConfigError::Tls {
            field,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(ConfigError::Tls {
                field,
                path: path.to_path_buf(),
                reason: "not a PEM file".to_string(),
            });
        }
        Ok(bytes)
    };
    let cert = read("security.tls.cert", &tls.cert)?;
    let key = read("security.tls.key", &tls.key)?;
    let ca = Certificate::from_pem(read("security.tls.ca", &tls.ca)?);
    let identity = Identity::from_pem(cert, key);
    let mut server = ServerTlsConfig::new().identity(identity.clone());
    if tls.mutual {
        server = server.client_ca_root(ca.clone());
    }
    let mut client = ClientTlsConfig::new().ca_certificate(ca).identity(identity);
    if let Some(name) = &tls.server_name {
        client = client.domain_name(name.clone());
    }
    // rustls parses the files here, so a bad certificate or key fails the join, not every call.
    if let Err(e) = tonic::transport::Server::builder().tls_config(server.clone()) {
        return Err(ConfigError::Tls {
            field: "security.tls.cert",
            path: tls.cert.clone(),
            reason: format!("rejected with its key: {}", source_chain(&e)),
        });
    }
    if let Err(e) =
        tonic::transport::Endpoint::from_static("https://127.0.0.1:1").tls_config(client.clone())
    {
        return Err(ConfigError::Tls {
            field: "security.tls.ca",
            path: tls.ca.clone(),
            reason: format!("rejected: {}", source_chain(&e)),
        });
    }
    Ok(TlsMaterial { server, client })
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn ring(secrets: &[&str]) -> Keyring {
        Keyring::new(
            "peergrid",
            &SecurityConfig {
                secret: secrets.first().map(Secret::new),
                accepted_secrets: secrets.iter().skip(1).map(Secret::new).collect(),
                ..SecurityConfig::default()
            },
        )
    }

    #[test]
    fn tags_verify_under_the_same_secret_only() {
        let a = ring(&["0123456789abcdef-one"]);
        let b = ring(&["0123456789abcdef-two"]);
        let tag = a.sign(b"datagram").unwrap();
        assert_eq!(a.verify(a.signing_id(), b"datagram", &tag), Ok(()));
        assert_eq!(
            a.verify(a.signing_id(), b"datagrax", &tag),
            Err(AuthError::BadTag)
        );
        assert_eq!(
            b.verify(a.signing_id(), b"datagram", &tag),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(b.verify(0, b"datagram", &tag), Err(AuthError::Missing));
        assert_eq!(
            ring(&[]).verify(a.signing_id(), b"datagram", &tag),
            Err(AuthError::Missing)
        );
        // The same secret in another cluster is another key.
        let other = Keyring::new(
            "other",
            &SecurityConfig {
                secret: Some(Secret::new("0123456789abcdef-one")),
                ..SecurityConfig::default()
            },
        );
        assert_ne!(other.signing_id(), a.signing_id());
        assert_ne!(other.rpc_credential(), a.rpc_credential());
    }

    #[test]
    fn a_rotation_accepts_both_secrets() {
        let old = ring(&["0123456789abcdef-old"]);
        let both = ring(&["0123456789abcdef-new", "0123456789abcdef-old"]);
        let tag = old.sign(b"x").unwrap();
        assert_eq!(both.verify(old.signing_id(), b"x", &tag), Ok(()));
        assert!(both.admits_rpc(old.rpc_credential().map(str::as_bytes)));
        assert!(!old.admits_rpc(both.rpc_credential().map(str::as_bytes)));
        assert!(!old.admits_rpc(None));
        assert!(ring(&[]).admits_rpc(None));
    }

    #[test]
    fn each_datagram_is_accepted_once_within_the_window() {
        let mut guard = ReplayGuard::new(Duration::from_secs(10));
        let now = Instant::now();
        let t = 1_000_000;
        assert_eq!(guard.check(7, 5, t, t, now), Ok(()));
        assert_eq!(guard.check(7, 5, t, t, now), Err(ReplayError::Seen));
        // Out of order but new: accepted once.
        assert_eq!(guard.check(7, 3, t, t, now), Ok(()));
        assert_eq!(guard.check(7, 3, t, t, now), Err(ReplayError::Seen));
        assert_eq!(guard.check(7, 200, t, t, now), Ok(()));
        // Too far behind the newest to tell: refused.
        assert_eq!(guard.check(7, 4, t, t, now), Err(ReplayError::Seen));
        assert_eq!(guard.check(7, 199, t, t, now), Ok(()));
        // Another instance has its own counters.
        assert_eq!(guard.check(8, 5, t, t, now), Ok(()));
        // Outside the window, either way.
        assert_eq!(
            guard.check(9, 1, t - 10_001, t, now),
            Err(ReplayError::OutsideWindow)
        );
        assert_eq!(
            guard.check(9, 1, t + 10_001, t, now),
            Err(ReplayError::OutsideWindow)
        );
        // Silent senders are forgotten.
        guard
            .check(10, 1, t, t, now + Duration::from_secs(30))
            .unwrap();
        assert_eq!(guard.tracked(), 1);
    }
}
