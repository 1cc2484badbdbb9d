//! The command line: `check-config`, configuration errors and exit codes,
//! `hash-key`, `demo`.

use std::process::Stdio;
use std::time::Duration;

use crate::helpers::process::*;
use crate::helpers::*;

#[tokio::test]
async fn check_config_redacts_secrets_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\npartner_key = \"{PARTNER_KEY}\"\n{}",
            clients_toml()
        ),
    )
    .unwrap();

    let output = command()
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();

    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("partner_key = \"[REDACTED]\""), "{stdout}");
    assert!(stdout.contains("name = \"reader\""));
    assert!(!stdout.contains(PARTNER_KEY));
    assert!(!String::from_utf8_lossy(&output.stderr).contains(PARTNER_KEY));
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let valid = format!("[upstream]\npartner_key = \"{PARTNER_KEY}\"\n");
    // (case, config file, environment, the key the message must name)
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 17] = [
        (
            "service accounts without an issuer",
            format!(
                "{valid}[[clients]]\nname = \"sa\"\nservice_accounts = [\"inbox:app\"]\nscopes = [\"tokens:read\"]\n"
            ),
            &[],
            "auth.kubernetes.issuer",
        ),
        (
            "a malformed service account",
            format!(
                "{valid}[auth.kubernetes]\nissuer = \"https://k\"\njwks_file = \"/nonexistent\"\n[[clients]]\nname = \"sa\"\nservice_accounts = [\"Inbox/App\"]\nscopes = [\"tokens:read\"]\n"
            ),
            &[],
            "clients[0].service_accounts[0]",
        ),
        (
            "a JWKS URL without TLS",
            format!(
                "{valid}{}[auth.kubernetes]\nissuer = \"https://k\"\njwks_url = \"http://kubernetes.default.svc/openid/v1/jwks\"\n",
                clients_toml()
            ),
            &[],
            "auth.kubernetes.jwks_url",
        ),
        (
            "an unreadable JWKS file",
            format!(
                "{valid}{}[auth.kubernetes]\nissuer = \"https://k\"\njwks_file = \"/nonexistent/jwks.json\"\n",
                clients_toml()
            ),
            &[],
            "auth.kubernetes.jwks_file",
        ),
        (
            "plain http to a remote vendor",
            format!(
                "{valid}base_url = \"http://vendor.example:80\"\n{}",
                clients_toml()
            ),
            &[],
            "upstream.base_url",
        ),
        (
            "anonymous beside clients",
            format!(
                "{valid}[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n{}",
                clients_toml()
            ),
            &[],
            "auth.allow_anonymous",
        ),
        (
            "anonymous off loopback",
            format!("{valid}[auth]\nallow_anonymous = true\n"),
            &[("TOKEN_BROKER__SERVER__LISTEN", "0.0.0.0:0")],
            "auth.allow_anonymous",
        ),
        (
            "a shared cache without an encryption key",
            format!(
                "{valid}{}[cache]\nredis_url = \"redis://127.0.0.1:6379\"\n",
                clients_toml()
            ),
            &[],
            "cache.encryption_key_file",
        ),
        (
            "an unreadable encryption key",
            format!(
                "{valid}{}[cache]\nredis_url = \"redis://127.0.0.1:6379\"\nencryption_key_file = \"/nonexistent/k\"\n",
                clients_toml()
            ),
            &[],
            "cache.encryption_key_file",
        ),
        (
            "missing audit key file",
            format!(
                "{valid}[audit]\nhash_key_file = \"/nonexistent/audit-key\"\n{}",
                clients_toml()
            ),
            &[],
            "audit.hash_key_file",
        ),
        (
            "unknown key",
            format!("{valid}{}[cache]\nttl_seconds = 3\n", clients_toml()),
            &[],
            "ttl_seconds",
        ),
        (
            "bad duration",
            format!("{valid}{}[cache]\nttl = \"ten minutes\"\n", clients_toml()),
            &[],
            "cache.ttl",
        ),
        (
            "no partner key",
            clients_toml(),
            &[],
            "upstream.partner_key",
        ),
        ("no clients", valid.clone(), &[], "clients"),
        (
            "bad env override",
            format!("{valid}{}", clients_toml()),
            &[("TOKEN_BROKER__UPSTREAM__TIMEOUT", "soon")],
            "upstream.timeout",
        ),
        (
            "bad hash",
            format!(
                "{valid}[[clients]]\nname = \"x\"\nkey_sha256 = \"abc\"\nscopes = [\"tokens:read\"]\n"
            ),
            &[],
            "clients[0].key_sha256",
        ),
        (
            "missing key file",
            format!(
                "[upstream]\npartner_key_file = \"/nonexistent/key\"\n{}",
                clients_toml()
            ),
            &[],
            "upstream.partner_key_file",
        ),
    ];
    for (case, text, env, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        for subcommand in ["serve", "check-config"] {
            let output = command()
                .arg(subcommand)
                .arg("--config")
                .arg(&path)
                .envs(env.iter().copied())
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{case} ({subcommand}): {stderr}"
            );
            assert!(
                stderr.contains(key),
                "{case} ({subcommand}): {stderr:?} should name {key}"
            );
            assert!(!stderr.contains(PARTNER_KEY));
        }
    }
}

