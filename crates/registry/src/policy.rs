//! The trust policy: `$JUICE_HOME/policy.toml`.
//!
//! ```toml
//! unsigned = "deny"                 # images no rule covers must still be signed by a listed key
//!
//! [keys]
//! ci = "keys/ci.pub"                # ed25519 public keys; relative to this file
//!
//! [[trust]]
//! images = "registry.example.com/apps/*"   # a glob over the image's names
//! keys = ["ci"]
//! ```
//!
//! Capabilities are the host's decision, never the image's alone. An image
//! may keep the ordinary ones it declares ([`ORDINARY_CAPABILITIES`], those
//! that act only inside its own namespaces and files); any other one
//! (CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_NET_ADMIN, CAP_NET_RAW, CAP_MKNOD, ...)
//! needs a grant here, or the image is refused before anything is unpacked:
//!
//! ```toml
//! [[grant]]
//! images = "registry.example.com/net/*"
//! capabilities = ["CAP_NET_ADMIN"]
//! ```
//!
//! An image may run when every rule whose `images` matches one of its names
//! is satisfied by a valid signature from one of that rule's keys. An image no
//! rule covers runs if `unsigned = "allow"` (the default), or if
//! `unsigned = "deny"` and a listed key signed it. Without the file, every
//! image may run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use juice_image::manifest::{error_at_key, parse_toml};
use juice_image::store::Store;
use serde::Deserialize;

use crate::RegistryError;
use crate::sign;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unsigned {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    unsigned: Unsigned,
    #[serde(default)]
    keys: BTreeMap<String, PathBuf>,
    #[serde(default)]
    trust: Vec<TrustRule>,
    #[serde(default)]
    grant: Vec<GrantRule>,
}

/// Capabilities the host lets images matching `images` keep.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRule {
    pub images: String,
    pub capabilities: Vec<String>,
}

/// Capabilities an image may keep without a grant: each acts only on the
/// appliance's own files, processes and ports inside its namespaces. The rest
/// reach the kernel or the host (modules, raw I/O, ptrace, mounts, devices,
/// packet sockets, network configuration) and are granted by the host only.
pub const ORDINARY_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustRule {
    pub images: String,
    pub keys: Vec<String>,
}

/// A loaded policy with its keys read.
pub struct Policy {
    pub path: PathBuf,
    pub unsigned: Unsigned,
    keys: BTreeMap<String, VerifyingKey>,
    rules: Vec<(TrustRule, glob::Pattern)>,
    grants: Vec<(GrantRule, glob::Pattern)>,
}

/// Why an image may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No policy file.
    NoPolicy,
    /// No rule covers it and unsigned images are allowed.
    Unsigned,
    /// Signed by these keys.
    SignedBy(Vec<String>),
}

pub fn policy_path(home: &Path) -> PathBuf {
    home.join("policy.toml")
}

