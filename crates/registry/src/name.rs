//! Image names as the trust policy sees them: one spelling per repository.
//!
//! Trust decisions compare names (a rule's glob against an image's names, a
//! signature's `docker-reference` against the name it is used for). Two
//! spellings of one repository must compare equal, or a name can escape a
//! rule written for the other (`registry.example.com:443/apps/x` past a rule
//! for `registry.example.com/apps/*`). So every name is normalised first:
//!
//! - The tag and the digest are dropped: rules and signatures are about
//!   repositories; the digest is checked separately, always.
//! - A name whose first component has a `.` or a `:` or is `localhost`, with
//!   a repository after it, names a registry (as [`crate::reference::looks_remote`]).
//!   Its host is lowercased; the default ports `:443` and `:80` are dropped
//!   (Juice speaks HTTPS to port 443 unless the host is `--insecure`, and then
//!   HTTP to port 80: the host's operator holds both, and merging them only
//!   widens what a rule covers). `docker.io`, `index.docker.io`,
//!   `registry-1.docker.io` and `registry.hub.docker.com` are all `docker.io`,
//!   and a one-component Docker Hub repository gets its `library/`.
//! - Anything else is a local name (an image built or imported on this host,
//!   such as `hello-web`): it has no registry and is never equal to a registry
//!   name.
//! - The repository is lowercase path components of `a-z0-9` joined by `.`,
//!   `_`, `__` or dashes, as the distribution spec says. Anything else (`..`,
//!   empty components, upper case, other characters) is refused rather than
//!   guessed at.
//!
//! Rule patterns in `policy.toml` go through the same steps
//! ([`normalise_pattern`]), and a pattern that could never match a
//! normalised name is refused when the policy is loaded.

use std::fmt;

/// A repository, normalised: `registry/path` or a local `path`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageName {
    /// `host[:port]`, lowercase, without a default port; `None` for a local image.
    pub registry: Option<String>,
    /// The repository path, without tag or digest.
    pub repository: String,
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.registry {
            Some(r) => write!(f, "{r}/{}", self.repository),
            None => f.write_str(&self.repository),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not an image name the trust policy can judge: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: String,
}

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: &[&str] = &[
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];
const GLOB_META: &[char] = &['*', '?', '[', ']', '!'];

/// Whether the first component of a name is a registry host rather than a path component.
fn is_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

/// Normalises an image name (`[host[:port]/]path[:tag][@digest]`).
pub fn normalise(name: &str) -> Result<ImageName, NameError> {
    let err = |reason: &str| NameError {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let (rest, digest) = match name.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (name, None),
    };
    if let Some(d) = digest {
        check_digest(d).map_err(|r| err(&r))?;
    }
    // A tag is a `:` after the last `/` (a `:` before it is a port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (rest, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        check_tag(t).map_err(|r| err(&r))?;
    }
    let (registry, path) = match rest.split_once('/') {
        Some((first, path)) if is_host(first) => {
            (Some(normalise_host(first).map_err(|r| err(&r))?), path)
        }
        _ => (None, rest),
    };
    check_path(path).map_err(|r| err(&r))?;
    let repository = match registry.as_deref() {
        Some(DOCKER_HUB) if !path.contains('/') => format!("library/{path}"),
        _ => path.to_owned(),
    };
    Ok(ImageName {
        registry,
        repository,
    })
}

/// `host[:port]` lowercased, without a default port, Docker Hub's aliases as `docker.io`.
pub fn normalise_host(host: &str) -> Result<String, String> {
    let lower = host.to_ascii_lowercase();
    let (name, port) = split_port(&lower)?;
    if name.is_empty() {
        return Err("the registry host is empty".into());
    }
    let bracketed = name.starts_with('[') && name.ends_with(']');
    let ok = if bracketed {
        name[1..name.len() - 1]
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
    } else {
        name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
    };
    if !ok {
        return Err(format!("{host:?} is not a host name"));
    }
    let name = if DOCKER_HUB_ALIASES.contains(&name) {
        DOCKER_HUB
    } else {
        name
    };
    Ok(match port {
        None | Some(443) | Some(80) => name.to_owned(),
        Some(p) => format!("{name}:{p}"),
    })
}

/// Splits `host:port` (`[v6]:port` too); the port must be 1-65535.
fn split_port(host: &str) -> Result<(&str, Option<u16>), String> {
    let colon = if host.starts_with('[') {
        host.find(']')
            .and_then(|i| host[i..].find(':').map(|j| i + j))
    } else {
        host.rfind(':')
    };
    match colon {
        None => Ok((host, None)),
        Some(i) => {
            let p = &host[i + 1..];
            match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => {
                    Ok((&host[..i], Some(n)))
                }
                _ => Err(format!("{p:?} is not a port")),
            }
        }
    }
}

