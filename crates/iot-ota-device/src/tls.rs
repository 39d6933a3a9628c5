//! TLS client configuration shared by the MQTT adapter and the HTTP(S)
//! downloader.
//!
//! One [`rustls::ClientConfig`] serves both: rumqttc takes an
//! `Arc<ClientConfig>` and so does [`crate::http`]. The crypto provider is
//! always ring, passed explicitly, so the configuration never depends on a
//! process-wide default provider being installed (and aws-lc never enters the
//! device binary).
#![deny(missing_docs)]

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Where the TLS trust anchors and the optional client identity come from.
///
/// All files are PEM. With every field `None`, the system's root
/// certificates are trusted and no client certificate is sent.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Extra trusted CA certificates (every certificate in the file), added to
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain for mutual TLS; needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// Private key of `client_cert` (PKCS#8, PKCS#1 or SEC1); needs
    /// `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// Why a TLS client configuration could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A file is not valid PEM, or holds a certificate that cannot be used.
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file that should hold certificates holds none.
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// The client key file holds no private key.
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// Only one of the client certificate and the client key was given.
    IncompleteClientAuth {
        /// The file that was given.
        given: PathBuf,
        /// The option that is missing: `client_key` or `client_cert`.
        missing: &'static str,
    },
    /// No trusted root at all: the system has none and no CA file was given.
    NoRoots {
        /// What was wrong with the system's roots (a file that could not be
        /// read, bad sections): a mistyped `SSL_CERT_FILE` is named here.
        problems: Vec<String>,
    },
    /// rustls refused the client certificate and key (unsupported key type,
    /// or a key that does not match the certificate).
    ClientAuth {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// rustls refused the configuration itself.
    Config(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            Self::Malformed { path, reason } => write!(f, "{}: {reason}", path.display()),
            Self::NoCertificates { path } => {
                write!(f, "no PEM certificate in {}", path.display())
            }
            Self::NoKey { path } => write!(f, "no PEM private key in {}", path.display()),
            Self::IncompleteClientAuth { given, missing } => write!(
                f,
                "client certificate and key are both needed: {} was given, {missing} is missing",
                given.display()
            ),
            Self::NoRoots { problems } => {
                f.write_str(
                    "no trusted root certificate: the system has none and no CA file was given",
                )?;
                if !problems.is_empty() {
                    write!(f, " ({})", problems.join("; "))?;
                }
                Ok(())
            }
            Self::ClientAuth { cert, key, source } => write!(
                f,
                "client certificate {} with key {} refused: {source}",
                cert.display(),
                key.display()
            ),
            Self::Config(e) => write!(f, "TLS configuration refused: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreadable { source, .. } => Some(source),
            Self::ClientAuth { source, .. } | Self::Config(source) => Some(source),
            _ => None,
        }
    }
}

/// Builds the client configuration described by `opts`.
///
/// Roots are the system's certificates (a bad one among them is skipped: one
/// broken file in `/etc/ssl` must not take the device offline) plus every
/// certificate of `opts.ca_file`. Errors in files the caller named are not
/// skipped: they name the file and the problem.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = root_store(opts.ca_file.as_deref())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    let config = match (&opts.client_cert, &opts.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let private = read_key(key)?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|source| TlsError::ClientAuth {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?
        }
        (Some(given), None) => {
            return Err(TlsError::IncompleteClientAuth {
                given: given.clone(),
                missing: "client_key",
            })
        }
        (None, Some(given)) => {
            return Err(TlsError::IncompleteClientAuth {
                given: given.clone(),
                missing: "client_cert",
            })
        }
    };
    Ok(Arc::new(config))
}

fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let problems = add_system_roots(&mut roots);
    if let Some(path) = ca_file {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| TlsError::Malformed {
                path: path.to_owned(),
                reason: format!("unusable CA certificate: {e}"),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots { problems });
    }
    Ok(roots)
}

/// Adds the system's root certificates, where OpenSSL (and
/// rustls-native-certs) would look: `SSL_CERT_FILE` and `SSL_CERT_DIR` when
/// either is set, else the distribution's bundle and certificate
/// directories. A bad file or certificate is skipped: one broken file in
/// `/etc/ssl` must not take the device offline; whatever loaded is still
/// worth trusting.
///
/// One certificate at a time goes from the file into the store, rather
/// than every file read whole and every certificate collected first, as
/// `rustls_native_certs::load_native_certs` does: on Debian that is the
/// 216 KB bundle plus the same 145 certificates again from `/etc/ssl/certs`,
/// about 0.3 MiB of heap at once on a device that keeps only the trust
/// anchors. A certificate seen before (the bundle and the directory hold
/// the same ones) is added once: its SHA-256 is remembered, not its bytes.
///
/// What was skipped is said (a warning each) and returned: a mistyped
/// `SSL_CERT_FILE` must not read as "the system has no roots".
#[cfg(not(target_os = "macos"))]
fn add_system_roots(roots: &mut RootCertStore) -> Vec<String> {
    let (file, dirs) = system_root_paths();
    let (files, problems) = add_roots_from(file.as_deref(), &dirs, roots);
    for p in &problems {
        log::warn!("system root certificates: {p}");
    }
    log::debug!(
        "{} trusted root certificates from {files} files of the system's",
        roots.len()
    );
    problems
}

