//! A CA generated per test, and certificates it issues, as PEM files in a
//! temporary directory.

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate authority of one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate's PEM file.
    pub cert: PathBuf,
    dir: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written in `dir`.
    ///
    /// # Panics
    ///
    /// When generation or writing fails (the test cannot run).
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed ca");
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, cert.pem()).expect("write ca");
        Self { issuer: Issuer::new(params, key), cert: path, dir: dir.to_owned() }
    }

    /// A certificate for `names` (DNS names or IP addresses), usable by a
    /// server and a client, written as `<file>.crt` and `<file>.key`.
    ///
    /// # Panics
    ///
    /// When generation or writing fails.
    pub fn issue(&self, file: &str, names: &[&str]) -> Leaf {
        let leaf = Leaf { cert: self.dir.join(format!("{file}.crt")), key: self.dir.join(format!("{file}.key")) };
        self.issue_to(&leaf, names);
        leaf
    }

    /// Issues a new certificate for `names` over `leaf`'s files (a rotation).
    ///
    /// # Panics
    ///
    /// When generation or writing fails.
    pub fn issue_to(&self, leaf: &Leaf, names: &[&str]) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        // Key first, so that a reader never pairs a new certificate with an
        // old key for long (a mismatched pair is refused and retried).
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write key");
        std::fs::write(&leaf.cert, cert.pem()).expect("write cert");
    }
}
