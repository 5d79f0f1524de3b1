//! HTTP to one registry: its auth challenge, tokens, and reads with a size limit.
//!
//! Pulls go through here rather than through `oci-client`, for two reasons:
//! the credential decisions of [`crate::auth`] (which host may receive which
//! credential, and never over plain HTTP) must be taken here, not by a
//! library that sends one credential to whatever token realm a registry
//! names; and every read must be bounded (a manifest is read whole, so a
//! registry that answers with gigabytes must be cut off at a few MiB).
//!
//! A redirect (registries send blobs to a CDN) is followed by reqwest, which
//! drops the `Authorization` header when the host, port or scheme changes.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};

use crate::RegistryError;
use crate::auth::{Credential, Credentials, realm_may_receive};

/// Token responses and error bodies are small; anything bigger is not one.
const SMALL_MAX: u64 = 1 << 20;

/// What the registry asked for on `/v2/`.
#[derive(Debug, Clone)]
enum Challenge {
    /// Nothing: anonymous access.
    None,
    Basic,
    Bearer {
        realm: Url,
        service: Option<String>,
    },
}

/// The HTTP side of a [`crate::remote::Remote`]: one client, the credentials, which hosts are HTTP.
pub(crate) struct Transport {
    http: reqwest::Client,
    insecure: Vec<String>,
    credentials: Credentials,
}

/// One registry, as the reference names it (`host[:port]`).
pub(crate) struct Session<'t> {
    t: &'t Transport,
    /// As written in the reference, for messages and the credential lookup.
    pub registry: String,
    /// Where requests go (Docker Hub's API host differs from its name).
    base: String,
    plain_http: bool,
    challenge: Option<Challenge>,
    /// `Authorization` per token scope.
    tokens: HashMap<String, Option<HeaderValue>>,
}

fn err(registry: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::Remote {
        registry: registry.to_owned(),
        reason: reason.into(),
    }
}

/// An error with its causes, which is where reqwest puts the reason (a certificate, a refusal).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    if out.contains("InvalidContentType") || out.contains("invalid HTTP version") {
        out.push_str(" (it answered in plain HTTP: name it with --insecure if that is intended)");
    }
    out
}

fn basic(c: &Credential) -> Result<HeaderValue, String> {
    let v = format!(
        "Basic {}",
        B64.encode(format!("{}:{}", c.username, c.password))
    );
    let mut h =
        HeaderValue::from_str(&v).map_err(|_| "the credential has characters HTTP cannot carry")?;
    h.set_sensitive(true);
    Ok(h)
}