impl Policy {
    /// The policy of `home`, if it has one.
    pub fn load(home: &Path) -> Result<Option<Policy>, RegistryError> {
        let path = policy_path(home);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::io_err("read", &path)(e)),
        };
        Policy::parse(&text, &path).map(Some)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Policy, RegistryError> {
        let located = |e: juice_image::manifest::ManifestError| RegistryError::Policy {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let file: PolicyFile = parse_toml(text, path).map_err(located)?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let mut keys = BTreeMap::new();
        for (name, key_path) in &file.keys {
            let full = if key_path.is_absolute() {
                key_path.clone()
            } else {
                base.join(key_path)
            };
            let key = sign::load_public(&full).map_err(|e| {
                located(error_at_key(
                    text,
                    path,
                    name,
                    0,
                    &format!("key {name:?}: {e}"),
                ))
            })?;
            keys.insert(name.clone(), key);
        }
        let mut rules = Vec::new();
        for (i, rule) in file.trust.iter().enumerate() {
            let pattern = glob::Pattern::new(&rule.images).map_err(|e| {
                located(error_at_key(
                    text,
                    path,
                    "images",
                    i,
                    &format!("{:?} is not a valid pattern: {e}", rule.images),
                ))
            })?;
            if rule.keys.is_empty() {
                return Err(located(error_at_key(
                    text,
                    path,
                    "keys",
                    i + usize::from(!file.keys.is_empty()),
                    "a trust rule needs at least one key",
                )));
            }
            // The `[keys]` table is a line with the key `keys` too, before the rules.
            let nth = i + usize::from(!file.keys.is_empty());
            for k in &rule.keys {
                if !keys.contains_key(k) {
                    return Err(located(error_at_key(
                        text,
                        path,
                        "keys",
                        nth,
                        &format!("key {k:?} is not defined in [keys]"),
                    )));
                }
            }
            rules.push((rule.clone(), pattern));
        }
        let mut grants = Vec::new();
        for (i, grant) in file.grant.iter().enumerate() {
            let at = |what: &str, msg: String| located(error_at_key(text, path, what, i, &msg));
            let pattern = glob::Pattern::new(&grant.images).map_err(|e| {
                at(
                    "images",
                    format!("{:?} is not a valid pattern: {e}", grant.images),
                )
            })?;
            for c in &grant.capabilities {
                if !c.starts_with("CAP_") || c.len() < 5 {
                    return Err(at(
                        "capabilities",
                        format!("{c:?} is not a capability name like CAP_NET_ADMIN"),
                    ));
                }
            }
            grants.push((grant.clone(), pattern));
        }
        Ok(Policy {
            path: path.to_owned(),
            unsigned: file.unsigned,
            keys,
            rules,
            grants,
        })
    }

    /// Whether the image `reference` may run on this host; why not, in one sentence.
    pub fn check(&self, store: &Store, reference: &str) -> Result<Verdict, RegistryError> {
        let record = store.resolve(reference)?;
        let digest = record.digest;
        let mut names = store.references_to(&digest)?;
        names.push(reference.to_owned());
        names.push(record.reference.clone());
        let sigs = sign::local(store.home(), &digest)?;
        let valid_by = |key_names: &[String]| -> (Vec<String>, Vec<String>) {
            let mut ok = Vec::new();
            let mut why = Vec::new();
            for s in &sigs {
                for k in key_names {
                    if let Some(key) = self.keys.get(k) {
                        match s.check(&digest, key) {
                            Ok(()) => ok.push(k.clone()),
                            Err(e) => why.push(format!("{k}: {e}")),
                        }
                    }
                }
            }
            ok.sort();
            ok.dedup();
            (ok, why)
        };
        let describe = |why: &[String]| -> String {
            if sigs.is_empty() {
                "it has no signature".to_owned()
            } else {
                format!(
                    "none of its {} signature(s) verifies ({})",
                    sigs.len(),
                    why.join("; ")
                )
            }
        };
        let matching: Vec<&(TrustRule, glob::Pattern)> = self
            .rules
            .iter()
            .filter(|(_, p)| names.iter().any(|n| p.matches(n)))
            .collect();
        let image = format!("{} ({})", record.reference, digest.short());
        if matching.is_empty() {
            return match self.unsigned {
                Unsigned::Allow => Ok(Verdict::Unsigned),
                Unsigned::Deny => {
                    let all: Vec<String> = self.keys.keys().cloned().collect();
                    let (ok, why) = valid_by(&all);
                    if ok.is_empty() {
                        Err(RegistryError::Untrusted(format!(
                            "image {image} is not trusted: no rule in {} covers it, unsigned images are denied, and {}",
                            self.path.display(),
                            describe(&why)
                        )))
                    } else {
                        Ok(Verdict::SignedBy(ok))
                    }
                }
            };
        }
        let mut signed_by = Vec::new();
        for (rule, _) in matching {
            let (ok, why) = valid_by(&rule.keys);
            if ok.is_empty() {
                return Err(RegistryError::Untrusted(format!(
                    "image {image} is not trusted: {} requires a signature by {} for {:?}, and {}",
                    self.path.display(),
                    rule.keys.join(" or "),
                    rule.images,
                    describe(&why)
                )));
            }
            signed_by.extend(ok);
        }
        signed_by.sort();
        signed_by.dedup();
        Ok(Verdict::SignedBy(signed_by))
    }
}

/// The capabilities of `asked` that `names` (an image's names) may not keep
/// under `policy` (none: no grants at all).
pub fn refused_capabilities(
    policy: Option<&Policy>,
    names: &[String],
    asked: &[String],
) -> Vec<String> {
    asked
        .iter()
        .filter(|c| !ORDINARY_CAPABILITIES.contains(&c.as_str()))
        .filter(|c| {
            !policy.is_some_and(|p| {
                p.grants.iter().any(|(g, pattern)| {
                    g.capabilities.contains(c) && names.iter().any(|n| pattern.matches(n))
                })
            })
        })
        .cloned()
        .collect()
}

