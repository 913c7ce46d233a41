//! Redis clients from the builder's plain settings: URL parsing, RESP3, TCP settings, TLS and
//! cluster clients, and the redaction of passwords from URLs for logs.

use std::borrow::Cow;
use std::fmt;

#[cfg(feature = "cluster")]
use redis::ProtocolVersion;

use super::backend::Backend;
use super::sentinel::{self, Sentinel};
use super::server::client;
#[cfg(feature = "cluster")]
use super::server::tcp_settings;
use crate::config::{Connect, Target};
use crate::error::Error;

impl Backend {
    /// Parses and checks the connection settings. Fails with [`Error::is_invalid_url`] when a
    /// URL cannot be parsed, is `rediss://` without the `tls` feature, asks for an unverified
    /// TLS connection (`#insecure`), when a cluster has no node, when a Sentinel URL names no
    /// sentinel or no master, or when the TLS root certificate is unusable. An unreachable
    /// Redis is not an error here.
    pub(crate) fn new(connect: &Connect) -> Result<Self, Error> {
        match &connect.target {
            Target::Server(url) if sentinel::is_sentinel_url(url) => {
                Sentinel::new(connect, url).map(|s| Backend::Sentinel(std::sync::Arc::new(s)))
            }
            Target::Server(url) => client(connect, url).map(Backend::Server),
            #[cfg(feature = "cluster")]
            Target::Cluster(nodes) => cluster_client(connect, nodes).map(Backend::Cluster),
        }
    }
}

/// The cluster client for `nodes`: every URL checked as for a single server (scheme, TLS
/// feature, `#insecure`), then one client speaking RESP3 (its pushes carry the messages) with
/// the same TCP settings as a single server's connections.
#[cfg(feature = "cluster")]
fn cluster_client(
    connect: &Connect,
    nodes: &[String],
) -> Result<redis::cluster::ClusterClient, Error> {
    if nodes.is_empty() {
        return Err(Error::invalid_url(
            "a Redis Cluster target needs at least one node url, e.g. redis://127.0.0.1:7000",
        ));
    }
    let mut infos = Vec::with_capacity(nodes.len());
    for url in nodes {
        infos.push(client(connect, url)?.get_connection_info().clone());
    }
    let builder = redis::cluster::ClusterClientBuilder::new(infos)
        .use_protocol(ProtocolVersion::RESP3)
        .tcp_settings(tcp_settings());
    #[cfg(feature = "tls")]
    let builder = match &connect.tls_root_certificate {
        Some(pem) => builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        }),
        None => builder,
    };
    builder
        .build()
        .map_err(|e| Error::invalid_url(format!("redis cluster: {e}")))
}

/// `url` with its password replaced by `***`, the user name kept (`redis://alice:***@host`),
/// for logs and `Debug`; a Sentinel URL's sentinel password too.
///
/// A well-formed URL is read with the `url` crate. One that does not parse, or whose password
/// holds an unescaped `@`, `/` or `#` (so that a parser would see part of it as the host or the
/// path), is cut at its last `@` instead: everything before it but the user name is hidden.
pub(crate) fn redacted_url(url: &str) -> Cow<'_, str> {
    if sentinel::is_sentinel_url(url) {
        return sentinel::redacted(url).into();
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let Some(at) = rest.rfind('@') else {
        return url.into();
    };
    let userinfo = &rest[..at];
    let well_formed = !userinfo.contains(['@', '/', '#', '?']);
    if well_formed && let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_some() && parsed.set_password(Some("***")).is_ok() {
            return parsed.to_string().into();
        }
        if parsed.password().is_none() && !parsed.username().is_empty() {
            return url.into(); // a user name alone: nothing secret to hide
        }
    }
    let user = userinfo.split_once(':').map_or("", |(user, _)| user);
    format!("{scheme}://{user}:***@{}", &rest[at + 1..]).into()
}

/// Neither the URL's password nor the certificate's bytes are shown.
impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Connect");
        match &self.target {
            Target::Server(url) => d.field("url", &redacted_url(url)),
            #[cfg(feature = "cluster")]
            Target::Cluster(nodes) => d.field(
                "cluster_nodes",
                &nodes.iter().map(|n| redacted_url(n)).collect::<Vec<_>>(),
            ),
        };
        #[cfg(feature = "tls")]
        d.field(
            "tls_root_certificate_bytes",
            &self.tls_root_certificate.as_ref().map(Vec::len),
        );
        d.finish()
    }
}

/// The URL, or the cluster's node URLs, without passwords: for log lines.
pub(crate) fn redacted_target(connect: &Connect) -> String {
    match &connect.target {
        Target::Server(url) => redacted_url(url).into_owned(),
        #[cfg(feature = "cluster")]
        Target::Cluster(nodes) => nodes
            .iter()
            .map(|n| redacted_url(n))
            .collect::<Vec<_>>()
            .join(","),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(url: &str) -> Connect {
        Connect {
            target: Target::Server(url.to_owned()),
            #[cfg(feature = "tls")]
            tls_root_certificate: None,
        }
    }

    #[test]
    fn passwords_are_redacted_and_user_names_kept() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
            ("redis://alice:pw@h:1", "redis://alice:***@h:1"),
            ("rediss://alice:p@s/s#w@h:1", "rediss://alice:***@h:1"),
            ("redis://alice@h", "redis://alice@h"),
            ("redis://alice:p%40ss@h:1", "redis://alice:***@h:1"),
            ("not a url @ all", "not a url @ all"),
        ] {
            assert_eq!(redacted_url(url), shown, "{url}");
        }
        let debug = format!("{:?}", connect("redis://alice:hunter2@127.0.0.1:1"));
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("alice"), "{debug}");
    }

    #[test]
    #[cfg(not(feature = "tls"))]
    fn rediss_without_the_tls_feature_says_to_enable_it() {
        for url in ["rediss://127.0.0.1:6380", "REDISS://:pw@h:1", "valkeys://h"] {
            let err = Backend::new(&connect(url)).expect_err("no tls");
            assert!(err.is_invalid_url());
            let cause = std::error::Error::source(&err).expect("cause").to_string();
            assert!(cause.contains("`tls` feature"), "{cause}");
            assert!(cause.contains(r#"features = ["tls"]"#), "{cause}");
        }
    }

    #[test]
    fn invalid_url_is_reported_with_a_hint() {
        let err = Backend::new(&connect("http//nope")).expect_err("invalid");
        assert!(err.is_invalid_url());
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        assert!(cause.contains("redis://127.0.0.1:6379"), "{cause}");
    }
}