/// Reads a body of at most `limit` bytes; a longer one is cut off with an error naming `what`.
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, String> {
    if let Some(len) = resp.content_length()
        && len > limit
    {
        return Err(format!(
            "{what} is {len} bytes, over the limit of {limit}; refused"
        ));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading {what}: {}", chain(&e)))?
    {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(format!(
                "{what} runs past the limit of {limit} bytes; refused"
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The start of an error body, for a message.
async fn body_excerpt(resp: reqwest::Response) -> String {
    let bytes = read_bounded(resp, SMALL_MAX, "the error")
        .await
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        .trim()
        .to_owned()
}

impl Transport {
    pub fn new(
        certs: Vec<reqwest::Certificate>,
        insecure: Vec<String>,
        credentials: Credentials,
    ) -> Result<Transport, RegistryError> {
        let http = reqwest::Client::builder()
            .tls_certs_merge(certs)
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("juice/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err("(client)", chain(&e)))?;
        Ok(Transport {
            http,
            insecure,
            credentials,
        })
    }

    pub fn is_plain_http(&self, registry: &str) -> bool {
        self.insecure.iter().any(|h| h == registry)
    }

    /// A session with `registry` (`host[:port]` as written); `api_host` is where requests go.
    pub fn session(&self, registry: &str, api_host: &str) -> Result<Session<'_>, RegistryError> {
        let plain_http = self.is_plain_http(registry);
        // Refuses up front when a credential would have to cross plain HTTP.
        self.credentials.for_registry(registry, plain_http)?;
        Ok(Session {
            t: self,
            registry: registry.to_owned(),
            base: format!("{}://{api_host}", if plain_http { "http" } else { "https" }),
            plain_http,
            challenge: None,
            tokens: HashMap::new(),
        })
    }
}

impl Session<'_> {
    fn credential(&self) -> Result<Option<&Credential>, RegistryError> {
        self.t
            .credentials
            .for_registry(&self.registry, self.plain_http)
    }

    /// `GET /v2/` once: what the registry wants.
    async fn challenge(&mut self) -> Result<Challenge, RegistryError> {
        if let Some(c) = &self.challenge {
            return Ok(c.clone());
        }
        let url = format!("{}/v2/", self.base);
        let resp = self
            .t
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| err(&self.registry, chain(&e)))?;
        let c = if resp.status() == StatusCode::UNAUTHORIZED {
            let header = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(", ");
            parse_challenge(&header).map_err(|e| err(&self.registry, e))?
        } else {
            Challenge::None
        };
        self.challenge = Some(c.clone());
        Ok(c)
    }

    /// The `Authorization` for `repository` (pull, or pull and push), if any is needed and allowed.
    pub async fn authorization(
        &mut self,
        repository: &str,
        push: bool,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        match self.challenge().await? {
            Challenge::None => Ok(None),
            Challenge::Basic => match self.credential()? {
                Some(c) => basic(c).map(Some).map_err(|e| err(&self.registry, e)),
                None => Ok(None),
            },
            Challenge::Bearer { realm, service } => {
                let scope = format!(
                    "repository:{repository}:{}",
                    if push { "pull,push" } else { "pull" }
                );
                if let Some(h) = self.tokens.get(&scope) {
                    return Ok(h.clone());
                }
                let h = self.token(&realm, service.as_deref(), &scope).await?;
                self.tokens.insert(scope, h.clone());
                Ok(h)
            }
        }
    }

    /// Asks the realm for a token, with the credential it may have (see [`crate::auth`]).
    async fn token(
        &self,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let credential =
            realm_may_receive(&self.t.credentials, &self.registry, self.plain_http, realm)?;
        let mut url = realm.clone();
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.t.http.get(url);
        if let Some(c) = credential {
            req = req.header(AUTHORIZATION, basic(c).map_err(|e| err(&self.registry, e))?);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| err(&self.registry, format!("token from {realm}: {}", chain(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(err(
                &self.registry,
                format!(
                    "the token service {} answered {status}{}: {}",
                    realm.origin().ascii_serialization(),
                    if credential.is_some() {
                        " to the credential"
                    } else {
                        " (no credential was sent to it)"
                    },
                    body_excerpt(resp).await
                ),
            ));
        }
        let body = read_bounded(resp, SMALL_MAX, "the token")
            .await
            .map_err(|e| err(&self.registry, e))?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| {
            err(
                &self.registry,
                format!("the token from {realm} is not valid: {e}"),
            )
        })?;
        let Some(token) = t.token.or(t.access_token).filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let mut h = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| err(&self.registry, "the token has characters HTTP cannot carry"))?;
        h.set_sensitive(true);
        Ok(Some(h))
    }

    /// The auth `oci-client` gets for a push: decided here, so it never picks a realm itself.
    pub async fn oci_auth(
        &mut self,
        repository: &str,
    ) -> Result<oci_client::secrets::RegistryAuth, RegistryError> {
        use oci_client::secrets::RegistryAuth;
        Ok(match self.challenge().await? {
            Challenge::None => RegistryAuth::Anonymous,
            // oci-client probes `/v2/` again and finds the same Basic challenge; the registry
            // already holds this credential, so it gains nothing by answering otherwise.
            Challenge::Basic => match self.credential()? {
                Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
                None => RegistryAuth::Anonymous,
            },
            Challenge::Bearer { .. } => match self.authorization(repository, true).await? {
                Some(h) => {
                    let token = h
                        .to_str()
                        .ok()
                        .and_then(|s| s.strip_prefix("Bearer "))
                        .unwrap_or_default()
                        .to_owned();
                    RegistryAuth::Bearer(token)
                }
                None => RegistryAuth::Anonymous,
            },
        })
    }

    /// `GET` a path of the registry's API for `repository`, with its authorization;
    /// `what` names it in errors.
    pub async fn get(
        &mut self,
        repository: &str,
        path: &str,
        accept: &[&str],
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}/v2/{repository}/{path}", self.base);
        let mut retried = false;
        loop {
            let auth = self.authorization(repository, false).await?;
            let had_token = auth.is_some();
            let mut req = self.t.http.get(&url);
            if !accept.is_empty() {
                req = req.header(ACCEPT, accept.join(", "));
            }
            if let Some(h) = auth {
                req = req.header(AUTHORIZATION, h);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| err(&self.registry, format!("{what}: {}", chain(&e))))?;
            // Tokens expire (Docker Hub's after five minutes) in the middle of a long pull:
            // a 401 to a token gets one fresh token and one more try.
            let bearer = matches!(self.challenge, Some(Challenge::Bearer { .. }));
            if resp.status() == StatusCode::UNAUTHORIZED && bearer && had_token && !retried {
                retried = true;
                self.tokens.clear();
                continue;
            }
            return Ok(resp);
        }
    }

    /// An error for a response that is not 200, with what the registry said.
    pub async fn refusal(&self, what: &str, resp: reqwest::Response) -> RegistryError {
        let status = resp.status();
        let hint = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            match self.credential() {
                Ok(Some(_)) => " (the credential was refused)".to_owned(),
                _ => format!(
                    " (no credential for {} in {}: `juice login {}`)",
                    self.registry,
                    self.t
                        .credentials
                        .path
                        .as_ref()
                        .map_or("the auth file".to_owned(), |p| p.display().to_string()),
                    self.registry
                ),
            }
        } else {
            String::new()
        };
        let body = body_excerpt(resp).await;
        err(
            &self.registry,
            format!("{what}: {status}{hint} {body}")
                .trim_end()
                .to_owned(),
        )
    }

    /// Checks the credential works: `/v2/` answers 200 with it (for `juice login`).
    pub async fn check_login(&mut self) -> Result<(), RegistryError> {
        let auth = match self.challenge().await? {
            Challenge::None => return Ok(()),
            Challenge::Basic => match self.credential()? {
                Some(c) => Some(basic(c).map_err(|e| err(&self.registry, e))?),
                None => None,
            },
            Challenge::Bearer { realm, service } => {
                // No repository: the token only proves the credential is accepted.
                let credential = realm_may_receive(
                    &self.t.credentials,
                    &self.registry,
                    self.plain_http,
                    &realm,
                )?;
                if credential.is_none() {
                    return Err(err(
                        &self.registry,
                        format!(
                            "its token service {realm} is on another host; the credential is not sent there (file one for that host too)"
                        ),
                    ));
                }
                self.token(&realm, service.as_deref(), "registry:catalog:*")
                    .await?
            }
        };
        let mut req = self.t.http.get(format!("{}/v2/", self.base));
        if let Some(h) = auth {
            req = req.header(AUTHORIZATION, h);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| err(&self.registry, chain(&e)))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.refusal("logging in", resp).await)
        }
    }
}

