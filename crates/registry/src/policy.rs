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
//! Which names an image has: every local tag of its digest, and, while it is
//! being pulled, the name it will be tagged as. Each name is normalised
//! first ([`crate::name`]: `host:443/x` is `host/x`, `index.docker.io` is
//! `docker.io`, tags and digests dropped) and so is every rule's pattern when
//! the file is loaded; a pattern that could never match a normalised name (a
//! tag in it, upper case, `..`) is refused, naming its line.
//!
//! An image may run when each of its names passes: every rule whose `images`
//! matches the name is satisfied by a valid signature from one of that rule's
//! keys *made for that name*. A signature is valid when it verifies under the
//! key and its payload names the image's manifest digest; it is made for a
//! name when its `docker-reference`, normalised, is the same repository
//! (registry host and path; a tag or digest in it does not matter). So a
//! signature for `registry.example.com/apps/a` never admits the same bytes
//! as `registry.example.com/apps/b`. A name no rule covers passes if
//! `unsigned = "allow"` (the default), or, if `unsigned = "deny"`, when a
//! listed key signed the image for that name. Without the file, every image
//! may run.
//!
//! Local images (built or imported here, named without a registry, such as
//! `hello-web:1`) follow the same rule with their local name: a signature
//! made here by `juice sign hello-web:1` is for `hello-web` and counts for
//! that name only, never for a registry name, and a signature for a registry
//! name never counts for a local one. To publish, sign for the name hosts
//! will pull (`juice sign hello-web:1 --key ci.key --identity
//! registry.example.com/apps/hello-web`).
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use juice_image::digest::Digest;
use juice_image::manifest::{error_at_key, parse_toml};
use juice_image::store::{ImageRecord, Store};
use serde::Deserialize;

use crate::RegistryError;
use crate::name::{self, ImageName};
use crate::sign::{self, StoredSignature};

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

/// A loaded policy with its keys read and its patterns normalised.
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

/// An image the policy admitted, pinned by digest: what is unpacked and run is this digest,
/// never the name again (a tag can move between the check and the start).
#[derive(Debug, Clone)]
pub struct Admitted {
    pub digest: Digest,
    /// The name it was resolved by (for messages).
    pub reference: String,
    pub verdict: Verdict,
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
            let invalid = |why: String| {
                located(error_at_key(
                    text,
                    path,
                    "images",
                    i,
                    &format!("{:?} can never match an image name: {why}", rule.images),
                ))
            };
            let normalised = name::normalise_pattern(&rule.images).map_err(invalid)?;
            let pattern = glob::Pattern::new(&normalised).map_err(|e| {
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
            // `images` keys of the trust rules come first in the file's order of tables.
            let nth = |what: &str| {
                if what == "images" {
                    i + file.trust.len()
                } else {
                    i
                }
            };
            let at =
                |what: &str, msg: String| located(error_at_key(text, path, what, nth(what), &msg));
            let normalised = name::normalise_pattern(&grant.images).map_err(|why| {
                at(
                    "images",
                    format!("{:?} can never match an image name: {why}", grant.images),
                )
            })?;
            let pattern = glob::Pattern::new(&normalised).map_err(|e| {
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
        self.check_record(store, &record)
    }

    fn check_record(&self, store: &Store, record: &ImageRecord) -> Result<Verdict, RegistryError> {
        let digest = record.digest;
        let mut names = store.references_to(&digest)?;
        names.push(record.reference.clone());
        let sigs = sign::local(store.home(), &digest)?;
        let image = format!("{} ({})", record.reference, digest.short());
        self.evaluate(&image, &digest, &names, &sigs)
    }

    /// Whether the image `digest`, known by `names`, with signatures `sigs`, may run;
    /// `image` names it in the error.
    pub fn evaluate(
        &self,
        image: &str,
        digest: &Digest,
        names: &[String],
        sigs: &[StoredSignature],
    ) -> Result<Verdict, RegistryError> {
        let untrusted =
            |why: String| RegistryError::Untrusted(format!("image {image} is not trusted: {why}"));
        let mut normalised = BTreeSet::new();
        for n in names {
            normalised.insert(name::normalise(n).map_err(|e| untrusted(e.to_string()))?);
        }
        // Which of `key_names` signed `digest` for `identity`, and why the others do not count.
        let valid_by = |key_names: &[String], identity: &ImageName| -> (Vec<String>, Vec<String>) {
            let mut ok = Vec::new();
            let mut why = Vec::new();
            for s in sigs {
                for k in key_names {
                    if let Some(key) = self.keys.get(k) {
                        match s.check_for(digest, identity, key) {
                            Ok(()) => ok.push(k.clone()),
                            Err(e) => why.push(format!("{k}: {e}")),
                        }
                    }
                }
            }
            ok.sort();
            ok.dedup();
            why.dedup();
            (ok, why)
        };
        let describe = |why: &[String]| -> String {
            if sigs.is_empty() {
                "it has no signature".to_owned()
            } else {
                format!(
                    "none of its {} signature(s) verifies for it ({})",
                    sigs.len(),
                    why.join("; ")
                )
            }
        };
        let mut signed_by = Vec::new();
        for identity in &normalised {
            let shown = identity.to_string();
            let matching: Vec<&(TrustRule, glob::Pattern)> = self
                .rules
                .iter()
                .filter(|(_, p)| p.matches(&shown))
                .collect();
            if matching.is_empty() {
                match self.unsigned {
                    Unsigned::Allow => {}
                    Unsigned::Deny => {
                        let all: Vec<String> = self.keys.keys().cloned().collect();
                        let (ok, why) = valid_by(&all, identity);
                        if ok.is_empty() {
                            return Err(untrusted(format!(
                                "no rule in {} covers {shown}, unsigned images are denied, and {}",
                                self.path.display(),
                                describe(&why)
                            )));
                        }
                        signed_by.extend(ok);
                    }
                }
                continue;
            }
            for (rule, _) in matching {
                let (ok, why) = valid_by(&rule.keys, identity);
                if ok.is_empty() {
                    return Err(untrusted(format!(
                        "{} requires a signature by {} for {:?}, which covers {shown}, and {}",
                        self.path.display(),
                        rule.keys.join(" or "),
                        rule.images,
                        describe(&why)
                    )));
                }
                signed_by.extend(ok);
            }
        }
        if signed_by.is_empty() {
            return Ok(Verdict::Unsigned);
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
                    g.capabilities.contains(c)
                        && names.iter().any(|n| {
                            name::normalise(n).is_ok_and(|n| pattern.matches(&n.to_string()))
                        })
                })
            })
        })
        .cloned()
        .collect()
}

