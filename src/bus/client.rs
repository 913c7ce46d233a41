//! Redis clients from the builder's plain settings: URL parsing, RESP3, TCP settings, TLS and
//! cluster clients, and the redaction of passwords from URLs for logs.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use redis::{ProtocolVersion, RedisError};

use super::backend::Backend;
use super::sentinel::{self, Sentinel};
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

/// A client for the same server, speaking RESP3 (pushes arrive on the same connection as
/// command replies, so one multiplexed connection can subscribe and be watched for loss), with
/// TCP_NODELAY (a PUBLISH must not wait for Nagle's algorithm) and TCP keepalive (a peer that
/// vanished without a FIN is noticed even on an idle link).
///
/// Everything else of the client's connection info is kept: the address (with its TLS
/// parameters and root certificate for `rediss://`), the user name and password (redis-rs sends
/// `HELLO 3 AUTH` / `AUTH` with them on every connection, publisher and subscriber alike) and
/// the database.
fn resp3(client: &redis::Client) -> Result<redis::Client, redis::RedisError> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(
        info.set_redis_settings(settings)
            .set_tcp_settings(tcp_settings()),
    )
}

/// TCP_NODELAY and keepalive, for every connection to Redis (see [`resp3`]).
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5));
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
}

/// Installs rustls' `ring` provider as the process-wide default unless one is installed.
///
/// redis-rs builds its rustls configuration with the process default provider and enables
/// none itself; without one the first TLS connect would panic. An application that installs
/// its own provider (e.g. aws-lc-rs) does so before it builds the layer, and keeps it.
#[cfg(feature = "tls")]
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in the meantime: there is one either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The client for one server URL: scheme and TLS feature checked, `#insecure` refused, the
/// root certificate attached, RESP3 and our TCP settings applied.
pub(super) fn client(connect: &Connect, url: &str) -> Result<redis::Client, Error> {
    if is_tls_url(url) && !cfg!(feature = "tls") {
        return Err(Error::invalid_url(format!(
            "a rediss:// (TLS) url needs the `tls` feature of axum-fanout: \
             axum-fanout = {{ version = \"{}\", features = [\"tls\"] }}",
            env!("CARGO_PKG_VERSION")
        )));
    }
    let client = redis::Client::open(url).map_err(|e| invalid_url(&e))?;
    #[cfg(feature = "tls")]
    let client = with_tls(connect, client)?;
    #[cfg(not(feature = "tls"))]
    let _ = connect;
    resp3(&client).map_err(|e| invalid_url(&e))
}

fn invalid_url(e: &RedisError) -> Error {
    Error::invalid_url(format!("{e} (expected e.g. redis://127.0.0.1:6379)"))
}

/// `rediss://` or `valkeys://`: redis-rs connects over TLS.
fn is_tls_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
    })
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

/// For a `rediss://` client: refuses `#insecure`, makes sure rustls has a crypto provider, and
/// attaches the root certificate if one was given.
#[cfg(feature = "tls")]
fn with_tls(connect: &Connect, client: redis::Client) -> Result<redis::Client, Error> {
    let redis::ConnectionAddr::TcpTls { insecure, .. } = client.get_connection_info().addr() else {
        return match connect.tls_root_certificate {
            Some(_) => Err(Error::invalid_url(
                "tls_root_certificate is set but the url is not rediss://",
            )),
            None => Ok(client),
        };
    };
    if *insecure {
        return Err(Error::invalid_url(
            "rediss://..#insecure (no certificate verification) is not supported; trust the \
             server's CA with FanoutBuilder::tls_root_certificate instead",
        ));
    }
    ensure_crypto_provider();
    let Some(pem) = &connect.tls_root_certificate else {
        return Ok(client);
    };
    const PEM_HEADER: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(PEM_HEADER.len()).any(|w| w == PEM_HEADER) {
        return Err(Error::invalid_url(
            "tls_root_certificate holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.clone()),
    };
    redis::Client::build_with_tls(client.get_connection_info().clone(), certificates)
        .map_err(|e| Error::invalid_url(format!("tls_root_certificate: {e}")))
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
