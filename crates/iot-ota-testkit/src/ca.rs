//! A throwaway certificate authority for TLS tests.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The ring provider, named explicitly everywhere: the workspace builds
/// rustls without aws-lc-rs, so there is no process-wide default to rely on.
pub(crate) fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA made fresh for a test, and a server certificate it signed for
/// `localhost`, `127.0.0.1` and `::1`.
///
/// Keys are ECDSA P-256, which rustls (ring) and Mosquitto (OpenSSL) both
/// accept. Making one takes about a millisecond.
pub struct TestCa {
    ca_cert: Certificate,
    ca_key: KeyPair,
    server_cert: Certificate,
    server_key: KeyPair,
}

/// A client certificate and its key, signed by a [`TestCa`], for mutual TLS.
#[derive(Clone, Debug)]
pub struct ClientCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl ClientCert {
    /// Writes `client.crt` and `client.key` into `dir`; returns their paths.
    pub fn write(&self, dir: impl AsRef<Path>) -> io::Result<(PathBuf, PathBuf)> {
        let cert = dir.as_ref().join("client.crt");
        let key = dir.as_ref().join("client.key");
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// Makes a CA and its `localhost` server certificate.
    pub fn new() -> TestCa {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name("iot-ota-testkit CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let server_key = KeyPair::generate().expect("generate server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params.subject_alt_names.extend([
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ]);
        params.distinguished_name = name("localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("sign server cert");

        TestCa {
            ca_cert,
            ca_key,
            server_cert,
            server_key,
        }
    }

    /// The CA certificate, PEM: what a client must trust.
    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_cert.der().clone()
    }

    /// The server certificate, PEM.
    pub fn server_cert_pem(&self) -> String {
        self.server_cert.pem()
    }

    /// The server's private key, PKCS#8 PEM.
    pub fn server_key_pem(&self) -> String {
        self.server_key.serialize_pem()
    }

    /// Writes the CA certificate to `dir/ca.crt`; returns the path.
    pub fn write_ca(&self, dir: impl AsRef<Path>) -> PathBuf {
        let path = dir.as_ref().join("ca.crt");
        std::fs::write(&path, self.ca_pem())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Writes `server.crt` and `server.key` into `dir`; returns their paths.
    pub fn write_server_cert(&self, dir: impl AsRef<Path>) -> (PathBuf, PathBuf) {
        let cert = dir.as_ref().join("server.crt");
        let key = dir.as_ref().join("server.key");
        for (path, pem) in [
            (&cert, self.server_cert_pem()),
            (&key, self.server_key_pem()),
        ] {
            std::fs::write(path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        (cert, key)
    }

    /// A client certificate with common name `name`, signed by this CA.
    pub fn client_cert(&self, name_cn: &str) -> ClientCert {
        let key = KeyPair::generate().expect("generate client key");
        let mut params = CertificateParams::default();
        params.distinguished_name = name(name_cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign client cert");
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    /// A rustls server config (ring provider) presenting the `localhost`
    /// certificate, without client authentication.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let config = ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.der().clone()], self.server_key_der())
            .expect("server cert and key");
        Arc::new(config)
    }

    /// Like [`TestCa::server_config`], limited to one cipher suite (and
    /// the protocol version it belongs to).
    pub fn server_config_for(&self, suite: rustls::SupportedCipherSuite) -> Arc<ServerConfig> {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        };
        let config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[suite.version()])
            .expect("protocol version")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.der().clone()], self.server_key_der())
            .expect("server cert and key");
        Arc::new(config)
    }

    /// Like [`TestCa::server_config`], but every client must present a
    /// certificate signed by this CA (mutual TLS).
    pub fn server_config_mtls(&self) -> Arc<ServerConfig> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), ring_provider())
                .build()
                .expect("client verifier");
        let config = ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_cert.der().clone()], self.server_key_der())
            .expect("server cert and key");
        Arc::new(config)
    }

    /// A rustls client config (ring provider) trusting only this CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A client config trusting this CA and presenting `client`.
    pub fn client_config_with_cert(&self, client: &ClientCert) -> Arc<ClientConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client.key_der.clone()));
        let config = ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(self.roots())
            .with_client_auth_cert(vec![CertificateDer::from(client.cert_der.clone())], key)
            .expect("client cert and key");
        Arc::new(config)
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der()).expect("add CA to roots");
        roots
    }

    fn server_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.serialize_der()))
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}