/// The capabilities an image asks for, split into those the policy lets it
/// keep and those it withholds.
fn split_capabilities(
    store: &Store,
    policy: Option<&Policy>,
    reference: &str,
    record: &ImageRecord,
) -> Result<(Vec<String>, Vec<String>), RegistryError> {
    let image = store.image(&record.digest.to_string())?;
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
    if asked.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut names = store.references_to(&record.digest)?;
    names.push(reference.to_owned());
    names.push(record.reference.clone());
    let withheld = refused_capabilities(policy, &names, &asked);
    let granted = asked
        .into_iter()
        .filter(|c| !withheld.contains(c))
        .collect();
    Ok((granted, withheld))
}

/// What a debug toolbox may do here.
#[derive(Debug)]
pub struct AdmittedToolbox {
    pub admitted: Admitted,
    /// The capabilities it asks for that it keeps.
    pub granted: Vec<String>,
    /// Those no `[[grant]]` gives it: the session runs without them.
    pub withheld: Vec<String>,
}

/// Admits a debug toolbox: its signatures must pass as any image's must, but a
/// capability no grant names is withheld rather than refusing it, so a toolbox
/// that asks for CAP_SYS_PTRACE still runs `ps` on a host that grants none.
pub fn admit_toolbox(store: &Store, reference: &str) -> Result<AdmittedToolbox, RegistryError> {
    let record = store.resolve(reference)?;
    let policy = Policy::load(store.home())?;
    let verdict = match &policy {
        Some(p) => p.check_record(store, &record)?,
        None => Verdict::NoPolicy,
    };
    let (granted, withheld) = split_capabilities(store, policy.as_ref(), reference, &record)?;
    Ok(AdmittedToolbox {
        admitted: Admitted {
            digest: record.digest,
            reference: record.reference,
            verdict,
        },
        granted,
        withheld,
    })
}

/// Refuses an image that asks for capabilities no grant gives it.
fn check_capabilities(
    store: &Store,
    policy: Option<&Policy>,
    reference: &str,
    record: &ImageRecord,
) -> Result<(), RegistryError> {
    let (_, refused) = split_capabilities(store, policy, reference, record)?;
    if refused.is_empty() {
        return Ok(());
    }
    Err(RegistryError::Untrusted(format!(
        "image {} asks for {}, which this host grants only through a [[grant]] rule in {} (none covers it)",
        record.reference,
        refused.join(", "),
        policy_path(store.home()).display()
    )))
}

/// Checks `reference` against the policy of `home`: its signatures (every
/// image may run without a policy file) and the capabilities it asks for.
pub fn enforce(store: &Store, reference: &str) -> Result<Verdict, RegistryError> {
    admit(store, reference).map(|a| a.verdict)
}

