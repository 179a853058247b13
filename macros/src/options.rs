//! Options of `#[microservice(...)]`.

use proc_macro2::TokenStream;
use syn::{parse::Parser, LitInt, LitStr};

/// Parsed attribute options. Each is validated here, so a mistake is a
/// compile error on the option itself rather than a start-up failure.
#[derive(Default)]
pub(crate) struct Options {
    /// Function name on the wire (`<prefix>.<service>.<name>`).
    pub name: Option<String>,
    /// Service name; defaults to the defining crate's name.
    pub service: Option<String>,
    /// Call timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Safe to run more than once: retried after a timeout or a lost worker,
    /// and its results are kept for deduplication.
    pub idempotent: bool,
    /// Calls go through JetStream by default (at-least-once).
    pub durable: bool,
    /// Calls run in a transaction, on the instance that owns it.
    pub stateful: bool,
    /// Attempts per call, first one included.
    pub attempts: Option<u32>,
    /// First retry delay bound in milliseconds.
    pub backoff_ms: Option<u64>,
    /// Largest retry delay bound in milliseconds.
    pub max_backoff_ms: Option<u64>,
}

pub(crate) fn parse(attr: TokenStream) -> syn::Result<Options> {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            let lit: LitStr = meta.value()?.parse()?;
            options.name = Some(subject_token(&lit, "name")?);
        } else if meta.path.is_ident("service") {
            let lit: LitStr = meta.value()?.parse()?;
            options.service = Some(subject_token(&lit, "service")?);
        } else if meta.path.is_ident("timeout") {
            options.timeout_ms = Some(duration_value(&meta, "timeout")?);
        } else if meta.path.is_ident("backoff") {
            options.backoff_ms = Some(duration_value(&meta, "backoff")?);
        } else if meta.path.is_ident("max_backoff") {
            options.max_backoff_ms = Some(duration_value(&meta, "max_backoff")?);
        } else if meta.path.is_ident("attempts") {
            let lit: LitInt = meta.value()?.parse()?;
            let attempts = lit.base10_parse::<u32>()?;
            if attempts == 0 {
                return Err(syn::Error::new(
                    lit.span(),
                    "attempts counts the first try too, so it must be at least 1 (1 means never retry)",
                ));
            }
            options.attempts = Some(attempts);
        } else if meta.path.is_ident("idempotent") {
            options.idempotent = true;
        } else if meta.path.is_ident("durable") {
            options.durable = true;
        } else if meta.path.is_ident("stateful") {
            options.stateful = true;
        } else {
            return Err(meta.error(
                "unknown #[microservice] option; supported: name = \"..\", service = \"..\", timeout = \"5s\", idempotent, durable, stateful, attempts = 5, backoff = \"25ms\", max_backoff = \"2s\"",
            ));
        }
        Ok(())
    });
    parser.parse2(attr)?;
    if options.stateful && (options.durable || options.idempotent) {
        let other = if options.durable {
            "durable"
        } else {
            "idempotent"
        };
        return Err(syn::Error::new(
            proc_macro2::Span::call_site(),
            format!("`stateful` cannot be combined with `{other}`: a stateful call runs on the one instance that owns its transaction, so it is never re-run elsewhere"),
        ));
    }
    if let (Some(backoff), Some(max)) = (options.backoff_ms, options.max_backoff_ms) {
        if max < backoff {
            return Err(syn::Error::new(
                proc_macro2::Span::call_site(),
                format!("max_backoff ({max} ms) is smaller than backoff ({backoff} ms); raise max_backoff"),
            ));
        }
    }
    Ok(options)
}

/// A duration option: `"250ms"`, `"5s"`, `"2m"`, or an integer in
/// milliseconds; never zero.
fn duration_value(meta: &syn::meta::ParseNestedMeta, what: &str) -> syn::Result<u64> {
    let value = meta.value()?;
    let ms = if value.peek(LitInt) {
        let lit: LitInt = value.parse()?;
        lit.base10_parse::<u64>()?
    } else {
        let lit: LitStr = value.parse()?;
        parse_duration_ms(&lit.value()).ok_or_else(|| {
            syn::Error::new(
                lit.span(),
                format!("{what} must be a duration such as \"250ms\", \"5s\" or \"2m\" (or an integer in milliseconds)"),
            )
        })?
    };
    if ms == 0 {
        return Err(meta.error(format!("{what} must be greater than zero")));
    }
    Ok(ms)
}

/// A service or function name becomes one NATS subject token and one
/// ADR-32 name, so only `[A-Za-z0-9_-]` is allowed.
fn subject_token(lit: &LitStr, what: &str) -> syn::Result<String> {
    let value = lit.value();
    let valid = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(value)
    } else {
        Err(syn::Error::new(
            lit.span(),
            format!("{what} must be non-empty and use only A-Z, a-z, 0-9, '_' and '-' (it becomes one NATS subject token)"),
        ))
    }
}

/// Parses `"250ms"`, `"5s"`, `"2m"` (humantime, as every duration in
/// wharf) into milliseconds.
pub(crate) fn parse_duration_ms(text: &str) -> Option<u64> {
    let duration = humantime::parse_duration(text.trim()).ok()?;
    u64::try_from(duration.as_millis()).ok()
}

/// FNV-1a, 64 bit: a stable hash of the signature text, the same in every
/// build of the same source.
pub(crate) fn fnv1a64(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("5s"), Some(5_000));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("5 fortnights"), None);
        assert_eq!(parse_duration_ms("1h 30m"), Some(5_400_000));
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
