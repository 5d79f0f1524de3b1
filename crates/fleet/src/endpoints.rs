//! Where etcd is: `http://10.0.0.1:2379,http://10.0.0.2:2379`.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// One or more etcd client URLs, checked before any connection is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints(Vec<String>);

impl Endpoints {
    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl FromStr for Endpoints {
    type Err = Error;

    /// Comma-separated `http://HOST:PORT` URLs. `https://` is refused until mutual TLS to
    /// etcd is built, rather than silently talking plain text to a TLS port.
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
            if part.starts_with("https://") {
                return Err(bad(
                    part,
                    "TLS to etcd is not supported yet (use an http:// endpoint on a trusted network)",
                ));
            }
            let Some(rest) = part.strip_prefix("http://") else {
                return Err(bad(part, "it must start with http:// (http://HOST:PORT)"));
            };
            let authority = rest.strip_suffix('/').unwrap_or(rest);
            let port = authority
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .filter(|p| *p != 0);
            if port.is_none() || authority.contains('/') {
                return Err(bad(part, "it must be http://HOST:PORT, with a port"));
            }
            urls.push(format!("http://{authority}"));
        }
        Ok(Endpoints(urls))
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
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
    }

    #[test]
    fn bad_endpoints_are_named_with_the_reason() {
        for (input, named, reason) in [
            (
                "127.0.0.1:2379",
                "127.0.0.1:2379",
                "must start with http://",
            ),
            ("http://127.0.0.1", "http://127.0.0.1", "with a port"),
            ("http://:2379", "http://:2379", "with a port"),
            ("http://a:2379/v3", "http://a:2379/v3", "with a port"),
            (
                "https://a:2379",
                "https://a:2379",
                "TLS to etcd is not supported yet",
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