/// Checks `reference` against the policy of `home`: its signatures (every
/// image may run without a policy file) and the capabilities it asks for.
pub fn enforce(store: &Store, reference: &str) -> Result<Verdict, RegistryError> {
    let policy = Policy::load(store.home())?;
    let verdict = match &policy {
        Some(p) => p.check(store, reference)?,
        None => Verdict::NoPolicy,
    };
    let image = store.image(reference)?;
    let asked: Vec<String> = image
        .appliance
        .as_ref()
        .map(|a| {
            a.manifest
                .run
                .capabilities
                .iter()
                .map(|c| c.to_string())
                .collect()
        })
        .unwrap_or_default();
    let mut names = store.references_to(&image.record.digest)?;
    names.push(reference.to_owned());
    names.push(image.record.reference.clone());
    let refused = refused_capabilities(policy.as_ref(), &names, &asked);
    if !refused.is_empty() {
        let file = policy_path(store.home());
        return Err(RegistryError::Untrusted(format!(
            "image {} asks for {}, which this host grants only through a [[grant]] rule in {} (none covers it)",
            image.record.reference,
            refused.join(", "),
            file.display()
        )));
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_capabilities_need_a_grant_that_names_the_image() {
        let path = Path::new("/etc/juice/policy.toml");
        let p = Policy::parse(
            "[[grant]]\nimages = \"reg.example/net/*\"\ncapabilities = [\"CAP_NET_ADMIN\"]\n",
            path,
        )
        .unwrap();
        let names = |n: &str| vec![n.to_owned()];
        let asked = |c: &[&str]| c.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        // Ordinary ones need nothing.
        assert!(
            refused_capabilities(
                None,
                &names("a:1"),
                &asked(&["CAP_NET_BIND_SERVICE", "CAP_CHOWN"])
            )
            .is_empty()
        );
        for cap in [
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_MKNOD",
            "CAP_NET_RAW",
            "CAP_SYS_MODULE",
            "CAP_BPF",
            "CAP_DAC_READ_SEARCH",
        ] {
            assert_eq!(
                refused_capabilities(Some(&p), &names("reg.example/net/x:1"), &asked(&[cap])),
                vec![cap.to_owned()]
            );
        }
        assert!(
            refused_capabilities(
                Some(&p),
                &names("reg.example/net/x:1"),
                &asked(&["CAP_NET_ADMIN"])
            )
            .is_empty()
        );
        assert_eq!(
            refused_capabilities(
                Some(&p),
                &names("reg.example/web/x:1"),
                &asked(&["CAP_NET_ADMIN"])
            ),
            vec!["CAP_NET_ADMIN".to_owned()]
        );
    }

    #[test]
    fn mistakes_in_the_policy_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = sign::keygen(&dir.path().join("ci")).unwrap();
        let path = dir.path().join("policy.toml");
        let good = format!(
            "unsigned = \"deny\"\n[keys]\nci = \"{}\"\n\n[[trust]]\nimages = \"reg.example/apps/*\"\nkeys = [\"ci\"]\n",
            public.display()
        );
        let p = Policy::parse(&good, &path).unwrap();
        assert_eq!(p.unsigned, Unsigned::Deny);
        for (text, want) in [
            (good.replace("\"deny\"", "\"maybe\""), "policy.toml:1"),
            (
                good.replace("keys = [\"ci\"]", "keys = [\"cd\"]"),
                "policy.toml:7",
            ),
            (
                good.replace("keys = [\"ci\"]", "keys = []"),
                "at least one key",
            ),
            (good.replace("images =", "image ="), "policy.toml:6"),
            (
                good.replace(&public.display().to_string(), "/nonexistent.pub"),
                "policy.toml:3",
            ),
            (good.replace("apps/*", "apps/[*"), "not a valid pattern"),
            (
                format!("{good}\n[[grant]]\nimages = \"x\"\ncapabilities = [\"NET_ADMIN\"]\n"),
                "not a capability name",
            ),
        ] {
            let e = Policy::parse(&text, &path).err().expect(&text).to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