#[tokio::test]
async fn a_configuration_line_holding_a_secret_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    let secret = "pk-inline-secret-4f7a";
    std::fs::write(
        &path,
        format!("[upstream]\npartner_key = \"{secret}\nbase_url = 1\n"),
    )
    .unwrap();
    for subcommand in ["serve", "check-config"] {
        let output = command()
            .arg(subcommand)
            .arg("--config")
            .arg(&path)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("line 2"), "{stderr}");
        assert!(
            !stderr.contains(secret) && !String::from_utf8_lossy(&output.stdout).contains(secret)
        );
    }
}

#[tokio::test]
async fn the_config_file_can_come_from_token_broker_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[cache]\nttl = \"nope\"\n").unwrap();

    let output = command()
        .arg("check-config")
        .env("TOKEN_BROKER_CONFIG", &path)
        .output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cache.ttl"));
}

async fn hash_key(args: &[&str], stdin_text: &[u8]) -> std::process::Output {
    let mut child = command()
        .arg("hash-key")
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, stdin_text)
        .await
        .unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

#[tokio::test]
async fn hash_key_prints_the_config_line() {
    let key = "caller-key-0123456789-0123456789-x";
    let output = hash_key(&[], format!("{key}\n").as_bytes()).await;

    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!(
            "key_sha256 = \"{}\"\n",
            token_broker::config::KeyDigest::of_key(key)
        )
    );
}

#[tokio::test]
async fn hash_key_refuses_a_short_key_and_generates_a_strong_one() {
    let short = hash_key(&[], b"test\n").await;
    assert_ne!(short.status.code(), Some(0));
    assert!(short.stdout.is_empty());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32 characters"));

    let generated = hash_key(&["--generate"], b"").await;
    assert_eq!(generated.status.code(), Some(0));
    let text = String::from_utf8(generated.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.rsplit_once(": ").map(|(_, k)| k.to_owned()))
        .expect("the key is printed");
    let random = key
        .strip_prefix("tbk_")
        .expect("a generated key carries the prefix");
    assert!(
        random.len() == 43 && random.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{key}"
    );
    assert!(text.contains(&format!(
        "key_sha256 = \"{}\"",
        token_broker::config::KeyDigest::of_key(&key)
    )));
    let again = hash_key(&["--generate"], b"").await;
    assert_ne!(
        String::from_utf8(again.stdout).unwrap(),
        text,
        "random each time"
    );
}

#[tokio::test]
async fn a_generated_key_pasted_as_its_digest_is_refused_saying_so() {
    let generated = hash_key(&["--generate"], b"").await;
    let text = String::from_utf8(generated.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.rsplit_once(": ").map(|(_, k)| k.to_owned()))
        .unwrap();
    // hash-key still takes any key of 32 characters or more, prefixed or not.
    let digest = hash_key(&[], key.as_bytes()).await;
    assert_eq!(digest.status.code(), Some(0));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pasted.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\npartner_key = \"{PARTNER_KEY}\"\n[server]\nlisten = \"127.0.0.1:8080\"\n\
             [[clients]]\nname = \"app\"\nkey_sha256 = \"{key}\"\nscopes = [\"tokens:read\"]\n"
        ),
    )
    .unwrap();
    let output = command()
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("clients[0].key_sha256"), "{stderr}");
    assert!(stderr.contains("a caller key, not its digest"), "{stderr}");
    assert!(
        !stderr.contains(&key),
        "the pasted key is never printed: {stderr}"
    );
}

/// The first line `demo` logs, run under `script` so its stdout is a terminal.
async fn demo_log_line_on_a_terminal(env: &[(&str, &str)]) -> String {
    let binary = env!("CARGO_BIN_EXE_token-broker");
    let mut child = tokio::process::Command::new("script")
        .args(["-qefc", &format!("{binary} demo"), "/dev/null"])
        .env_remove("TOKEN_BROKER_CONFIG")
        .env("TOKEN_BROKER__SERVER__LISTEN", "127.0.0.1:0")
        .env("TOKEN_BROKER__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("script runs");
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("listening") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("demo logs that it listens");
    let _ = child.kill().await;
    line
}

#[tokio::test]
async fn demo_writes_pretty_logs_to_a_terminal_and_json_when_told() {
    let pretty = demo_log_line_on_a_terminal(&[]).await;
    assert!(!pretty.trim_start().starts_with('{'), "{pretty:?}");
    assert!(pretty.contains("INFO"), "{pretty:?}");
    let json = demo_log_line_on_a_terminal(&[("TOKEN_BROKER__LOG__FORMAT", "json")]).await;
    let event: serde_json::Value =
        serde_json::from_str(json.trim().trim_start_matches(|c: char| c != '{')).expect("JSON");
    assert_eq!(event["message"], "listening");
}

#[tokio::test]
async fn demo_prints_a_curl_line_that_returns_a_token() {
    let mut broker = Running::start({
        let mut c = command();
        c.arg("demo");
        c
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let curl = loop {
        if let Some(line) = broker
            .output()
            .lines()
            .find(|l| l.trim_start().starts_with("curl "))
        {
            break line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no curl line: {}",
            broker.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let key = curl
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_owned();
    let url = curl.split('\'').nth(3).unwrap().to_owned();
    let response = get(&reqwest::Client::new(), url, &key).await;
    assert!(
        broker.output().contains("Listening on loopback only"),
        "the demo says where it listens"
    );

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["email"], "alice@example.com");
    assert_eq!(body["active"], true);
    assert!(body["token"].as_str().unwrap().len() > 8);
    broker.stop().await;
}
