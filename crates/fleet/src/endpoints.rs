//! Where etcd is: `http://10.0.0.1:2379,http://10.0.0.2:2379`, or with mutual TLS
//! `https://10.0.0.1:2379,...` and the client's certificate ([`FleetTls`]).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::Error;
use crate::tls::FleetTls;

/// One or more etcd client URLs, all `http://` or all `https://`, checked before any
/// connection is tried; `https://` ones carry the TLS files to use ([`Endpoints::with_tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    urls: Vec<String>,
    tls: Option<Arc<FleetTls>>,
}

impl Endpoints {
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Whether these are `https://` endpoints (mutual TLS).
    pub fn secure(&self) -> bool {
        self.urls.iter().all(|u| u.starts_with("https://"))
    }

    /// For `https://` endpoints, the TLS files in `dir` (`ca.pem`, `cert.pem`, `key.pem`),
    /// read and checked now: a missing one is an error naming it. `http://` endpoints
    /// ignore `dir` (a lab's etcd without TLS).
    pub fn with_tls(mut self, dir: &Path) -> Result<Endpoints, Error> {
        if self.secure() {
            self.tls = Some(Arc::new(FleetTls::load(dir)?));
        }
        Ok(self)
    }

    /// The TLS files attached by [`Endpoints::with_tls`].
    pub fn tls(&self) -> Option<&FleetTls> {
        self.tls.as_deref()
    }

    /// etcd's user for this client (its certificate's common name), for error messages.
    pub fn user(&self) -> String {
        match &self.tls {
            Some(t) => format!("{:?}", t.user()),
            None => "a client without a certificate".to_owned(),
        }
    }
}

impl FromStr for Endpoints {
    type Err = Error;

    /// Comma-separated `http://HOST:PORT` or `https://HOST:PORT` URLs, not both kinds
    /// (a client would then talk plain text to some members).
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |endpoint: &str, reason: &str| Error::Endpoint {
            endpoint: endpoint.to_owned(),
            reason: reason.to_owned(),
        };
        let mut urls = Vec::new();
        for part in s.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad(s, "an endpoint in the list is empty"));
            }
            let (scheme, rest) = match (part.strip_prefix("http://"), part.strip_prefix("https://"))
            {
                (Some(rest), _) => ("http", rest),
                (_, Some(rest)) => ("https", rest),
                _ => {
                    return Err(bad(
                        part,
                        "it must start with http:// or https:// (http://HOST:PORT)",
                    ));
                }
            };
            let authority = rest.strip_suffix('/').unwrap_or(rest);
            let port = authority
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .filter(|p| *p != 0);
            if port.is_none() || authority.contains('/') {
                return Err(bad(
                    part,
                    &format!("it must be {scheme}://HOST:PORT, with a port"),
                ));
            }
            let url = format!("{scheme}://{authority}");
            if let Some(first) = urls
                .first()
                .filter(|f: &&String| f.starts_with("https://") != url.starts_with("https://"))
            {
                return Err(bad(
                    s,
                    &format!(
                        "{first} and {url} mix http:// and https:// (all must use TLS, or none)"
                    ),
                ));
            }
            urls.push(url);
        }
        Ok(Endpoints { urls, tls: None })
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.urls.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_http_urls_is_kept_in_order() {
        let e: Endpoints = "http://10.0.0.1:2379, http://etcd-2:2379/".parse().unwrap();
        assert_eq!(e.urls(), ["http://10.0.0.1:2379", "http://etcd-2:2379"]);
        assert_eq!(e.to_string(), "http://10.0.0.1:2379,http://etcd-2:2379");
        assert!(!e.secure());
        let e: Endpoints = "https://10.0.0.1:2379,https://etcd-2:2379".parse().unwrap();
        assert!(e.secure());
        assert_eq!(e.urls(), ["https://10.0.0.1:2379", "https://etcd-2:2379"]);
    }

    #[test]
    fn https_needs_every_tls_file_and_http_needs_none() {
        let dir = tempfile::tempdir().unwrap();
        let plain: Endpoints = "http://a:2379".parse().unwrap();
        let plain = plain.with_tls(dir.path()).unwrap();
        assert!(plain.tls().is_none());
        assert_eq!(plain.user(), "a client without a certificate");
        let secure: Endpoints = "https://a:2379".parse().unwrap();
        let e = secure.clone().with_tls(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "fleet TLS: {}/ca.pem: missing (https:// endpoints need the fleet's CA, this client's certificate and its key: `juice certs fleet` makes them)",
                dir.path().display()
            )
        );
        let ca = dir.path().join("ca");
        crate::certs::init(&ca).unwrap();
        let secure = secure.with_tls(&ca.join(crate::certs::OPERATOR)).unwrap();
        assert_eq!(secure.user(), "\"root\"");
    }

    #[test]
    fn bad_endpoints_are_named_with_the_reason() {
        for (input, named, reason) in [
            (
                "127.0.0.1:2379",
                "127.0.0.1:2379",
                "must start with http:// or https://",
            ),
            ("http://127.0.0.1", "http://127.0.0.1", "with a port"),
            ("http://:2379", "http://:2379", "with a port"),
            ("http://a:2379/v3", "http://a:2379/v3", "with a port"),
            ("https://a", "https://a", "it must be https://HOST:PORT"),
            (
                "http://a:2379,https://b:2379",
                "http://a:2379,https://b:2379",
                "http://a:2379 and https://b:2379 mix http:// and https://",
            ),
            (
                "https://a:2379, http://b:2379",
                "https://a:2379, http://b:2379",
                "https://a:2379 and http://b:2379 mix",
            ),
            (
                "http://a:2379,,http://b:2379",
                "http://a:2379,,http://b:2379",
                "empty",
            ),
            ("", "", "empty"),
        ] {
            let e = input.parse::<Endpoints>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{named}`")) && e.contains(reason),
                "{input}: {e}"
            );
        }
    }
}
