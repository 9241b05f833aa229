//! Test certificates (rcgen): a CA and server pairs it signs, for the TLS tests.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// The name istiod is told to verify (`tlsSettings.sni`), as in a Kubernetes Service's DNS name.
pub const SERVER_NAME: &str = "cloudmap-xds.istio-system.svc";

pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate and its key, both PEM, and the certificate's DER.
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "cloudmap-xds test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A server pair for [`SERVER_NAME`] and 127.0.0.1, told apart by `common_name`.
    pub fn server(&self, common_name: &str) -> Pair {
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

impl Pair {
    /// Writes both files the way kubelet updates a Secret volume: each replaced atomically.
    pub fn write(&self, cert: &Path, key: &Path) {
        replace(cert, self.cert_pem.as_bytes());
        replace(key, self.key_pem.as_bytes());
    }
}

pub fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