/// macOS keeps its roots in the keychain, which rustls-native-certs reads.
#[cfg(target_os = "macos")]
fn add_system_roots(roots: &mut RootCertStore) -> Vec<String> {
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    found.errors.iter().map(ToString::to_string).collect()
}

/// Where the system's roots are: `SSL_CERT_FILE` and `SSL_CERT_DIR` when
/// either is set, else what `openssl_probe` finds (rustls-native-certs's
/// rule).
#[cfg(not(target_os = "macos"))]
fn system_root_paths() -> (Option<PathBuf>, Vec<PathBuf>) {
    let file = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let dirs: Vec<PathBuf> = std::env::var_os("SSL_CERT_DIR")
        .map(|dirs| {
            std::env::split_paths(&dirs)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if file.is_some() || !dirs.is_empty() {
        return (file, dirs);
    }
    let probed = openssl_probe::probe();
    (probed.cert_file, probed.cert_dir)
}

/// Adds every certificate of `file` and of the files in `dirs`, each file
/// and each certificate once. Returns how many files it read, and what it
/// skipped (files it could not read, sections that were no certificate).
#[cfg(not(target_os = "macos"))]
fn add_roots_from(
    file: Option<&Path>,
    dirs: &[PathBuf],
    roots: &mut RootCertStore,
) -> (usize, Vec<String>) {
    let mut seen = SeenRoots::default();
    if let Some(file) = file {
        match std::fs::metadata(file) {
            Ok(meta) => {
                seen.first_visit(&meta);
                seen.load(file, roots);
            }
            Err(e) => seen.problems.push(format!("{}: {e}", file.display())),
        }
    }
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                seen.problems.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Follows the directory's symlinks to the certificates.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() && seen.first_visit(&meta) => seen.load(&path, roots),
                _ => {}
            }
        }
    }
    (seen.files.len(), seen.problems)
}

/// The files and certificates [`add_system_roots`] has taken.
#[cfg(not(target_os = "macos"))]
#[derive(Default)]
struct SeenRoots {
    /// Device and inode of each file read.
    files: std::collections::HashSet<(u64, u64)>,
    /// SHA-256 of each certificate added.
    certs: std::collections::HashSet<[u8; 32]>,
    /// What was skipped, said.
    problems: Vec<String>,
}

#[cfg(not(target_os = "macos"))]
impl SeenRoots {
    /// True the first time this file is met.
    fn first_visit(&mut self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.files.insert((meta.dev(), meta.ino()))
    }

