//! Connecting as the settings say: credentials (user and password, token,
//! NKey seed, creds file), TLS (a `tls://` URL, a CA, a client certificate,
//! TLS first), and an error that says which of them failed and how to fix
//! it, never showing a secret.

use crate::error::{Error, ErrorKind};
use crate::settings::{redact, Credentials};
use async_nats::{ConnectErrorKind, ConnectOptions};

/// What a URL list carries before its host: `user:password@` or `token@`.
#[derive(Debug, PartialEq)]
enum UrlAuth {
    None,
    UserPassword(String, String),
    Token(String),
}

/// The servers of a comma-separated URL list, without any user, password
/// or token (those travel in the handshake instead).
pub(crate) fn servers(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|url| {
            let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{host}")
        })
        .collect()
}

/// Whether a connection authenticates as a user with permissions of its
/// own (password, NKey, creds, client certificate), from the settings or
/// the URL: only those can be refused a subject.
pub(crate) fn as_user(urls: &str, credentials: &Credentials) -> bool {
    credentials.user.is_some()
        || credentials.nkey.is_some()
        || credentials.creds.is_some()
        || credentials.cert.is_some()
        || matches!(url_auth(urls), UrlAuth::UserPassword(..))
}

/// The credentials of the first URL of a list that carries any (the
/// servers of one deployment share them), percent-decoded.
fn url_auth(urls: &str) -> UrlAuth {
    let Some(userinfo) = urls.split(',').map(str::trim).find_map(|url| {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        rest.rsplit_once('@').map(|(userinfo, _)| userinfo)
    }) else {
        return UrlAuth::None;
    };
    let decode = |text: &str| percent_decode(text);
    match userinfo.split_once(':') {
        Some((user, password)) => UrlAuth::UserPassword(decode(user), decode(password)),
        None => UrlAuth::Token(decode(userinfo)),
    }
}

/// `%XX` escapes decoded, as URLs write `@`, `:` or `/` in a password.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connect options for `urls` with `credentials`; credentials in the URL
/// count when the settings give none.
pub(crate) async fn options(
    urls: &str,
    credentials: &Credentials,
) -> Result<ConnectOptions, Error> {
    let mut options = ConnectOptions::new()
        .name("wharf")
        .ping_interval(super::connection::PING_INTERVAL)
        .connection_timeout(super::connection::CONNECT_TIMEOUT);
    if let Some(prefix) = &credentials.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    if credentials.servers_in_order {
        options = options.retain_servers_order();
    }
    let configured = credentials.user.is_some()
        || credentials.token.is_some()
        || credentials.nkey.is_some()
        || credentials.creds.is_some();
    if let (Some(user), Some(password)) = (&credentials.user, &credentials.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &credentials.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(seed) = &credentials.nkey {
        options = options.nkey(seed.expose().to_owned());
    }
    if let Some(path) = &credentials.creds {
        options = options.credentials_file(path).await.map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "the creds file `{}` cannot be used: {e}; it must hold a user JWT and NKey seed as `nsc generate creds` writes",
                    path.display()
                ),
            )
            .with_source(e)
        })?;
    }
    if !configured {
        match url_auth(urls) {
            UrlAuth::UserPassword(user, password) => {
                options = options.user_and_password(user, password)
            }
            UrlAuth::Token(token) => options = options.token(token),
            UrlAuth::None => {}
        }
    }
    if let Some(ca) = &credentials.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&credentials.cert, &credentials.key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let tls = credentials.ca.is_some()
        || credentials.cert.is_some()
        || credentials.tls_first
        || servers(urls).iter().any(|s| s.starts_with("tls://"));
    if tls {
        options = options.require_tls(true);
    }
    if credentials.tls_first {
        options = options.tls_first();
    }
    Ok(options)
}

