//! An HTTPS upstream behind a private CA: a TLS front on loopback, with a
//! certificate for `localhost` issued by a CA made for the test, relays to
//! the demo catalog. With `upstream.ca_file` naming that CA the sidecar
//! syncs and reads through it; without, every call fails verification.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use catalog_cache::clock::Clock;
use catalog_cache::config::Config;
use catalog_cache::sync::SyncResult;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

mod support;

use support::*;

/// A private CA and a TLS front that relays every connection, after the
/// handshake, byte for byte to `backend`.
struct TlsFront {
    addr: SocketAddr,
    ca_pem: String,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    async fn start(backend: SocketAddr) -> TlsFront {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "catalog-cache test CA");
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        let server_key = KeyPair::generate().expect("a server key");
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("the server certificate");

        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![
                server_cert.der().clone(),
                CertificateDer::from(ca_cert.der().to_vec()),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .expect("a server TLS config");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS front");
        let addr = listener.local_addr().expect("TLS front addr");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    // A client that rejects the certificate ends here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            ca_pem: ca_cert.pem(),
            handshakes,
            task,
        }
    }

    /// The catalog's base URL through the front, by the certificate's name.
    fn base_url(&self) -> String {
        format!("https://localhost:{}/api/catalog", self.addr.port())
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("private-ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write the CA file");
        path
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain-HTTP sidecar (for its demo catalog), a TLS front before that
/// catalog, and the configuration of a second sidecar that uses the front.
async fn https_setup() -> (TestSidecar, TlsFront, Arc<tempfile::TempDir>, Config) {
    let plain = TestSidecar::builder().start().await;
    let front = TlsFront::start(plain.fake.addr()).await;
    let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
    let config = plain.builder_used().config(&front.base_url(), dir.path());
    (plain, front, dir, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_behind_a_private_ca_syncs_and_reads_through() {
    let (plain, front, dir, mut config) = https_setup().await;
    config.upstream.ca_file = front.write_ca(dir.path());
    let extra = catalog_cache::tls::load_ca_file(&config.upstream.ca_file)
        .expect("the CA file is accepted");
    assert_eq!(extra.len(), 1, "one CA certificate in the file");
    let ts = plain.sibling(dir, config, Clock::system()).await;
    ts.wait_for_first_sync().await;
    let synced = ts
        .sidecar
        .generations
        .current()
        .expect("a generation")
        .index
        .len();
    assert_eq!(synced, ts.upstream_entities().len());
    assert!(
        front.handshakes() > 0,
        "the sync went through the TLS front"
    );
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Unchanged);

    ts.fake
        .add_entities(vec![new_component("behind-private-ca")]);
    let path = "/entities/by-name/component/default/behind-private-ca";
    let a = ts.get(path).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.cache_status(), "catalog-cache; fwd=miss; stored");
    assert_eq!(a.json(), ts.get_upstream(path).await.json());
    assert_eq!(
        ts.status().await["upstream"]["last_error"],
        serde_json::Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_file_the_private_ca_is_not_trusted_and_nothing_is_applied() {
    let (plain, front, dir, config) = https_setup().await;
    assert!(config.upstream.ca_file.as_os_str().is_empty());
    let ts = plain.sibling(dir, config, Clock::system()).await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Failed);
    assert!(
        ts.sidecar.generations.current().is_none(),
        "nothing was applied"
    );
    assert_eq!(front.handshakes(), 0, "no handshake completed");
    let status = ts.status().await;
    let message = status["upstream"]["last_error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a last error in {status:#}"))
        .to_string();
    assert!(
        message.contains("certificate") && message.contains("UnknownIssuer"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_non_pem_ca_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let refused = |path: &Path| {
        let text = format!(
            "[upstream]\nurl = \"https://localhost:1/api/catalog\"\nca_file = {:?}\n",
            path.display().to_string()
        );
        Config::from_toml(&text)
            .expect_err("a bad CA file is refused")
            .to_string()
    };
    let missing = refused(&dir.path().join("absent.pem"));
    assert!(missing.contains("upstream.ca_file"), "{missing}");
    assert!(missing.contains("absent.pem"), "{missing}");

    let key = dir.path().join("key.pem");
    std::fs::write(&key, KeyPair::generate().expect("a key").serialize_pem())
        .expect("write a key file");
    let not_certs = refused(&key);
    assert!(not_certs.contains("upstream.ca_file"), "{not_certs}");
    assert!(not_certs.contains("no PEM CERTIFICATE"), "{not_certs}");

    // A real CA file passes the same check.
    let front = TlsFront::start(SocketAddr::from(([127, 0, 0, 1], 9))).await;
    let good = front.write_ca(dir.path());
    let text = format!(
        "[upstream]\nurl = \"{}\"\nca_file = {:?}\n",
        front.base_url(),
        good.display().to_string()
    );
    let config = Config::from_toml(&text).expect("a PEM CA file is accepted");
    assert_eq!(config.upstream.ca_file, good);
}
