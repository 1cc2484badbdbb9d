//! Loading, validation and redaction, end to end through `Settings::load`.

use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;

const CLIENT: &str = r#"
    [upstream]
    partner_key = "pk-secret"
    [[clients]]
    name = "app"
    key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    scopes = ["tokens:read"]
"#;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load(&Sources {
        layers: vec![toml.to_owned()],
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Sources::default()
    })
}

fn error_key(result: Result<Settings, ConfigError>) -> String {
    match result {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

#[test]
fn defaults_match_the_documented_values() {
    let s = load("", &[]).unwrap();
    assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(s.server.admin_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(s.server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(
        s.upstream.base_url.as_str(),
        "https://api.v7.botpenguin.com/"
    );
    assert_eq!(s.upstream.timeout, Duration::from_secs(5));
    assert_eq!(s.upstream.connect_timeout, Duration::from_secs(2));
    assert_eq!(s.cache.ttl, Duration::from_secs(600));
    assert_eq!(s.cache.max_entries, 100_000);
    assert_eq!(s.cache.refresh_ahead, 0.8);
    assert_eq!(s.cache.stale_if_error, Duration::from_secs(3600));
    assert_eq!(s.cache.negative_ttl, Duration::from_secs(30));
    assert_eq!(s.upstream.max_in_flight, 32);
    assert_eq!(s.upstream.max_retries, 2);
    assert_eq!(s.upstream.circuit_failures, 5);
    assert_eq!(s.upstream.circuit_cooldown, Duration::from_secs(10));
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.log.queue_bytes, 16 * 1024 * 1024);
    assert!(!s.auth.allow_anonymous);
    assert!(s.clients.is_empty());
}

#[test]
fn environment_overrides_file_with_double_underscores() {
    let s = load(
        CLIENT,
        &[
            ("TOKEN_BROKER__UPSTREAM__BASE_URL", "http://127.0.0.1:1"),
            ("TOKEN_BROKER__CACHE__TTL", "250ms"),
            ("TOKEN_BROKER__CACHE__MAX_ENTRIES", "7"),
        ],
    )
    .unwrap();
    assert_eq!(s.upstream.base_url.as_str(), "http://127.0.0.1:1/");
    assert_eq!(s.cache.ttl, Duration::from_millis(250));
    assert_eq!(s.cache.max_entries, 7);
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let err = load("[cache]\nttl_typo = \"1m\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache") && err.contains("ttl_typo"), "{err}");
    let err = load("", &[("TOKEN_BROKER__SERVER__PORT", "1")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("server") && err.contains("port"), "{err}");
}

#[test]
fn bad_values_name_their_key() {
    assert_eq!(
        error_key(load("[cache]\nttl = \"soon\"\n", &[])),
        "cache.ttl"
    );
    assert_eq!(error_key(load("[cache]\nttl = \"0s\"\n", &[])), "cache.ttl");
    assert_eq!(
        error_key(load("[server]\nlisten = \"nowhere\"\n", &[])),
        "server.listen"
    );
    assert_eq!(
        error_key(load("[log]\nformat = \"xml\"\n", &[])),
        "log.format"
    );
    assert_eq!(error_key(load("[log]\nlevel = \"=[\"\n", &[])), "log.level");
    assert_eq!(
        error_key(load("[log]\nqueue_bytes = 4096\n", &[])),
        "log.queue_bytes"
    );
    assert_eq!(
        error_key(load("[upstream]\nbase_url = \"ftp://x\"\n", &[])),
        "upstream.base_url"
    );
    let bad_hash = CLIENT.replace("9f86d0", "zz86d0");
    assert_eq!(error_key(load(&bad_hash, &[])), "clients[0].key_sha256");
    let bad_domain = format!("{CLIENT}allowed_email_domains = [\"example.com\", \"@x.com\"]\n");
    assert_eq!(
        error_key(load(&bad_domain, &[])),
        "clients[0].allowed_email_domains[1]"
    );
    let bad_type = format!("{CLIENT}allowed_types = [\"ADMIN\"]\n");
    assert!(error_key(load(&bad_type, &[])).starts_with("clients[0].allowed_types"));
    let no_rate = format!("{CLIENT}rate_limit_per_minute = 0\n");
    assert_eq!(
        error_key(load(&no_rate, &[])),
        "clients[0].rate_limit_per_minute"
    );
    let bad_scope = CLIENT.replace("tokens:read", "tokens:write");
    assert!(error_key(load(&bad_scope, &[])).starts_with("clients[0].scopes"));
}

#[test]
fn a_shared_cache_needs_an_encryption_key_and_a_redis_url() {
    assert_eq!(
        error_key(load(
            "[cache]\nredis_url = \"redis://127.0.0.1:6379\"\n",
            &[]
        )),
        "cache.encryption_key_file"
    );
    assert_eq!(
        error_key(load(
            "[cache]\nredis_url = \"http://127.0.0.1:6379\"\nencryption_key_file = \"/k\"\n",
            &[]
        )),
        "cache.redis_url"
    );
    let s = load(
        "[cache]\nredis_url = \"rediss://:hunter2@redis.example:6380\"\nencryption_key_file = \"/k\"\n",
        &[],
    )
    .unwrap();
    let shown = s.redacted_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("rediss://:%5BREDACTED%5D@redis.example:6380"),
        "{shown}"
    );
}

#[test]
fn the_three_redis_forms_exclude_each_other_and_name_what_is_wrong() {
    let key = "encryption_key_file = \"/k\"\n";
    let cases = [
        (
            "redis_url = \"redis://r:6379\"\nredis_cluster_nodes = [\"n:6379\"]\n",
            "cache.redis_url",
        ),
        (
            "redis_sentinels = [\"s:26379\"]\n",
            "cache.redis_sentinel_master",
        ),
        (
            "redis_sentinel_master = \"mymaster\"\n",
            "cache.redis_sentinel_master",
        ),
        (
            "redis_cluster_nodes = [\"no-port\"]\n",
            "cache.redis_cluster_nodes",
        ),
        (
            "redis_sentinels = [\"s:0\"]\nredis_sentinel_master = \"m\"\n",
            "cache.redis_sentinels",
        ),
        (
            "redis_url = \"redis://r:6379\"\nredis_tls = true\n",
            "cache.redis_tls",
        ),
        ("redis_min_replicas = 1\n", "cache.redis_min_replicas"),
    ];
    for (toml, expected) in cases {
        let with_key = format!("[cache]\n{key}{toml}");
        assert_eq!(error_key(load(&with_key, &[])), expected, "{toml}");
    }
    assert_eq!(
        error_key(load("[cache]\nredis_cluster_nodes = [\"n:6379\"]\n", &[])),
        "cache.encryption_key_file"
    );
    let sentinel = load(
        &format!(
            "[cache]\n{key}redis_sentinels = [\"s1:26379\", \"[::1]:26379\"]\nredis_sentinel_master = \"mymaster\"\nredis_tls = true\nredis_min_replicas = 1\n"
        ),
        &[],
    )
    .unwrap();
    assert!(matches!(
        sentinel.cache.redis_form(),
        Some(RedisForm::Sentinel { sentinels, master: "mymaster" }) if sentinels.len() == 2
    ));
    assert!(load("", &[]).unwrap().cache.redis_form().is_none());
}

#[test]
fn list_keys_are_read_from_the_environment_as_comma_separated_values() {
    let s = load(
        CLIENT,
        &[
            (
                "TOKEN_BROKER__CACHE__REDIS_CLUSTER_NODES",
                "a:6379, b:6379,c:6379",
            ),
            ("TOKEN_BROKER__CACHE__ENCRYPTION_KEY_FILE", "/k"),
            (
                "TOKEN_BROKER__AUTH__KUBERNETES__AUDIENCES",
                "token-broker,other",
            ),
            // Any other value stays a string, however it looks.
            ("TOKEN_BROKER__UPSTREAM__PARTNER_KEY", "0012"),
        ],
    )
    .unwrap();
    assert_eq!(s.cache.redis_cluster_nodes, ["a:6379", "b:6379", "c:6379"]);
    assert_eq!(s.auth.kubernetes.audiences, ["token-broker", "other"]);
    assert_eq!(
        s.upstream.partner_key.as_ref().unwrap().expose_secret(),
        "0012"
    );
}

#[test]
fn plain_http_to_the_vendor_needs_loopback_or_an_explicit_allowance() {
    for loopback in [
        "http://127.0.0.1:8081",
        "http://localhost:8081",
        "http://[::1]:8081",
    ] {
        assert!(load(&format!("[upstream]\nbase_url = \"{loopback}\"\n"), &[]).is_ok());
    }
    let remote = "[upstream]\nbase_url = \"http://simulator:8081\"\n";
    assert_eq!(error_key(load(remote, &[])), "upstream.base_url");
    assert!(load(&format!("{remote}allow_insecure_http = true\n"), &[]).is_ok());
}

#[test]
fn anonymous_access_is_refused_with_clients_or_off_loopback() {
    let anonymous = "[auth]\nallow_anonymous = true\n";
    assert_eq!(
        error_key(load(&format!("{anonymous}{CLIENT}"), &[])),
        "auth.allow_anonymous"
    );
    assert_eq!(error_key(load(anonymous, &[])), "auth.allow_anonymous");
    let loopback = format!("[server]\nlisten = \"127.0.0.1:8080\"\n{anonymous}");
    assert!(load(&loopback, &[]).is_ok());
    assert_eq!(
        error_key(load(
            &loopback,
            &[("TOKEN_BROKER__SERVER__LISTEN", "0.0.0.0:8080")]
        )),
        "auth.allow_anonymous"
    );
}

#[test]
fn configuration_errors_never_print_the_offending_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[upstream]\npartner_key = \"pk-super-secret-value\nbase_url = 3\n",
    )
    .unwrap();
    let err = Settings::load(&Sources {
        file: Some(path),
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(!err.contains("pk-super-secret"), "{err}");
    assert!(err.contains("line 2"), "{err}");

    let err = load("[cache]\nmax_entries = \"pk-wrong-place-secret\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("cache.max_entries"), "{err}");
    assert!(!err.contains("pk-wrong-place-secret"), "{err}");
}

#[test]
fn serving_needs_a_partner_key_and_a_client() {
    let s = load("", &[]).unwrap();
    assert_eq!(
        error_key(s.require_serving().map(|_| s.clone())),
        "upstream.partner_key_file"
    );
    let s = load("[upstream]\npartner_key = \"k\"\n", &[]).unwrap();
    assert_eq!(error_key(s.require_serving().map(|_| s.clone())), "clients");
    let s = load(
        "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\npartner_key = \"k\"\n[auth]\nallow_anonymous = true\n",
        &[],
    )
    .unwrap();
    assert!(s.require_serving().is_ok());
    let loopback = format!("{CLIENT}\n[server]\nlisten = \"127.0.0.1:8080\"\n");
    assert!(load(&loopback, &[]).unwrap().require_serving().is_ok());
}

#[test]
fn serving_off_loopback_needs_a_certificate_or_plaintext_said_out_loud() {
    let s = load(CLIENT, &[]).unwrap();
    let err = s.require_serving().unwrap_err().to_string();
    assert!(err.starts_with("server.tls_cert_file: "), "{err}");
    assert!(
        err.contains("0.0.0.0:8080") && err.contains("server.plaintext"),
        "{err}"
    );
    let plaintext = load(CLIENT, &[("TOKEN_BROKER__SERVER__PLAINTEXT", "true")]).unwrap();
    assert!(plaintext.require_serving().is_ok());
    let tls = load(
        CLIENT,
        &[
            ("TOKEN_BROKER__SERVER__TLS_CERT_FILE", "/tls/tls.crt"),
            ("TOKEN_BROKER__SERVER__TLS_KEY_FILE", "/tls/tls.key"),
        ],
    )
    .unwrap();
    assert!(tls.require_serving().is_ok());
    assert_eq!(
        tls.server.tls().unwrap().key,
        std::path::Path::new("/tls/tls.key")
    );
}

#[test]
fn tls_settings_that_cannot_work_together_name_the_key() {
    let cases: [(&str, &[(&str, &str)]); 5] = [
        (
            "server.tls_key_file",
            &[("TOKEN_BROKER__SERVER__TLS_CERT_FILE", "/c")],
        ),
        (
            "server.tls_cert_file",
            &[("TOKEN_BROKER__SERVER__TLS_KEY_FILE", "/k")],
        ),
        (
            "server.tls_client_ca_file",
            &[("TOKEN_BROKER__SERVER__TLS_CLIENT_CA_FILE", "/ca")],
        ),
        (
            "server.tls_client_auth",
            &[("TOKEN_BROKER__SERVER__TLS_CLIENT_AUTH", "required")],
        ),
        (
            "server.plaintext",
            &[
                ("TOKEN_BROKER__SERVER__TLS_CERT_FILE", "/c"),
                ("TOKEN_BROKER__SERVER__TLS_KEY_FILE", "/k"),
                ("TOKEN_BROKER__SERVER__PLAINTEXT", "true"),
            ],
        ),
    ];
    for (key, env) in cases {
        assert_eq!(error_key(load(CLIENT, env)), key, "{env:?}");
    }
    let spiffe = format!("{CLIENT}spiffe_ids = [\"spiffe://cluster.local/ns/a/sa/b\"]\n");
    assert_eq!(error_key(load(&spiffe, &[])), "clients[0].spiffe_ids");
}

#[test]
fn partner_key_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, "pk-from-file\n").unwrap();
    let toml = format!(
        "[upstream]\npartner_key_file = {:?}\n",
        path.display().to_string()
    );
    let s = load(&toml, &[]).unwrap();
    assert_eq!(
        s.upstream.read_partner_key().unwrap().expose_secret(),
        "pk-from-file"
    );
    std::fs::write(&path, "  \n").unwrap();
    assert!(s.upstream.read_partner_key().is_err());
}

#[test]
fn redacted_output_hides_the_partner_key() {
    let s = load(CLIENT, &[]).unwrap();
    let text = s.redacted_toml();
    assert!(!text.contains("pk-secret"));
    assert!(text.contains("[REDACTED]"));
    assert!(text.contains("ttl = \"10m\""));
    assert!(!format!("{s:?}").contains("pk-secret"));
}

/// Words of the code that must never reach someone editing a config file.
const INTERNAL_WORDS: [&str; 14] = [
    "serde",
    "struct",
    "variant",
    "enum ",
    "u32",
    "u64",
    "usize",
    "i64",
    "sequence",
    "invalid type",
    "Option",
    "Vec<",
    "Duration",
    "humantime",
];

fn assert_plain(message: &str) {
    for word in INTERNAL_WORDS {
        assert!(!message.contains(word), "{word:?} in {message:?}");
    }
}

#[test]
fn a_bad_duration_names_the_key_shows_the_value_and_the_format() {
    let keys = [
        "server.shutdown_grace",
        "server.header_read_timeout",
        "upstream.timeout",
        "upstream.connect_timeout",
        "upstream.circuit_cooldown",
        "cache.ttl",
        "cache.stale_if_error",
        "cache.negative_ttl",
        "cache.revalidate_min_interval",
        "cache.redis_timeout",
        "auth.kubernetes.jwks_refresh",
        "auth.kubernetes.max_token_lifetime",
    ];
    for key in keys {
        let (section, field) = key.rsplit_once('.').unwrap();
        for (value, shown) in [("\"ten minutes\"", "`ten minutes`"), ("600", "`600`")] {
            let err = load(&format!("[{section}]\n{field} = {value}\n"), &[]).unwrap_err();
            let message = err.to_string();
            assert!(message.starts_with(&format!("{key}: ")), "{message}");
            assert!(message.contains(shown), "the value is shown: {message}");
            assert!(
                message.contains("`10m`") && message.contains("ms, s, m, h, d"),
                "{message}"
            );
            assert_plain(&message);
        }
    }
    let from_env = load("", &[("TOKEN_BROKER__CACHE__TTL", "10 mins please")]).unwrap_err();
    assert!(
        from_env.to_string().contains("`10 mins please`"),
        "{from_env}"
    );
}

#[test]
fn a_bad_enum_value_names_a_well_formed_key_and_lists_the_allowed_values() {
    let client = "[[clients]]\nname = \"app\"\nkey_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
    let cases = [
        (
            format!("{client}scopes = [\"tokens:read\", \"token:sekret\"]\n"),
            "clients[0].scopes[1]",
            &[
                "`tokens:read`",
                "`customer_tokens:read`",
                "`tokens:invalidate`",
            ][..],
        ),
        (
            format!("{client}scopes = [\"tokens:read\"]\nallowed_types = [\"token:sekret\"]\n"),
            "clients[0].allowed_types[0]",
            &["`AGENT`", "`CUSTOM_USER`", "`CUSTOMER`"][..],
        ),
        (
            "[log]\nformat = \"token:sekret\"\n".to_owned(),
            "log.format",
            &["`json`", "`pretty`"][..],
        ),
        (
            "[server]\ntls_client_auth = \"token:sekret\"\n".to_owned(),
            "server.tls_client_auth",
            &["`optional`", "`required`"][..],
        ),
    ];
    for (toml, key, allowed) in cases {
        let message = load(&toml, &[]).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{key}: must be one of ")),
            "{message}"
        );
        for value in allowed {
            assert!(message.contains(value), "{value} in {message}");
        }
        assert!(
            !message.contains("sekret"),
            "the refused value is not shown: {message}"
        );
        assert_plain(&message);
    }
}