/// A connection that failed, as an error saying what failed and how to
/// fix it: refused credentials and TLS are told apart from no server.
pub(crate) fn failed(urls: &str, credentials: &Credentials, e: async_nats::ConnectError) -> Error {
    let shown = redact(urls);
    let what = match (credentials.describe().as_str(), url_auth(urls)) {
        ("no credentials", UrlAuth::UserPassword(user, _)) => {
            format!("user `{user}` with a password, from the URL")
        }
        ("no credentials", UrlAuth::Token(_)) => "a token, from the URL".to_owned(),
        (described, _) => described.to_owned(),
    };
    let text = e.to_string();
    // rustls reports an untrusted or mismatched certificate as an I/O error.
    let tls_failure = e.kind() == ConnectErrorKind::Tls
        || text.contains("certificate")
        || text.contains("handshake");
    let expired = credentials.creds.as_deref().and_then(expired_jwt);
    let (kind, advice) = match e.kind() {
        ConnectErrorKind::AuthorizationViolation if expired.is_some() => (
            ErrorKind::Unauthorized,
            format!(
                "the user JWT in creds file `{}` expired {} ago: issue a new creds file (`nsc generate creds`, or your provider's console) and point NATS_CREDS at it",
                credentials.creds.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                humantime::format_duration(expired.unwrap_or_default())
            ),
        ),
        ConnectErrorKind::AuthorizationViolation => (
            ErrorKind::Unauthorized,
            format!("the server refused the credentials ({what}): check them, and whether they expired; set them with NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY or NATS_CREDS"),
        ),
        ConnectErrorKind::Authentication => (
            ErrorKind::Unauthorized,
            format!("the credentials could not be used ({what}): check the NKey seed or creds file"),
        ),
        _ if text.contains("invalid peer certificate") => (
            ErrorKind::Connection,
            "the server's TLS certificate is not trusted or does not name this host: set NATS_CA (or [broker] ca) to the CA that signed it".to_owned(),
        ),
        _ if tls_failure => (
            ErrorKind::Connection,
            "the TLS handshake failed: check that the server speaks TLS (tls:// or NATS_CA), that NATS_CA names the CA that signed its certificate, and NATS_CERT/NATS_KEY when it asks for a client certificate; NATS_TLS_FIRST=true when it wants TLS before the NATS greeting".to_owned(),
        ),
        _ => (
            ErrorKind::Connection,
            "start nats-server there, or unset NATS_URL to let wharf::init() start one".to_owned(),
        ),
    };
    // async-nats's own text can include the server's reply; it holds no
    // secret of ours, but the URL shown is the redacted one.
    Error::new(
        kind,
        format!("cannot connect to NATS at `{shown}`: {e}; {advice}"),
    )
    .with_source(e)
}

/// How long ago the user JWT in the creds file at `path` expired (its
/// `exp` claim, to the second); `None` when it has not, has no expiry, or
/// cannot be read. Only the JWT's public claims are read, never the seed.
pub(crate) fn expired_jwt(path: &std::path::Path) -> Option<std::time::Duration> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).ok()?;
    let jwt = text
        .lines()
        .map(str::trim)
        .skip_while(|line| !line.contains("BEGIN NATS USER JWT"))
        .nth(1)?;
    let claims = jwt.split('.').nth(1)?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&claims)
        .ok()?
        .get("exp")?
        .as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    (exp <= now).then(|| std::time::Duration::from_secs(now - exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_to_the_handshake() {
        assert_eq!(
            servers("nats://alice:s%40cret@a:4222, tls://b:4222,c:4222"),
            ["nats://a:4222", "tls://b:4222", "nats://c:4222"]
        );
        assert_eq!(
            url_auth("nats://alice:s%40cret@a:4222"),
            UrlAuth::UserPassword("alice".into(), "s@cret".into())
        );
        assert_eq!(url_auth("nats://tok@a:4222"), UrlAuth::Token("tok".into()));
        assert_eq!(
            url_auth("nats://a:4222,nats://bob:p%26ss+w@b:4222"),
            UrlAuth::UserPassword("bob".into(), "p&ss+w".into())
        );
        assert_eq!(url_auth("nats://a:4222"), UrlAuth::None);
    }
}
