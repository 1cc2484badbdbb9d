//! Partner-key rotation without a restart, with no failed request.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::helpers::*;

const NEW_KEY: &str = "pk-rotated-9c2e";

/// Requests a fresh token (ttl 1ms: every request asks the vendor) until
/// `rotate` has run and the vendor has seen `NEW_KEY`; returns every status.
async fn rotate_under_load(key_file: &Path, rotate: impl FnOnce()) -> (TestApp, Vec<u16>) {
    let app = TestApp::builder()
        .partner_key_file(key_file)
        .config("[cache]\nttl = \"1ms\"\n")
        .spawn()
        .await;
    app.sim.set_partner_keys(&[PARTNER_KEY, NEW_KEY]);
    let app = Arc::new(app);
    let done = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let app = app.clone();
        let done = done.clone();
        async move {
            let mut statuses = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let response = app.get_token(&member_query(ALICE, "AGENT")).await;
                statuses.push(response.status().as_u16());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        }
    });
    // Some of the load has reached the vendor with the first key.
    while app.sim.requests().len() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        app.sim
            .requests()
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&*format!("Bearer {PARTNER_KEY}")))
    );

    rotate();
    let new_bearer = format!("Bearer {NEW_KEY}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !app
        .sim
        .requests()
        .iter()
        .any(|r| r.authorization.as_deref() == Some(&*new_bearer))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key was never used"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    done.store(true, Ordering::SeqCst);
    let statuses = load.await.unwrap();
    let app = Arc::try_unwrap(app).ok().expect("load task finished");
    (app, statuses)
}

#[tokio::test]
async fn a_rewritten_key_file_is_used_without_a_restart_and_no_request_fails() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("partner-key");
    std::fs::write(&key_file, format!("{PARTNER_KEY}\n")).unwrap();

    let (app, statuses) = rotate_under_load(&key_file, || {
        std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap()
    })
    .await;

    assert!(statuses.len() > 5);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let last = app.sim.requests().pop().unwrap();
    assert_eq!(last.authorization.unwrap(), format!("Bearer {NEW_KEY}"));
    assert!(
        app.metric(r#"token_broker_partner_key_reloads_total{result="changed"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_kubernetes_style_symlink_swap_is_picked_up() {
    // The layout kubelet gives a mounted Secret: partner-key -> ..data/partner-key,
    // ..data -> ..<timestamp>; an update swaps ..data atomically.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_11_26_a")).unwrap();
    std::fs::write(root.join("..2026_11_26_a/partner-key"), PARTNER_KEY).unwrap();
    std::os::unix::fs::symlink("..2026_11_26_a", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/partner-key", root.join("partner-key")).unwrap();

    let (app, statuses) = rotate_under_load(&root.join("partner-key"), || {
        std::fs::create_dir(root.join("..2026_11_26_b")).unwrap();
        std::fs::write(root.join("..2026_11_26_b/partner-key"), NEW_KEY).unwrap();
        std::os::unix::fs::symlink("..2026_11_26_b", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(root.join("..2026_11_26_a")).unwrap();
    })
    .await;

    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    drop(app);
}

#[tokio::test]
async fn an_emptied_key_file_keeps_the_old_key_and_counts_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("partner-key");
    std::fs::write(&key_file, PARTNER_KEY).unwrap();
    let app = TestApp::builder()
        .partner_key_file(&key_file)
        .config("[cache]\nttl = \"1ms\"\n")
        .spawn()
        .await;

    std::fs::write(&key_file, "").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app
        .metric(r#"token_broker_partner_key_reloads_total{result="failed"}"#)
        .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = app.get_token(&member_query(ALICE, "AGENT")).await;

    assert_eq!(response.status(), 200, "the old key is still used");
    let last = app.sim.requests().pop().unwrap();
    assert_eq!(last.authorization.unwrap(), format!("Bearer {PARTNER_KEY}"));
}