fn parse_challenge(header: &str) -> Result<Challenge, String> {
    let challenges = http_auth::parse_challenges(header)
        .map_err(|e| format!("its WWW-Authenticate header {header:?} is not valid: {e}"))?;
    if let Some(b) = challenges
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
    {
        let param = |name: &str| {
            b.params
                .iter()
                .find(|p| p.0.eq_ignore_ascii_case(name))
                .map(|p| p.1.to_unescaped())
        };
        let realm = param("realm").ok_or("its bearer challenge names no realm")?;
        let realm = Url::parse(&realm)
            .map_err(|e| format!("its token realm {realm:?} is not a URL: {e}"))?;
        if realm.scheme() != "https" && realm.scheme() != "http" {
            return Err(format!("its token realm {realm} is not HTTP(S)"));
        }
        return Ok(Challenge::Bearer {
            realm,
            service: param("service"),
        });
    }
    if challenges
        .iter()
        .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
    {
        return Ok(Challenge::Basic);
    }
    Err(format!(
        "it asks for authentication Juice does not speak: {header:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read() {
        assert!(matches!(
            parse_challenge(r#"Basic realm="x""#),
            Ok(Challenge::Basic)
        ));
        match parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="reg",scope="x""#,
        ) {
            Ok(Challenge::Bearer { realm, service }) => {
                assert_eq!(realm.host_str(), Some("auth.example.com"));
                assert_eq!(service.as_deref(), Some("reg"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_challenge(r#"Bearer service="x""#).is_err());
        assert!(parse_challenge(r#"Bearer realm="file:///etc/passwd""#).is_err());
        assert!(parse_challenge("Negotiate").is_err());
    }
}
