//! Secrets: where they come from, and keeping them out of everything a person or a machine reads.
//!
//! * **References.** A credential, token or piece of key material is never written in a config
//!   file, a command line or a ConfigMap. It is named by a reference instead: `file:PATH` (a file,
//!   such as a mounted Kubernetes Secret) or `env:VAR` (an environment variable, such as one set
//!   from a Secret with `secretKeyRef`). [`resolve`] reads it; the value is zeroed when dropped.
//! * **Redaction.** Every URL or connection setting that reaches an error, a log line, a span or a
//!   metric label goes through [`redact`] first, bus and store URLs alike: the password in the
//!   user-info part and the value of every query parameter that holds a secret (see
//!   [`is_secret_name`]) become `REDACTED`. References stay visible — `env:KAFKA_PASSWORD` names
//!   where the secret is, not what it is — so a reader can still tell which one was wrong.

use std::path::Path;

use zeroize::Zeroizing;

/// What replaces a secret in redacted text.
pub const REDACTED: &str = "REDACTED";

/// A secret that could not be read. Names the reference, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret reference {reference:?}: {reason}")]
    Unreadable { reference: String, reason: String },
    #[error(
        "{what} must be a reference, `file:PATH` or `env:VAR`, not the secret itself \
         (secrets never go on the command line or in a config map)"
    )]
    NotAReference { what: String },
}

/// Is `value` a reference ([`resolve`] can read it) rather than a literal?
pub fn is_reference(value: &str) -> bool {
    value.starts_with("file:") || value.starts_with("env:")
}

/// Reads the secret `reference` names: `file:PATH` (relative paths from `base_dir`) or
/// `env:VAR`. Trailing newlines of a file are kept; callers trim where the format allows.
pub fn resolve_in(reference: &str, base_dir: &Path) -> Result<Zeroizing<String>, SecretError> {
    let err = |reason: String| SecretError::Unreadable {
        reference: reference.to_string(),
        reason,
    };
    if let Some(path) = reference.strip_prefix("file:") {
        let path = base_dir.join(path);
        std::fs::read_to_string(&path)
            .map(Zeroizing::new)
            .map_err(|e| err(format!("cannot read {}: {e}", path.display())))
    } else if let Some(var) = reference.strip_prefix("env:") {
        std::env::var(var)
            .map(Zeroizing::new)
            .map_err(|_| err(format!("environment variable {var} is not set")))
    } else {
        Err(err(
            "a secret reference is `file:PATH` or `env:VAR` (secrets never go in the config itself)"
                .to_string(),
        ))
    }
}

/// [`resolve_in`] with relative paths taken from the working directory.
pub fn resolve(reference: &str) -> Result<Zeroizing<String>, SecretError> {
    resolve_in(reference, Path::new(""))
}

/// Reads the secret setting `what` (say, `password` of a bus URL): it must be a reference.
pub fn resolve_setting(what: &str, value: &str) -> Result<Zeroizing<String>, SecretError> {
    if !is_reference(value) {
        return Err(SecretError::NotAReference {
            what: what.to_string(),
        });
    }
    resolve(value)
}

/// Does a setting called `name` hold a secret? Passwords, tokens, secrets, private keys and seeds,
/// in any of the spellings brokers use (`password`, `sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `token`, `nkey`, `seed`, `key` as in a private key, …).
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let words: Vec<&str> = lower.split(['.', '_', '-']).collect();
    words.iter().any(|w| {
        matches!(
            *w,
            "password"
                | "passwd"
                | "pass"
                | "pwd"
                | "secret"
                | "token"
                | "nkey"
                | "seed"
                | "key"
                | "pem"
                | "credentials"
                | "jaas"
        )
    }) || lower.contains("password")
        || lower.contains("secret")
        || lower.contains("token")
}

/// `text` (a URL, or a setting that may look like one) with every secret replaced by
/// [`REDACTED`]: the password of the user-info part, and the value of each query parameter whose
/// name [`is_secret_name`] unless it is a reference. Text that does not parse as a URL is
/// redacted by shape, so a mistyped URL leaks nothing either.
pub fn redact(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(url) if url.has_host() || url.query().is_some() || url.password().is_some() => {
            redact_parsed(url)
        }
        _ => redact_by_shape(text),
    }
}