#[test]
fn other_mistakes_are_told_in_the_words_of_the_file() {
    let cases = [
        (
            "[server]\nmax_connections = \"many\"\n",
            "server.max_connections",
            "a whole number",
        ),
        (
            "[server]\nmax_connections = -1\n",
            "server.max_connections",
            "a whole number",
        ),
        (
            "[upstream]\nmax_retries = \"two\"\n",
            "upstream.max_retries",
            "a whole number",
        ),
        (
            "[auth]\nallow_anonymous = [\"yes\"]\n",
            "auth.allow_anonymous",
            "`true` or `false`",
        ),
        (
            "[[clients]]\nname = \"a\"\nscopes = \"tokens:read\"\n",
            "clients[0].scopes",
            "a list",
        ),
        (
            "[[clients]]\nscopes = [\"tokens:read\"]\n",
            "clients[0]",
            "needs the key `name`",
        ),
        (
            "[cache]\nttll = \"1m\"\n",
            "cache.ttll",
            "is not a known key (unknown keys are refused, so a typo is caught); the keys here are `ttl`",
        ),
    ];
    for (toml, key, says) in cases {
        let message = match load(toml, &[]) {
            Ok(_) => panic!("{toml} was accepted"),
            Err(err) => err.to_string(),
        };
        assert!(
            message.starts_with(&format!("{key}: ")),
            "{toml}: {message}"
        );
        assert!(message.contains(says), "{toml}: {message}");
        assert_plain(&message);
    }
}
