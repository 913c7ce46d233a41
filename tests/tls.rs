//! `rediss://` with the `tls` feature, against a `redis-server` that serves TLS only (its plain
//! port is 0) with a CA and server certificate each test makes with the `openssl` CLI. The
//! node trusts the test CA through `FanoutBuilder::tls_root_certificate`; certificate
//! verification stays on (no `#insecure`), and the tests check that it refuses what it must.

#![cfg(feature = "tls")]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use axum_fanout::{FanoutBuilder, FanoutLayer};
use support::*;

const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

/// A throwaway CA and a server certificate (P-256) it signed, valid for `san`, in a directory
/// of its own under the target's temp dir; removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str, san: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pki = Self { dir };
        let p256 = "ec_paramgen_curve:P-256";
        let ca_subject = format!("/CN=axum-fanout test CA {name}");
        #[rustfmt::skip]
        pki.openssl(&[
            "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", p256, "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &ca_subject,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        #[rustfmt::skip]
        pki.openssl(&[
            "req", "-new", "-newkey", "ec", "-pkeyopt", p256, "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=redis",
        ]);
        let extensions = format!(
            "subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        );
        std::fs::write(pki.path("server.ext"), extensions).expect("write server.ext");
        #[rustfmt::skip]
        pki.openssl(&[
            "x509", "-req", "-in", "server.csr", "-days", "2",
            "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-extfile", "server.ext", "-out", "server.pem",
        ]);
        pki
    }

    /// Runs `openssl` in the directory; panics with its stderr when it fails.
    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl on PATH (`apt-get install openssl`)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.path("ca.pem")).expect("ca.pem")
    }

    /// A `redis-server` serving TLS only, on its port, with this certificate; `redis-cli`
    /// talks TLS to it, trusting this CA, plus `cli_auth`.
    fn redis(&self, extra: &[&str], cli_auth: &[&str]) -> RedisServer {
        let (cert, key, ca) = (
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem"),
        );
        let mut args = vec!["--port", "0", "--tls-port", "{port}"];
        args.extend(["--tls-cert-file", &cert, "--tls-key-file", &key]);
        args.extend(["--tls-ca-cert-file", &ca, "--tls-auth-clients", "no"]);
        args.extend(extra);
        let mut cli = vec!["--tls", "--cacert", &ca];
        cli.extend(cli_auth);
        RedisServer::start_with_cli(&args, &cli)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn builder(url: &str) -> FanoutBuilder {
    FanoutLayer::builder(url)
        .publish_timeout(PUBLISH_TIMEOUT)
        .subscribe_timeout(Duration::from_millis(500))
        .reconnect_backoff_max(Duration::from_millis(200))
}

/// A node on `layer` becomes ready, a socket joins, and broadcasts (from the handle and from
/// the client) reach it; the server has two connections of `user` (publisher, subscriber),
/// over TLS since it has no plain-text port.
async fn round_trip(redis: &RedisServer, layer: FanoutLayer, user: &str) {
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "port"]).lines().nth(1),
        Some("0"),
        "no plain-text port"
    );
    let _server = assert_round_trip(redis, layer, "sealed").await;
    assert!(
        redis.clients_of(user) >= 2,
        "{}",
        redis.cli(&["CLIENT", "LIST"])
    );
}

#[tokio::test]
async fn a_rediss_url_trusting_the_test_ca_joins_and_delivers() {
    let pki = Pki::new("ok", "IP:127.0.0.1,DNS:localhost");
    let redis = pki.redis(&[], &[]);
    let layer = builder(&format!("rediss://127.0.0.1:{}", redis.port()))
        .tls_root_certificate(pki.ca_pem())
        .build()
        .expect("layer");
    round_trip(&redis, layer, "default").await;
}

#[tokio::test]
async fn a_rediss_url_with_an_acl_user_authenticates_over_tls() {
    let pki = Pki::new("acl", "IP:127.0.0.1");
    let redis = pki.redis(
        &[
            "--user", "alice", "on", ">secret", "~*", "&*", "+@all", //
            "--user", "default", "off",
        ],
        &["--user", "alice", "--pass", "secret"],
    );
    let layer = builder(&format!("rediss://alice:secret@127.0.0.1:{}", redis.port()))
        .tls_root_certificate(pki.ca_pem())
        .build()
        .expect("layer");
    round_trip(&redis, layer, "alice").await;
}