fn redact_parsed(mut url: url::Url) -> String {
    if url.password().is_some() {
        let _ = url.set_password(Some(REDACTED));
    } else if !url.username().is_empty()
        && !url
            .query_pairs()
            .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        // `nats://TOKEN@host`: a user part with no password anywhere may be a token itself.
        let _ = url.set_username(REDACTED);
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_name(&k) && !is_reference(&v) {
                    REDACTED.to_string()
                } else if v.contains('@') {
                    // A URL inside a parameter (an endpoint) with a user-info of its own.
                    redact(&v)
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// For text that is not a URL: `scheme://user:secret@` loses the secret, and `name=value` pairs
/// with a secret name lose their value.
fn redact_by_shape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // Every `user:secret@` (and a lone `scheme://token@`) loses its secret.
    while let Some(at) = rest.find('@') {
        let before = &rest[..at];
        let start = before
            .rfind(['/', ' ', '\t', '"', '\'', '(', '<', ','])
            .map_or(0, |i| i + 1);
        let userinfo = &before[start..];
        out.push_str(&before[..start]);
        match userinfo.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
            }
            None if before[..start].ends_with("//") && !userinfo.is_empty() => {
                out.push_str(REDACTED)
            }
            None => out.push_str(userinfo),
        }
        out.push('@');
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    // Each `name=value` piece between separators loses a secret value; the separators stay.
    let separators: Vec<char> = out
        .chars()
        .filter(|c| matches!(c, '&' | '?' | ';' | ' ' | ','))
        .collect();
    let mut rebuilt = String::with_capacity(out.len());
    let mut pieces = Vec::new();
    for piece in out.split(['&', '?', ';', ' ', ',']) {
        match piece.split_once('=') {
            Some((name, value)) if is_secret_name(name) && !is_reference(value) => {
                pieces.push(format!("{name}={REDACTED}"))
            }
            _ => pieces.push(piece.to_string()),
        }
    }
    for (i, piece) in pieces.iter().enumerate() {
        rebuilt.push_str(piece);
        if let Some(sep) = separators.get(i) {
            rebuilt.push(*sep);
        }
    }
    rebuilt
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-Pa55";

    fn assert_clean(redacted: &str) {
        assert!(!redacted.contains(SECRET), "leaked: {redacted}");
    }

    #[test]
    fn passwords_in_user_info_are_redacted_for_every_scheme() {
        for url in [
            format!("amqp://millrace:{SECRET}@rabbit:5672/%2f"),
            format!("amqps://millrace:{SECRET}@rabbit:5671/prod"),
            format!("nats://millrace:{SECRET}@nats:4222"),
            format!("kafka://millrace:{SECRET}@broker:9092"),
            format!("s3://user:{SECRET}@bucket/prefix"),
        ] {
            let r = redact(&url);
            assert_clean(&r);
            assert!(
                r.contains("millrace:REDACTED@") || r.contains("user:REDACTED@"),
                "{r}"
            );
        }
    }

    #[test]
    fn a_lone_user_part_is_taken_for_a_token_unless_a_password_is_given_elsewhere() {
        let r = redact(&format!("nats://{SECRET}@127.0.0.1:4222"));
        assert_clean(&r);
        let r = redact("amqps://millrace@mq.example:5671/prod?password=env:AMQP_PASSWORD");
        assert!(r.contains("millrace@"), "{r}");
    }

    #[test]
    fn secret_query_parameters_are_redacted_and_references_kept() {
        let url = format!(
            "kafka://b:9092?security.protocol=SASL_SSL&sasl.username=u&sasl.password={SECRET}\
             &ssl.key.password={SECRET}&token={SECRET}&nkey={SECRET}&partitions=3\
             &sasl.oauthbearer.client.secret={SECRET}"
        );
        let r = redact(&url);
        assert_clean(&r);
        assert!(r.contains("sasl.username=u"), "{r}");
        assert!(r.contains("partitions=3"), "{r}");
        assert!(r.contains("security.protocol=SASL_SSL"), "{r}");
        let r = redact("nats://n:4222?token=env:NATS_TOKEN&creds=/etc/nats/user.creds");
        assert!(
            r.contains("token=env%3ANATS_TOKEN") || r.contains("token=env:NATS_TOKEN"),
            "{r}"
        );
        assert!(r.contains("user.creds"), "{r}");
        // A URL inside a parameter loses its own secrets, parsed or not.
        for url in [
            format!("sns-sqs://us-east-1?endpoint=http://u:{SECRET}@moto:5000"),
            format!("sns-sqs://us-east-1?endpoint=http://u:{SECRET}@[moto"),
            format!("pubsub://p?emulator=u:{SECRET}@host:8085"),
        ] {
            let r = redact(&url);
            assert_clean(&r);
            assert!(r.contains("REDACTED"), "{r}");
        }
    }

    #[test]
    fn text_that_is_not_a_url_is_redacted_by_shape() {
        for text in [
            format!("nats//millrace:{SECRET}@host"),
            format!("kafka://millrace:{SECRET}@[bad host:9092"),
            format!("amqp://millrace:{SECRET}@host:notaport/%2f"),
            format!("kafka://{SECRET}@[::1"),
            format!("host:9092 sasl.password={SECRET} partitions=2"),
        ] {
            let r = redact(&text);
            assert_clean(&r);
        }
        assert_eq!(redact("just text"), "just text");
    }

    #[test]
    fn a_url_without_secrets_is_unchanged() {
        assert_eq!(
            redact("nats://127.0.0.1:4222"),
            url::Url::parse("nats://127.0.0.1:4222")
                .unwrap()
                .to_string()
        );
        assert_eq!(
            redact("file:///srv/millrace/alpha"),
            "file:///srv/millrace/alpha"
        );
    }

    #[test]
    fn references_resolve_from_files_and_the_environment_and_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), SECRET).unwrap();
        assert_eq!(resolve_in("file:pw", dir.path()).unwrap().as_str(), SECRET);
        let err = resolve("env:MILLRACE_TEST_SURELY_UNSET_42")
            .unwrap_err()
            .to_string();
        assert!(err.contains("MILLRACE_TEST_SURELY_UNSET_42"), "{err}");
        let err = resolve_setting("sasl.password", SECRET)
            .unwrap_err()
            .to_string();
        assert_clean(&err);
        assert!(err.contains("sasl.password"), "{err}");
    }

    #[test]
    fn secret_names_are_recognised() {
        for name in [
            "password",
            "sasl.password",
            "ssl.key.password",
            "sasl.oauthbearer.client.secret",
            "token",
            "nkey",
            "seed",
            "ssl.key.pem",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "user",
            "sasl.username",
            "partitions",
            "security.protocol",
            "creds",
            "cacert",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
