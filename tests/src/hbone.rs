//! A hand-made HBONE client for security tests: TLS 1.3 (rustls, ring) with ALPN `h2` and no SNI,
//! an optional client certificate from PEM files, then HTTP/2 `CONNECT` streams — one with
//! [`connect`], or any number of arbitrary requests on one connection with [`HboneConnection`].
//! It does not check the server's identity (these tests are about what the server accepts).

use crate::netns::Netns;
use crate::ztunnel::CertFiles;
use anyhow::{Context, Result};
use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// An open CONNECT stream.
pub struct Tunnel {
    pub status: http::StatusCode,
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
}

impl Tunnel {
    /// Half-closes (END_STREAM) and reads whatever comes back until the peer ends the stream
    /// too.
    pub async fn finish(mut self) -> Result<Vec<u8>> {
        self.send
            .send_data(Bytes::new(), true)
            .context("sending END_STREAM")?;
        let mut rest = Vec::new();
        while let Some(chunk) = self.recv.data().await {
            let chunk = chunk.context("reading DATA")?;
            let _ = self.recv.flow_control().release_capacity(chunk.len());
            rest.extend_from_slice(&chunk);
        }
        Ok(rest)
    }

    /// True when the response ended the stream (an error status: no tunnel follows).
    pub fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    /// Sends `payload` and reads until `payload.len()` bytes came back (or the stream ended).
    pub async fn echo(&mut self, payload: &[u8]) -> Result<Vec<u8>> {
        self.send
            .send_data(Bytes::copy_from_slice(payload), false)
            .context("sending DATA")?;
        let mut got = Vec::new();
        while got.len() < payload.len() {
            match self.recv.data().await {
                Some(chunk) => {
                    let chunk = chunk.context("reading DATA")?;
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    got.extend_from_slice(&chunk);
                }
                None => break,
            }
        }
        Ok(got)
    }
}

/// Connects from `ns` to `addr` (a ztunnel's HBONE port), presenting `client_cert` if any,
/// and sends `CONNECT authority`. Returns the tunnel whatever the response status; any TLS or
/// HTTP/2 failure (including a refused client certificate) is an error. Times out after 10 s.
pub async fn connect(
    ns: &Netns,
    addr: SocketAddr,
    client_cert: Option<&CertFiles>,
    authority: &str,
) -> Result<Tunnel> {
    let attempt = async {
        let mut conn = HboneConnection::open(ns, addr, client_cert).await?;
        // The connection task ends by itself once the client and all streams are dropped.
        conn.connect(authority).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .context("HBONE connect timed out")?
}

/// One mTLS HTTP/2 connection to an HBONE server on which a test sends whatever requests it
/// likes, one stream each (to check that a bad stream leaves the others alone).
pub struct HboneConnection {
    client: h2::client::SendRequest<Bytes>,
    driver: tokio::task::JoinHandle<std::result::Result<(), h2::Error>>,
}

impl HboneConnection {
    /// TCP + TLS 1.3 (ALPN h2, no SNI, `client_cert` if any) + HTTP/2 handshake from `ns` to
    /// `addr`. Times out after 10 s.
    pub async fn open(
        ns: &Netns,
        addr: SocketAddr,
        client_cert: Option<&CertFiles>,
    ) -> Result<HboneConnection> {
        let attempt = async move {
            let tls = open_tls(ns, addr, client_cert).await?;
            let (client, conn) = h2::client::handshake(tls)
                .await
                .context("HTTP/2 handshake")?;
            let driver = tokio::spawn(conn);
            Ok(HboneConnection { client, driver })
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .context("HBONE connection timed out")?
    }

    /// Sends `CONNECT authority` on a new stream; returns the tunnel whatever the status.
    pub async fn connect(&mut self, authority: &str) -> Result<Tunnel> {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())?;
        self.request(req, false).await
    }

    /// Sends any request on a new stream (`end_stream`: no request body follows) and waits for
    /// the response head. Times out after 10 s.
    pub async fn request(&mut self, req: http::Request<()>, end_stream: bool) -> Result<Tunnel> {
        let what = format!("{} {}", req.method(), req.uri());
        let attempt = async {
            let mut client = self.client.clone().ready().await.context("HTTP/2 ready")?;
            let (resp, send) = client
                .send_request(req, end_stream)
                .context("sending request")?;
            // A refused client certificate surfaces here, as the TLS alert the server sent.
            let resp = resp.await.context("response")?;
            let status = resp.status();
            anyhow::Ok(Tunnel {
                status,
                send,
                recv: resp.into_body(),
            })
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .with_context(|| format!("{what}: no response within 10 s"))?
            .with_context(|| what)
    }

    /// True once the HTTP/2 connection is gone (GOAWAY + close, reset, protocol error).
    pub fn is_closed(&self) -> bool {
        self.driver.is_finished()
    }
}

/// TCP + TLS 1.3 (ALPN h2, no SNI, `client_cert` if any) from `ns` to `addr`, and nothing
/// more: the HTTP/2 preface is the caller's (or, for tests of stalled peers, never sent).
pub async fn open_tls(
    ns: &Netns,
    addr: SocketAddr,
    client_cert: Option<&CertFiles>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = client_config(client_cert)?;
    let socket = ns.tcp_socket()?;
    let tcp = socket.connect(addr).await.context("TCP connect")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("TLS handshake")?;
    let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    anyhow::ensure!(
        alpn.as_deref() == Some(b"h2"),
        "server negotiated ALPN {alpn:?}, expected h2"
    );
    Ok(tls)
}

fn client_config(client_cert: Option<&CertFiles>) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match client_cert {
        Some(files) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
                .with_context(|| format!("reading {}", files.cert.display()))?
                .collect::<std::result::Result<_, _>>()?;
            let key = PrivateKeyDer::from_pem_file(&files.key)
                .with_context(|| format!("reading {}", files.key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    Ok(config)
}

/// Accepts any server certificate but still checks the handshake signatures.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