/// Whether `host[:port]` is this machine's loopback (`localhost`, `127.0.0.0/8`, `[::1]`).
pub fn is_loopback(host: &str) -> bool {
    let lower = host.to_ascii_lowercase();
    let Ok((name, _)) = split_port(&lower) else {
        return false;
    };
    if name == "localhost" {
        return true;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// A repository path: lowercase components `[a-z0-9]+` joined by `.`, `_`, `__` or `-`+.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the repository is empty".into());
    }
    if path.len() > 255 {
        return Err("the repository is longer than 255 characters".into());
    }
    for component in path.split('/') {
        check_component(component)?;
    }
    Ok(())
}

fn check_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("it has an empty path component (`//` or a `/` at an end)".into());
    }
    if c == "." || c == ".." || c.contains("..") {
        return Err(format!("{c:?}: `.` and `..` are not path components"));
    }
    if let Some(bad) = c
        .chars()
        .find(|ch| !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(*ch)))
    {
        return Err(format!(
            "{c:?} has {bad:?}; repositories are lowercase letters, digits, `.`, `_` and `-`"
        ));
    }
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!("{c:?} must start and end with a letter or digit"));
    }
    // Between alphanumeric runs: `.`, `_`, `__` or any number of `-`, as the distribution spec.
    for sep in c
        .split(|ch: char| ch.is_ascii_alphanumeric())
        .filter(|s| !s.is_empty())
    {
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|ch| ch == '-');
        if !ok {
            return Err(format!("{c:?} has the separator {sep:?}"));
        }
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{tag:?} is not a tag"))
    }
}