/// The node on `layer` is refused by its own certificate check: both connections log a
/// refusal that mentions `reason`, the node stays not ready, and a broadcast fails with
/// `is_timeout()` after the publish timeout.
async fn refused(layer: FanoutBuilder, logs: &Logs, reason: &str) {
    let handle = layer.build().expect("layer").handle();
    wait_until("both connections refused the certificate", || async {
        let text = logs.text();
        text.contains("publisher cannot connect") && text.contains("subscriber cannot connect")
    })
    .await;
    assert!(!handle.is_ready());
    let started = Instant::now();
    let err = handle
        .broadcast("sealed", "1")
        .await
        .expect_err("no connection");
    let took = started.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert!(took < PUBLISH_TIMEOUT + Duration::from_secs(1), "{took:?}");
    assert!(!handle.is_ready());
    let text = logs.text();
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cannot connect to redis"))
        .collect();
    // On a loaded machine an attempt can also time out before the TLS handshake; every other
    // refusal must name the certificate's problem, and at least one does.
    assert!(
        refusals
            .iter()
            .all(|l| l.contains(reason) || l.contains("timed out")),
        "every refusal says {reason:?}: {text}"
    );
    assert!(
        refusals.iter().any(|l| l.contains(reason)),
        "a refusal says {reason:?}: {text}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let pki = Pki::new("server", "IP:127.0.0.1");
    let other = Pki::new("other", "IP:127.0.0.1");
    let redis = pki.redis(&[], &[]);
    let layer = builder(&format!("rediss://127.0.0.1:{}", redis.port()))
        .tls_root_certificate(other.ca_pem());
    refused(layer, &logs, "UnknownIssuer").await;
}

#[tokio::test]
async fn a_server_certificate_unknown_to_the_system_store_is_refused() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let pki = Pki::new("system", "IP:127.0.0.1");
    let redis = pki.redis(&[], &[]);
    // No root certificate given: the system's trust store, which does not know the test CA.
    let layer = builder(&format!("rediss://127.0.0.1:{}", redis.port()));
    refused(layer, &logs, "cert").await;
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let pki = Pki::new("host", "DNS:redis.invalid");
    let redis = pki.redis(&[], &[]);
    let layer =
        builder(&format!("rediss://127.0.0.1:{}", redis.port())).tls_root_certificate(pki.ca_pem());
    refused(layer, &logs, "not valid for name").await;
}

#[test]
fn tls_settings_that_cannot_work_are_invalid_url_errors() {
    let pki = Pki::new("settings", "IP:127.0.0.1");
    let cases: [(FanoutBuilder, &str); 3] = [
        (
            FanoutLayer::builder("rediss://127.0.0.1:6380/#insecure"),
            "tls_root_certificate",
        ),
        (
            FanoutLayer::builder("redis://127.0.0.1:6380").tls_root_certificate(pki.ca_pem()),
            "not rediss://",
        ),
        (
            FanoutLayer::builder("rediss://127.0.0.1:6380")
                .tls_root_certificate(b"not a certificate".to_vec()),
            "no PEM certificate",
        ),
    ];
    for (builder, hint) in cases {
        let err = builder.build().expect_err("refused");
        assert!(err.is_invalid_url(), "{err:?}");
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        assert!(cause.contains(hint), "{cause:?} should say {hint:?}");
    }
    // A well-formed rediss:// URL builds without a certificate (system store) or with one.
    FanoutLayer::builder("rediss://:pw@127.0.0.1:6380")
        .build()
        .expect("rediss without a root");
    FanoutLayer::builder("rediss://127.0.0.1:6380")
        .tls_root_certificate(pki.ca_pem())
        .build()
        .expect("rediss with the test CA");
}

/// `rediss+sentinel://`: the sentinels, the master and its replica serve TLS only (their plain
/// ports are 0) with certificates of the test CA. The node asks a sentinel over TLS and reaches
/// the master it names over TLS, verifying both certificates; with another CA it reaches
/// neither.
#[tokio::test]
async fn rediss_sentinel_speaks_tls_to_the_sentinels_and_the_master() {
    let pki = Pki::new("sentinel", "IP:127.0.0.1");
    let other = Pki::new("sentinel-other", "IP:127.0.0.1");
    let options = SentinelOptions {
        auth: None,
        tls: Some(SentinelTls {
            cert: pki.path("server.pem"),
            key: pki.path("server.key"),
            ca: pki.path("ca.pem"),
        }),
    };
    let group = SentinelGroup::start_with(60_000, &options);
    let url = format!("rediss+sentinel://{}/{SENTINEL_MASTER}", group.hosts());
    let layer = builder(&url)
        .tls_root_certificate(pki.ca_pem())
        .build()
        .expect("layer");
    round_trip(&group.master, layer, "default").await;

    let logs = Logs::default();
    let _guard = logs.capture();
    refused(
        builder(&url).tls_root_certificate(other.ca_pem()),
        &logs,
        "UnknownIssuer",
    )
    .await;
}