/// Resolves `reference` once and checks that digest against the policy of the store's home;
/// the caller goes on with [`Admitted::digest`], never with `reference` again.
pub fn admit(store: &Store, reference: &str) -> Result<Admitted, RegistryError> {
    let record = store.resolve(reference)?;
    let policy = Policy::load(store.home())?;
    let verdict = match &policy {
        Some(p) => p.check_record(store, &record)?,
        None => Verdict::NoPolicy,
    };
    check_capabilities(store, policy.as_ref(), reference, &record)?;
    Ok(Admitted {
        digest: record.digest,
        reference: record.reference,
        verdict,
    })
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
            (
                good.replace("apps/*", "apps/*:1"),
                "can never match an image name: rules match repositories, not tags",
            ),
            (good.replace("apps/*", "Apps/*"), "policy.toml:6"),
            (good.replace("apps/*", "apps/../*"), "policy.toml:6"),
        ] {
            let e = Policy::parse(&text, &path).err().expect(&text).to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    /// A policy with key `ci` and one rule, `images` → `ci`, under `unsigned`.
    fn policy(dir: &Path, images: &str, unsigned: &str) -> Policy {
        let public = dir.join("ci.pub");
        if !public.exists() {
            sign::keygen(&dir.join("ci")).unwrap();
        }
        let text = format!(
            "unsigned = \"{unsigned}\"\n[keys]\nci = \"{}\"\n\n[[trust]]\nimages = \"{images}\"\nkeys = [\"ci\"]\n",
            public.display()
        );
        Policy::parse(&text, &dir.join("policy.toml")).unwrap()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_signature_counts_only_for_the_repository_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path(), "reg.example/apps/*", "allow");
        let d = Digest::of(b"manifest");
        let key = dir.path().join("ci.key");
        let for_a = sign::sign(dir.path(), &d, "reg.example/apps/a:1", &key).unwrap();
        let sigs = [for_a];
        assert_eq!(
            p.evaluate("a", &d, &names(&["reg.example/apps/a:1"]), &sigs)
                .unwrap(),
            Verdict::SignedBy(vec!["ci".into()])
        );
        // The same digest, the same valid signature, another repository: refused, the rule named.
        let e = p
            .evaluate("b", &d, &names(&["reg.example/apps/b:1"]), &sigs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"reg.example/apps/*\"")
                && e.contains("it is for reg.example/apps/a, not reg.example/apps/b"),
            "{e}"
        );
        // One good name does not carry a bad one: each name the image has must pass.
        assert!(
            p.evaluate(
                "ab",
                &d,
                &names(&["reg.example/apps/a:1", "reg.example/apps/b:1"]),
                &sigs
            )
            .is_err()
        );
        // Spelled with the default port, upper case or a digest, it is still repository a.
        let a443 = "REG.example:443/apps/a@sha256:0000000000000000000000000000000000000000000000000000000000000000";
        assert!(p.evaluate("a", &d, &names(&[a443]), &sigs).is_ok());
    }

    #[test]
    fn another_spelling_of_a_name_does_not_escape_its_rule() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path(), "reg.example:443/apps/*", "allow");
        let d = Digest::of(b"manifest");
        for escape in [
            "reg.example:443/apps/x:1",
            "reg.example/apps/x:1",
            "Reg.Example:80/apps/x:1",
        ] {
            let e = p
                .evaluate("x", &d, &names(&[escape]), &[])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("reg.example:443/apps/*") && e.contains("no signature"),
                "{escape}: {e}"
            );
        }
        // Another port is another registry; a name that is not one is refused, not guessed at.
        assert_eq!(
            p.evaluate("x", &d, &names(&["reg.example:5000/apps/x:1"]), &[])
                .unwrap(),
            Verdict::Unsigned
        );
        let e = p
            .evaluate("x", &d, &names(&["reg.example/apps/../x:1"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not trusted") && e.contains(".."), "{e}");
    }

    #[test]
    fn local_images_are_signed_for_their_local_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path(), "reg.example/apps/*", "deny");
        let d = Digest::of(b"manifest");
        let key = dir.path().join("ci.key");
        let local = [sign::sign(dir.path(), &d, "hello:1", &key).unwrap()];
        assert!(
            p.evaluate("hello", &d, &names(&["hello:1"]), &local)
                .is_ok()
        );
        // A local signature is not one for a registry name, nor for another local name.
        for other in ["reg.example/apps/hello:1", "localhost/hello:1", "hello2:1"] {
            let e = p
                .evaluate("x", &d, &names(&[other]), &local)
                .unwrap_err()
                .to_string();
            assert!(e.contains("it is for hello, not"), "{other}: {e}");
        }
        // And a registry signature is not one for the local name.
        let remote = [sign::sign(dir.path(), &d, "reg.example/apps/hello:1", &key).unwrap()];
        assert!(
            p.evaluate("hello", &d, &names(&["hello:1"]), &remote)
                .is_err()
        );
    }

    #[test]
    fn a_pattern_that_can_never_match_is_refused_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        sign::keygen(&dir.path().join("ci")).unwrap();
        for (pattern, why) in [
            ("reg.example/apps/*:1", "not tags"),
            ("reg.example/apps/x@sha256:00", "digest"),
            ("reg.example/Apps/*", "lowercase"),
            ("reg.example/apps/../*", ".."),
            ("reg.example//apps", "empty path component"),
        ] {
            let text = format!(
                "[keys]\nci = \"{}\"\n\n[[trust]]\nimages = \"reg.example/ok/*\"\nkeys = [\"ci\"]\n\n[[trust]]\nimages = \"{pattern}\"\nkeys = [\"ci\"]\n",
                dir.path().join("ci.pub").display()
            );
            let e = Policy::parse(&text, &dir.path().join("policy.toml"))
                .err()
                .expect(pattern)
                .to_string();
            assert!(
                e.contains("policy.toml:9") && e.contains("can never match") && e.contains(why),
                "{pattern}: {e}"
            );
        }
    }
}