fn check_digest(d: &str) -> Result<(), String> {
    let ok = match d.split_once(':') {
        Some(("sha256", hex)) => {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        Some((algo, enc)) => {
            !algo.is_empty()
                && algo
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
                && enc.len() >= 32
                && enc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "=_-".contains(c))
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{d:?} is not a digest"))
    }
}

/// Normalises a rule's glob the way names are normalised, or says why it could never match one.
pub fn normalise_pattern(pattern: &str) -> Result<String, String> {
    if pattern.is_empty() {
        return Err("the pattern is empty".into());
    }
    if pattern.contains('@') {
        return Err("rules match repositories: drop the digest".into());
    }
    let (host, path) = match pattern.split_once('/') {
        Some((first, path)) if is_host(first) || first.contains(GLOB_META) => (Some(first), path),
        _ => (None, pattern),
    };
    let host = match host {
        Some(h) if h.contains(GLOB_META) => {
            // A glob over hosts: lowercase it and drop a literal default port, as for names.
            let lower = h.to_ascii_lowercase();
            let lower = lower
                .strip_suffix(":443")
                .or_else(|| lower.strip_suffix(":80"))
                .map(str::to_owned)
                .unwrap_or(lower);
            Some(lower)
        }
        Some(h) => Some(normalise_host(h)?),
        None => None,
    };
    if path.contains(':') {
        return Err("rules match repositories, not tags: drop the `:TAG`".into());
    }
    if path.contains("..") {
        return Err("`..` never appears in a repository".into());
    }
    if path.is_empty() || path.split('/').any(str::is_empty) {
        return Err("it has an empty path component (`//` or a `/` at an end)".into());
    }
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("repositories are lowercase, so upper case never matches".into());
    }
    if let Some(bad) = path.chars().find(|c| {
        !(c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || "._-/".contains(*c)
            || GLOB_META.contains(c))
    }) {
        return Err(format!("{bad:?} never appears in a repository"));
    }
    let path = match host.as_deref() {
        Some(DOCKER_HUB) if !path.contains('/') && !path.contains(GLOB_META) => {
            format!("library/{path}")
        }
        _ => path.to_owned(),
    };
    Ok(match host {
        Some(h) => format!("{h}/{path}"),
        None => path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> String {
        normalise(s).unwrap_or_else(|e| panic!("{e}")).to_string()
    }

    #[test]
    fn spellings_of_one_repository_normalise_alike() {
        for (a, b) in [
            (
                "registry.example.com:443/apps/x:1",
                "registry.example.com/apps/x",
            ),
            (
                "Registry.Example.COM/apps/x@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "registry.example.com/apps/x",
            ),
            (
                "registry.example.com:80/apps/x",
                "registry.example.com/apps/x",
            ),
            ("127.0.0.1:5000/apps/hello:1", "127.0.0.1:5000/apps/hello"),
            ("docker.io/nginx:1", "docker.io/library/nginx"),
            ("index.docker.io/library/nginx", "docker.io/library/nginx"),
            ("registry-1.docker.io:443/team/app", "docker.io/team/app"),
            ("hello-web:0.1.0", "hello-web"),
            ("hello", "hello"),
            ("localhost/a/b__c--d", "localhost/a/b__c--d"),
            ("[::1]:5000/x", "[::1]:5000/x"),
        ] {
            assert_eq!(n(a), b, "{a}");
        }
        assert_eq!(normalise("hello:1").unwrap().registry, None);
        assert_ne!(
            normalise("hello").unwrap(),
            normalise("localhost/hello").unwrap()
        );
    }

    #[test]
    fn odd_names_are_refused() {
        for bad in [
            "reg.example/apps/../x",
            "reg.example/apps//x",
            "reg.example/apps/x/",
            "reg.example/Apps/x",
            "reg.example/apps/x y",
            "reg.example/apps/.x",
            "reg.example/apps/x.-y",
            "reg.example:99999/x",
            "reg.example:/x",
            "reg..example/x",
            "reg.example/x:",
            "reg.example/x:-1",
            "reg.example/x@sha256:abc",
            "",
            "Hello:1",
            "a+b",
        ] {
            assert!(normalise(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn patterns_normalise_like_names_and_impossible_ones_are_refused() {
        for (p, want) in [
            (
                "registry.example.com:443/apps/*",
                "registry.example.com/apps/*",
            ),
            ("REGISTRY.example.com/apps/*", "registry.example.com/apps/*"),
            ("docker.io/nginx", "docker.io/library/nginx"),
            ("index.docker.io/library/*", "docker.io/library/*"),
            ("*.example.com:443/apps/*", "*.example.com/apps/*"),
            ("*", "*"),
            ("hello-*", "hello-*"),
            ("127.0.0.1:5000/apps/*", "127.0.0.1:5000/apps/*"),
        ] {
            assert_eq!(normalise_pattern(p).as_deref(), Ok(want), "{p}");
        }
        for bad in [
            "reg.example/apps/*:1",
            "reg.example/apps/x@sha256:00",
            "reg.example/Apps/*",
            "reg.example/apps/../*",
            "reg.example//x",
            "reg.example/",
            "reg.example/apps x",
            "",
        ] {
            assert!(normalise_pattern(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn loopback_is_recognised() {
        for h in [
            "127.0.0.1:5000",
            "localhost",
            "LOCALHOST:80",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "10.0.0.1:5000",
            "registry.example.com",
            "127.0.0.1.nip.io",
            "[::2]",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    proptest! {
        /// Normalising is idempotent, and tags, digests, case of the host and default ports never matter.
        #[test]
        fn normalising_is_stable(
            host in "[a-z][a-z0-9]{0,8}(\\.[a-z][a-z0-9]{0,8}){1,2}",
            port in prop::option::of(prop_oneof![Just(443u16), Just(80u16), 1u16..65535]),
            path in "[a-z0-9]{1,6}([._-][a-z0-9]{1,6}){0,2}(/[a-z0-9]{1,6}){0,2}",
            tag in prop::option::of("[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,10}"),
        ) {
            let host_port = match port { Some(p) => format!("{host}:{p}"), None => host.clone() };
            let plain = match tag.as_deref() { Some(t) => format!("{host_port}/{path}:{t}"), None => format!("{host_port}/{path}") };
            let once = normalise(&plain).unwrap();
            let twice = normalise(&once.to_string()).unwrap();
            prop_assert_eq!(&once, &twice);
            let upper = plain.replacen(&host, &host.to_ascii_uppercase(), 1);
            prop_assert_eq!(normalise(&upper).unwrap(), once.clone());
            let bare = normalise(&format!("{host}/{path}")).unwrap();
            prop_assert_eq!(once == bare, matches!(port, None | Some(443) | Some(80)));
            // The normalised pattern of a literal name matches exactly its normalised name.
            let pattern = glob::Pattern::new(&normalise_pattern(&format!("{host_port}/{path}")).unwrap()).unwrap();
            prop_assert!(pattern.matches(&once.to_string()));
        }

        /// Nothing with `..` or an empty component gets through, whatever surrounds it.
        #[test]
        fn no_dot_dot_or_empty_component_gets_through(
            a in "[a-z0-9./]{0,8}", b in "[a-z0-9./]{0,8}", evil in prop_oneof![Just(".."), Just("//")],
        ) {
            let name = format!("reg.example/{a}{evil}{b}");
            prop_assert!(normalise(&name).is_err(), "{}", name);
        }
    }
}
