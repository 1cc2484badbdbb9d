//! The container image's contract, without Docker: the binary runs as an
//! unprivileged UID, in a read-only working directory, with no HOME and only
//! the mounted config and Secret files (the Kubernetes `..data` layout),
//! becomes ready and hands out a token.
//!
//! Uses `TOKEN_BROKER_BINARY` when set (CI points it at the release build),
//! else the binary this test run built.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::helpers::process::{Running, upstream};
use crate::helpers::*;

/// The image's fixed user (distroless "nonroot"), as the manifests pin it.
const IMAGE_UID: &str = "65532";

fn binary() -> String {
    std::env::var("TOKEN_BROKER_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_token-broker").to_owned())
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn the_binary_runs_unprivileged_read_only_with_only_its_mounted_files() {
    let (_sim, upstream) = upstream().await;
    let root = tempfile::tempdir().unwrap();
    set_mode(root.path(), 0o755);
    // The ConfigMap: the deployed configuration plus one caller for this test.
    let config_dir = root.path().join("etc-token-broker");
    std::fs::create_dir(&config_dir).unwrap();
    let deployed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/base/token-broker.toml"
    ))
    .unwrap();
    let config = config_dir.join("token-broker.toml");
    std::fs::write(&config, format!("{deployed}\n{}", clients_toml())).unwrap();
    // The Secret, laid out as kubelet mounts it.
    let secrets = root.path().join("secrets");
    let data = secrets.join("..2026_11_26_00_00_00.000000001");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("partner-key"), PARTNER_KEY).unwrap();
    std::fs::write(
        data.join("audit-hash-key"),
        "image-contract-audit-key-000001",
    )
    .unwrap();
    symlink(data.file_name().unwrap(), secrets.join("..data")).unwrap();
    symlink("..data/partner-key", secrets.join("partner-key")).unwrap();
    symlink("..data/audit-hash-key", secrets.join("audit-hash-key")).unwrap();
    for file in [
        &config,
        &data.join("partner-key"),
        &data.join("audit-hash-key"),
    ] {
        set_mode(file, 0o444);
    }
    for dir in [&config_dir, &secrets, &data] {
        set_mode(dir, 0o555);
    }
    let workdir = root.path().join("workdir");
    std::fs::create_dir(&workdir).unwrap();
    set_mode(&workdir, 0o555);

    let as_root = rustix::process::geteuid().is_root();
    let mut command = if as_root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            IMAGE_UID,
            "--regid",
            IMAGE_UID,
            "--clear-groups",
            "--",
        ]);
        c.arg(binary());
        c
    } else {
        Command::new(binary())
    };
    command
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(&workdir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        // The mount paths and the vendor are all that differ from the cluster.
        .env("TOKEN_BROKER__SERVER__LISTEN", "127.0.0.1:0")
        .env("TOKEN_BROKER__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .env(
            "TOKEN_BROKER__UPSTREAM__BASE_URL",
            format!("http://{upstream}"),
        )
        .env(
            "TOKEN_BROKER__UPSTREAM__PARTNER_KEY_FILE",
            secrets.join("partner-key"),
        )
        .env(
            "TOKEN_BROKER__AUDIT__HASH_KEY_FILE",
            secrets.join("audit-hash-key"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut broker = Running::start(command).await;
    let pid = broker.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let client = reqwest::Client::new();

    let ready = client
        .get(format!("http://{}/readyz", broker.admin))
        .send()
        .await
        .unwrap();
    let token = broker
        .get_token(&member_query(ALICE, "AGENT"), READER_KEY)
        .await;

    assert_eq!(ready.status(), 200);
    assert_eq!(token.status(), 200);
    let body: serde_json::Value = token.json().await.unwrap();
    assert_eq!(body["token"], ALICE_AGENT_TOKEN);
    if as_root {
        // setpriv execs the binary, so this pid is the broker's own.
        let uid_line = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default();
        let uids: Vec<_> = uid_line.split_whitespace().skip(1).collect();
        assert_eq!(
            uids, [IMAGE_UID; 4],
            "real, effective, saved and fs UID: {uid_line}"
        );
    }
    assert!(
        std::fs::read_dir(&workdir).unwrap().next().is_none(),
        "nothing was written"
    );
    broker.stop().await;
}