    /// Adds each certificate of the PEM file at `path` not added before.
    fn load(&mut self, path: &Path, roots: &mut RootCertStore) {
        use rustls::pki_types::pem::{self, PemObject};
        let certs = match CertificateDer::pem_file_iter(path) {
            Ok(certs) => certs,
            Err(e) => {
                self.problems.push(format!("{}: {e}", path.display()));
                return;
            }
        };
        let mut bad = 0;
        for cert in certs {
            match cert {
                Ok(cert) => {
                    let digest = ring::digest::digest(&ring::digest::SHA256, &cert);
                    let mut id = [0u8; 32];
                    id.copy_from_slice(digest.as_ref());
                    // Not a usable trust anchor: skipped, as above.
                    if self.certs.insert(id) && roots.add(cert).is_err() {
                        bad += 1;
                    }
                }
                // The iterator ends after a read error: so does this file.
                Err(pem::Error::Io(e)) => {
                    self.problems.push(format!("{}: {e}", path.display()));
                    return;
                }
                // A bad section is passed over; the next one may be fine.
                Err(_) => bad += 1,
            }
        }
        if bad > 0 {
            self.problems.push(format!(
                "{}: {bad} sections skipped (not a usable certificate)",
                path.display()
            ));
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

fn malformed(path: &Path, e: io::Error) -> TlsError {
    TlsError::Malformed {
        path: path.to_owned(),
        reason: format!("bad PEM: {e}"),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| malformed(path, e))?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A file in the temp directory, removed on drop.
    pub(crate) struct TempFile(pub(crate) PathBuf);

    impl TempFile {
        pub(crate) fn new(contents: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "iot-ota-tls-test-{}-{}.pem",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The anchors of a store, in an order of their own, to compare.
    fn anchors(roots: &RootCertStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut v: Vec<_> = roots
            .roots
            .iter()
            .map(|ta| (ta.subject.to_vec(), ta.subject_public_key_info.to_vec()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn system_roots_are_the_ones_rustls_native_certs_finds() {
        let mut ours = RootCertStore::empty();
        add_system_roots(&mut ours);
        let mut theirs = RootCertStore::empty();
        theirs.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        // (On a host without system roots both are empty: said, not hidden.)
        eprintln!("{} system roots", ours.len());
        assert_eq!(anchors(&ours), anchors(&theirs));
    }

    #[test]
    #[cfg(not(target_os = "macos"))]
    fn roots_come_once_each_and_bad_parts_are_skipped() {
        let dir = iot_ota_testkit::TempDir::new("tls-roots");
        let certs: Vec<String> = (0..4).map(|_| ca().0).collect();
        let garbage = "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n";
        let bundle = dir.join("bundle.pem");
        std::fs::write(
            &bundle,
            [&*certs[0], &certs[1], garbage, &certs[2]].concat(),
        )
        .unwrap();
        let certs_dir = dir.join("certs");
        std::fs::create_dir(&certs_dir).unwrap();
        // The bundle again through a symlink, as /etc/ssl/certs has it.
        std::os::unix::fs::symlink(&bundle, certs_dir.join("link.pem")).unwrap();
        // A certificate the bundle has, and one it has not.
        std::fs::write(certs_dir.join("more.pem"), [&*certs[1], &certs[3]].concat()).unwrap();
        std::fs::write(certs_dir.join("notes.txt"), "not PEM at all").unwrap();
        std::fs::write(certs_dir.join("bad.pem"), garbage).unwrap();
        std::fs::create_dir(certs_dir.join("subdir")).unwrap();
        let dirs = [certs_dir, dir.join("missing")];

        let mut roots = RootCertStore::empty();
        // The bundle (once, though also linked), more.pem, notes.txt, bad.pem.
        let (files, problems) = add_roots_from(Some(&bundle), &dirs, &mut roots);
        assert_eq!(files, 4);
        // The bad file and the missing directory are said.
        assert!(
            problems.iter().any(|p| p.contains("bad.pem")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("missing")),
            "{problems:?}"
        );
        let mut expected = RootCertStore::empty();
        for pem in &certs {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            expected.add(der).unwrap();
        }
        assert_eq!(roots.len(), 4);
        assert_eq!(anchors(&roots), anchors(&expected));

        // Nothing there: no roots, no panic, and the error names why (a
        // mistyped SSL_CERT_FILE).
        let mut none = RootCertStore::empty();
        let (_, problems) = add_roots_from(Some(&dir.join("absent.pem")), &dirs[1..], &mut none);
        assert!(none.is_empty());
        let e = TlsError::NoRoots { problems }.to_string();
        assert!(e.contains("absent.pem: No such file"), "{e}");
    }

    fn ca() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn opts(ca: Option<&TempFile>, cert: Option<&TempFile>, key: Option<&TempFile>) -> TlsOptions {
        TlsOptions {
            ca_file: ca.map(|f| f.0.clone()),
            client_cert: cert.map(|f| f.0.clone()),
            client_key: key.map(|f| f.0.clone()),
        }
    }

    #[test]
    fn ca_file_and_client_identity_build_a_config() {
        let (cert_pem, key_pem) = ca();
        let ca_file = TempFile::new(&cert_pem);
        let cert = TempFile::new(&cert_pem);
        let key = TempFile::new(&key_pem);
        client_config(&opts(Some(&ca_file), Some(&cert), Some(&key))).unwrap();
        client_config(&opts(Some(&ca_file), None, None)).unwrap();
    }

    #[test]
    fn missing_ca_file_is_unreadable_and_named() {
        let o = TlsOptions {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsOptions::default()
        };
        let err = client_config(&o).unwrap_err();
        assert!(matches!(err, TlsError::Unreadable { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn file_without_certificates_is_refused() {
        let (_, key_pem) = ca();
        let ca_file = TempFile::new(&key_pem);
        let err = client_config(&opts(Some(&ca_file), None, None)).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err:?}");
    }

    #[test]
    fn key_file_without_key_is_refused() {
        let (cert_pem, _) = ca();
        let ca_file = TempFile::new(&cert_pem);
        let err = client_config(&opts(Some(&ca_file), Some(&ca_file), Some(&ca_file))).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");
    }

    #[test]
    fn cert_without_key_and_key_without_cert_are_refused() {
        let (cert_pem, key_pem) = ca();
        let ca_file = TempFile::new(&cert_pem);
        let key = TempFile::new(&key_pem);
        let err = client_config(&opts(Some(&ca_file), Some(&ca_file), None)).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::IncompleteClientAuth {
                    missing: "client_key",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = client_config(&opts(Some(&ca_file), None, Some(&key))).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::IncompleteClientAuth {
                    missing: "client_cert",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
