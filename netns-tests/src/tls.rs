//! Certificates for tests that serve HTTPS: a CA of their own and a server certificate from
//! it for an IP address, made in-process (rcgen, ECDSA P-256) and written as PEM files, so
//! that a client trusting only that CA accepts the server and one without it refuses it.
//! Used by the registry tests here (`Registry::serve_tls`) and by mesh-image's. A registry
//! token service's signer ([`write_token_signer`]) is RSA, made with openssl.

use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Writes into `dir` (which must exist) `ca.crt`, a CA named `ca_name`, and `server.crt` with
/// `server.key`, a certificate from it for `ip` (its subjectAltName, CN too) for serverAuth.
/// Both are valid from now on for a day. The CA's key is not kept.
pub fn write_ca_and_server_cert(dir: &Path, ca_name: &str, ip: IpAddr) -> Result<()> {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    let (before, after) = (
        now - Duration::from_secs(300),
        now + Duration::from_secs(86_400),
    );
    let name = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };

    let ca_key = KeyPair::generate().context("a CA key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name(ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (before, after);
    let ca = ca.self_signed(&ca_key).context("the CA certificate")?;

    let key = KeyPair::generate().context("a server key")?;
    let mut server = CertificateParams::default();
    server.distinguished_name = name(&ip.to_string());
    server.subject_alt_names = vec![SanType::IpAddress(ip)];
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    (server.not_before, server.not_after) = (before, after);
    let server = server
        .signed_by(&key, &ca, &ca_key)
        .context("the server certificate")?;

    for (file, pem) in [
        ("ca.crt", ca.pem()),
        ("server.crt", server.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        fs::write(dir.join(file), pem).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}

/// Writes into `dir` (which must exist) `token.key` and `token.crt`, the RSA key and
/// self-signed certificate (a day) a registry token service signs its tokens with and a
/// registry trusts them by (distribution's `auth: token: rootcertbundle`). Made with openssl:
/// the token service (`tokenserver.py`) signs RS256 with `openssl dgst`, and rcgen (on ring)
/// cannot make RSA keys.
pub fn write_token_signer(dir: &Path) -> Result<()> {
    let mut cmd = std::process::Command::new("openssl");
    cmd.current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "token.key",
        "-out",
        "token.crt",
        "-days",
        "1",
        "-subj",
        "/CN=mesh test token signer",
    ]);
    let out = crate::process::output_with_timeout(&mut cmd, Duration::from_secs(60))
        .context("openssl for the token signer (apt-get install -y openssl)")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl req for the token signer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// openssl's verdict on the written files: `args` run in `dir`, its output.
    fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (apt-get install -y openssl)")
    }

    #[test]
    fn the_server_certificate_is_the_cas_for_its_address_only_and_matches_its_key() {
        let dir = std::env::temp_dir().join(format!("mesh-netns-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        write_ca_and_server_cert(&dir, "mesh test CA", [10, 99, 0, 11].into()).unwrap();
        let verify = |ip: &str| {
            let args = [
                "verify",
                "-CAfile",
                "ca.crt",
                "-purpose",
                "sslserver",
                "-verify_ip",
                ip,
                "server.crt",
            ];
            openssl(&dir, &args).status.success()
        };
        assert!(verify("10.99.0.11"));
        assert!(!verify("10.99.0.12"), "accepted for another address");
        // The key written is the certificate's.
        let from_key = openssl(&dir, &["pkey", "-in", "server.key", "-pubout"]);
        let from_cert = openssl(&dir, &["x509", "-in", "server.crt", "-pubkey", "-noout"]);
        assert!(from_key.status.success() && from_cert.status.success());
        assert_eq!(from_key.stdout, from_cert.stdout);
        // A CA of its own each time: another one does not vouch for this certificate.
        let other = dir.join("other");
        fs::create_dir_all(&other).unwrap();
        write_ca_and_server_cert(&other, "mesh test CA", [10, 99, 0, 11].into()).unwrap();
        let args = ["verify", "-CAfile", "other/ca.crt", "server.crt"];
        assert!(!openssl(&dir, &args).status.success());
        fs::remove_dir_all(&dir).unwrap();
    }
}
