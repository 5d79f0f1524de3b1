//! Registry references: `host[:port]/repository[:tag|@digest]`, the registry always named.

use oci_client::Reference;

use crate::RegistryError;

/// Whether `s` names a registry image rather than a local one: its first
/// component has a `.` or a `:` or is `localhost`, and a repository follows.
pub fn looks_remote(s: &str) -> bool {
    match s.split_once('/') {
        Some((first, rest)) => {
            !rest.is_empty() && (first.contains('.') || first.contains(':') || first == "localhost")
        }
        None => false,
    }
}

/// Parses a registry reference; a bare name (which other tools would send to
/// Docker Hub) is refused, so nothing leaves the host by accident.
pub fn parse(s: &str) -> Result<Reference, RegistryError> {
    if !looks_remote(s) {
        return Err(RegistryError::BadReference(s.to_owned()));
    }
    s.parse::<Reference>()
        .map_err(|_| RegistryError::BadReference(s.to_owned()))
}

/// The registry (host and port) of a reference, as it is matched against `--insecure`.
pub fn registry(r: &Reference) -> String {
    r.registry().to_owned()
}

/// `registry/repository` without tag or digest.
pub fn repository(r: &Reference) -> String {
    format!("{}/{}", r.registry(), r.repository())
}

/// The same repository, another tag.
pub fn with_tag(r: &Reference, tag: &str) -> Reference {
    Reference::with_tag(
        r.registry().to_owned(),
        r.repository().to_owned(),
        tag.to_owned(),
    )
}

/// The same repository, a digest.
pub fn with_digest(r: &Reference, digest: &str) -> Reference {
    Reference::with_digest(
        r.registry().to_owned(),
        r.repository().to_owned(),
        digest.to_owned(),
    )
}

/// The tag cosign stores an image's signatures under: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replace(':', "-"))
}

/// The local name a pulled image gets: the reference as written, with `:latest`
/// when it had neither tag nor digest.
pub fn local_name(r: &Reference) -> String {
    match (r.tag(), r.digest()) {
        (Some(t), _) => format!("{}:{t}", repository(r)),
        (None, Some(d)) => format!("{}@{d}", repository(r)),
        (None, None) => format!("{}:latest", repository(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_must_be_named() {
        for ok in [
            "127.0.0.1:5000/apps/hello:1",
            "localhost/x",
            "registry.example.com/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in ["hello-web:1", "library/nginx", "nginx", "", "a.b/"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let r = parse("127.0.0.1:5000/apps/hello:1").unwrap();
        assert_eq!(registry(&r), "127.0.0.1:5000");
        assert_eq!(repository(&r), "127.0.0.1:5000/apps/hello");
        assert_eq!(local_name(&r), "127.0.0.1:5000/apps/hello:1");
        assert_eq!(signature_tag("sha256:abcd"), "sha256-abcd.sig");
    }
}
