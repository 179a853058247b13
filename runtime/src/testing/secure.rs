//! Credentials made for a test, as users get them from their tools: TLS
//! certificates signed by a CA of the test's own (as `openssl` or a
//! company CA makes them), and creds files of a JWT account on a server in
//! operator mode (as `nsc` makes them).

use super::{NatsServer, TempDir};
use crate::settings::Credentials;
use crate::Error;
use std::path::{Path, PathBuf};

/// A CA, a server certificate for `127.0.0.1` and `localhost` signed by
/// it, and a client certificate signed by it, as PEM files.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (`NATS_CA`, a server's `ca_file`).
    pub ca: PathBuf,
    /// The server's certificate.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A client certificate (`NATS_CERT`).
    pub client_cert: PathBuf,
    /// The client certificate's private key (`NATS_KEY`).
    pub client_key: PathBuf,
}

impl Pki {
    /// Makes the CA and both certificates in `dir`; the server's names
    /// `127.0.0.1`, `localhost` and `extra_names`.
    pub fn new(dir: &Path, extra_names: &[&str]) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("a key"))
            .expect("a self-signed CA");
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().expect("a key");
            let cert = CertificateParams::new(names)
                .expect("certificate parameters")
                .signed_by(&key, &ca)
                .expect("a certificate signed by the CA");
            (cert.pem(), key.serialize_pem())
        };
        let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        names.extend(extra_names.iter().map(|n| n.to_string()));
        let (server_cert, server_key) = leaf(names);
        let (client_cert, client_key) = leaf(vec!["wharf-client".into()]);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("the test's directory is writable");
            path
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        }
    }

    /// A nats-server `tls` block with this server certificate; `verify`
    /// asks clients for a certificate signed by the CA (mutual TLS).
    pub fn server_tls(&self, verify: bool) -> String {
        let verify = if verify {
            format!(", ca_file: \"{}\", verify: true", self.ca.display())
        } else {
            String::new()
        };
        format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\"{verify} }}",
            self.server_cert.display(),
            self.server_key.display()
        )
    }
}

/// A nats-server in operator mode with one account, whose users connect
/// with creds files made here (JWT and NKey seed, as `nsc` writes them).
pub struct JwtAccount {
    account: nkeys::KeyPair,
    /// The server, in operator mode, with JetStream for the account.
    pub server: NatsServer,
    dir: TempDir,
}

impl std::fmt::Debug for JwtAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAccount")
            .field("account", &self.account.public_key())
            .finish_non_exhaustive()
    }
}

impl JwtAccount {
    /// Starts the server with a new operator and account.
    pub fn start(stem: &str) -> Result<JwtAccount, Error> {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "O",
            serde_json::json!({ "type": "operator", "version": 2 }),
            None,
        );
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "A",
            serde_json::json!({ "type": "account", "version": 2, "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1 } }),
            None,
        );
        // JetStream in operator mode needs a system account.
        let system = nkeys::KeyPair::new_account();
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            serde_json::json!({ "type": "account", "version": 2 }),
            None,
        );
        let server = NatsServer::start_with_config(&format!(
            "operator: {operator_jwt}\nsystem_account: {system_key}\nresolver: MEMORY\n\
             resolver_preload: {{ {account_key}: {account_jwt}, {system_key}: {system_jwt} }}\n\
             max_control_line: 16384\n",
            system_key = system.public_key(),
            account_key = account.public_key()
        ))?;
        Ok(JwtAccount {
            account,
            server,
            dir: TempDir::new(stem),
        })
    }

    /// A creds file for user `name` whose JWT carries `permissions` (`pub`,
    /// `sub`, `resp`, as `nsc` writes them), and the credentials naming it.
    pub fn creds(&self, name: &str, permissions: serde_json::Value) -> Credentials {
        self.creds_expiring(name, permissions, None)
    }

    /// [`JwtAccount::creds`] whose JWT expires at `exp` (unix seconds).
    pub fn creds_expiring(
        &self,
        name: &str,
        mut claims: serde_json::Value,
        exp: Option<u64>,
    ) -> Credentials {
        let user = nkeys::KeyPair::new_user();
        claims["type"] = "user".into();
        claims["version"] = 2.into();
        claims["subs"] = (-1).into();
        claims["data"] = (-1).into();
        claims["payload"] = (-1).into();
        let user_jwt = jwt(&self.account, &user.public_key(), name, claims, exp);
        let path = self.dir.path().join(format!("{name}.creds"));
        std::fs::write(
            &path,
            format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 ************************* IMPORTANT *************************\n\
                 NKEY Seed printed below can be used to sign and prove identity.\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().expect("a new user key has a seed")
            ),
        )
        .expect("the test's directory is writable");
        Credentials {
            creds: Some(path),
            ..Credentials::default()
        }
    }
}

/// A JWT as `nsc` makes one: `nats` claims about `subject`, signed by
/// `issuer` (ed25519 NKey), expiring at `exp` if given.
fn jwt(
    issuer: &nkeys::KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
    exp: Option<u64>,
) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let mut claims = serde_json::json!({
        "jti": nuid::next().to_string(),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    if let Some(exp) = exp {
        claims["exp"] = exp.into();
    }
    let payload = b64(claims.to_string().as_bytes());
    let signed = format!("{header}.{payload}");
    let signature = issuer
        .sign(signed.as_bytes())
        .expect("an issuer key can sign");
    format!("{signed}.{}", b64(&signature))
}
