//! Real tonic servers and clients on loopback, with certificates generated
//! per test: who gets in, who is refused, and rotation on disk.

use std::error::Error as _;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_testkit::certs::{Leaf, TestCa};
use shoal_testkit::eventually;
use shoal_tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const NAME: &str = "worker.shoal.svc";

/// A health server on loopback, TLS per `files`, reloading every 50 ms.
async fn serve(files: &ServerTlsFiles) -> SocketAddr {
    let tls = ServerTls::load(files).unwrap().reloading(Duration::from_millis(50));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = shoal_tls::accept(tls, TcpListenerStream::new(listener));
    tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming));
    addr
}

fn server_files(leaf: &Leaf, client_ca: Option<&TestCa>) -> ServerTlsFiles {
    ServerTlsFiles { cert: leaf.cert.clone(), key: leaf.key.clone(), client_ca: client_ca.map(|ca| ca.cert.clone()) }
}

fn client(ca: &TestCa, identity: Option<&Leaf>) -> ClientTls {
    let files = ClientTlsFiles {
        ca: ca.cert.clone(),
        identity: identity.map(|l| (l.cert.clone(), l.key.clone())),
        flags: "upstream-tls",
    };
    ClientTls::load(&files).unwrap()
}

/// One health check over a fresh TLS connection made by tonic's own
/// connector (the gateway's balanced path).
async fn check(tls: &ClientTls, addr: SocketAddr, name: &str) -> Result<(), tonic::Status> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}")).unwrap().connect_timeout(Duration::from_secs(2));
    let endpoint = tls.endpoint(endpoint, name).unwrap();
    let channel = endpoint.connect().await.map_err(|e| tonic::Status::from_error(Box::new(e)))?;
    HealthClient::new(channel).check(HealthCheckRequest::default()).await.map(|_| ())
}

/// The same through [`ClientTls::connector`] (the metrics pusher's path).
async fn check_with_connector(tls: &ClientTls, addr: SocketAddr) -> Result<(), tonic::Status> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector_lazy(tls.connector(NAME).unwrap());
    HealthClient::new(channel).check(HealthCheckRequest::default()).await.map(|_| ())
}

/// Every error in the chain, as text, for assertion messages.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        text.push_str(": ");
        text.push_str(&source.to_string());
        next = source.source();
    }
    text
}

/// The TLS alert the peer sent, as the transport reports it: rustls's
/// error reaches tonic only as the text of an `InvalidData` I/O error.
fn alert(status: &tonic::Status) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = status.source();
    while let Some(error) = next {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
        {
            return io.to_string().strip_prefix("received fatal alert: ").map(str::to_owned);
        }
        next = error.source();
    }
    None
}

/// The rustls error somewhere in `status`'s source chain.
fn rustls_error(status: &tonic::Status) -> Option<rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = status.source();
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found.clone());
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(found) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found.clone());
        }
        next = error.source();
    }
    None
}

#[tokio::test]
async fn the_right_client_certificate_gets_in_over_both_client_paths() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &[NAME]);
    let gateway = ca.issue("gateway", &["gateway.shoal.svc"]);
    let addr = serve(&server_files(&server, Some(&ca))).await;
    let tls = client(&ca, Some(&gateway));
    check(&tls, addr, NAME).await.unwrap();
    check_with_connector(&tls, addr).await.unwrap();
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let addr = serve(&server_files(&ca.issue("server", &[NAME]), Some(&ca))).await;
    let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await;
    let refused = match channel {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel).check(HealthCheckRequest::default()).await.is_err(),
    };
    assert!(refused, "a plaintext call went through a TLS server");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let addr = serve(&server_files(&ca.issue("server", &[NAME]), Some(&ca))).await;
    let status = check(&client(&ca, None), addr, NAME).await.unwrap_err();
    assert_eq!(alert(&status).as_deref(), Some("CertificateRequired"), "{}", chain(&status));
    // The same server without a client CA lets it in: the refusal above is
    // the client CA's doing.
    let open = serve(&server_files(&ca.issue("server2", &[NAME]), None)).await;
    check(&client(&ca, None), open, NAME).await.unwrap();
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(dir.path(), "other");
    let addr = serve(&server_files(&ca.issue("server", &[NAME]), Some(&ca))).await;
    let intruder = other.issue("intruder", &["gateway.shoal.svc"]);
    let status = check(&client(&ca, Some(&intruder)), addr, NAME).await.unwrap_err();
    assert_eq!(alert(&status).as_deref(), Some("UnknownCA"), "{}", chain(&status));
    let status = check_with_connector(&client(&ca, Some(&intruder)), addr).await.unwrap_err();
    assert_eq!(alert(&status).as_deref(), Some("UnknownCA"), "{}", chain(&status));
}

#[tokio::test]
async fn the_client_verifies_the_server_name_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(dir.path(), "other");
    let gateway = ca.issue("gateway", &["gateway.shoal.svc"]);
    let addr = serve(&server_files(&ca.issue("server", &[NAME]), Some(&ca))).await;
    // Dialled by IP, verified against the Service name: the IP is not in
    // the certificate, so only the name override lets the client in.
    let status = check(&client(&ca, Some(&gateway)), addr, "127.0.0.1").await.unwrap_err();
    assert!(matches!(rustls_error(&status), Some(rustls::Error::InvalidCertificate(_))), "{}", chain(&status));
    let status = check(&client(&other, Some(&gateway)), addr, NAME).await.unwrap_err();
    assert!(matches!(rustls_error(&status), Some(rustls::Error::InvalidCertificate(_))), "{}", chain(&status));
}

#[tokio::test]
async fn a_rotated_server_certificate_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new(dir.path(), "old");
    let new_ca = TestCa::new(dir.path(), "new");
    let server = old_ca.issue("server", &[NAME]);
    let addr = serve(&server_files(&server, None)).await;
    let trusts_new = client(&new_ca, None);
    assert!(check(&trusts_new, addr, NAME).await.is_err(), "a client trusting only the new CA got in early");
    check(&client(&old_ca, None), addr, NAME).await.unwrap();

    new_ca.issue_to(&server, &[NAME]);
    eventually(Duration::from_secs(10), "the server serves the rotated certificate", || async {
        check(&trusts_new, addr, NAME).await.ok()
    })
    .await;
    assert!(check(&client(&old_ca, None), addr, NAME).await.is_err(), "the old certificate is still served");
}

#[tokio::test]
async fn unusable_new_files_keep_the_previous_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("server", &[NAME]);
    let tls = ServerTls::load(&server_files(&server, None)).unwrap();
    std::fs::write(&server.cert, "not a certificate").unwrap();
    let error = tls.reload().unwrap_err().to_string();
    assert!(error.contains("--grpc-tls-cert"), "{error}");
    ca.issue_to(&server, &[NAME]);
    assert!(tls.reload().unwrap());
    assert!(!tls.reload().unwrap(), "unchanged files are not a change");
}

#[tokio::test]
async fn a_rotated_client_certificate_is_used_by_the_connector() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(dir.path(), "other");
    let addr = serve(&server_files(&ca.issue("server", &[NAME]), Some(&ca))).await;
    let identity = other.issue("pusher", &["pusher"]);
    let tls = client(&ca, Some(&identity));
    let changes = tls.changes();
    assert!(check_with_connector(&tls, addr).await.is_err());
    ca.issue_to(&identity, &["pusher"]);
    assert!(tls.reload().unwrap());
    assert!(changes.has_changed().unwrap());
    check_with_connector(&tls, addr).await.unwrap();
}
