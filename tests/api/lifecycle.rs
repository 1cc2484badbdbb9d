//! The real binary's life: signals, shutdown within the grace, core dumps.

use std::time::Duration;

use token_broker::simulator::Fault;
use tokio::time::Instant;

use crate::helpers::process::*;
use crate::helpers::*;

#[tokio::test]
async fn sigterm_drains_an_in_flight_slow_request_and_exits_zero() {
    let (sim, upstream) = upstream().await;
    sim.set_latency(Duration::from_millis(700));
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Running::serve(&dir, upstream).await;
    let client = reqwest::Client::new();
    let url = broker.tokens_url(&member_query(ALICE, "AGENT"));

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { get(&client, url, READER_KEY).await }
    });
    while sim.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.terminate();
    // Readiness turns 503 while the slow request drains (the admin listener
    // answers until the process exits).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let readiness = client
            .get(format!("http://{}/readyz", broker.admin))
            .send()
            .await
            .expect("the admin listener answers while draining");
        if readiness.status() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "readiness never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let response = in_flight.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(broker.wait().await, 0);
    assert!(broker.output().contains("all requests finished"));
}

#[tokio::test]
async fn sighup_rereads_a_key_file_the_watcher_cannot_see() {
    let (sim, upstream) = upstream().await;
    sim.set_partner_keys(&[PARTNER_KEY, ROTATED_KEY]);
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let config = config_file(&dir, upstream, "[cache]\nttl = \"1ms\"\n");
    // The key file is a link into a directory nobody watches: only SIGHUP tells.
    let real_key = elsewhere.path().join("real-key");
    std::fs::write(&real_key, PARTNER_KEY).unwrap();
    std::fs::remove_file(dir.path().join("partner-key")).unwrap();
    std::os::unix::fs::symlink(&real_key, dir.path().join("partner-key")).unwrap();
    let mut command = command();
    command.arg("--config").arg(config);
    let mut broker = Running::start(command).await;
    let client = reqwest::Client::new();
    let url = broker.tokens_url(&member_query(ALICE, "AGENT"));
    let last_bearer = || sim.requests().pop().and_then(|r| r.authorization).unwrap();

    assert_eq!(get(&client, url.clone(), READER_KEY).await.status(), 200);
    std::fs::write(&real_key, ROTATED_KEY).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&client, url.clone(), READER_KEY).await.status(), 200);
    assert_eq!(last_bearer(), format!("Bearer {PARTNER_KEY}"));
    let pid = broker.child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(get(&client, url.clone(), READER_KEY).await.status(), 200);
        if last_bearer() == format!("Bearer {ROTATED_KEY}") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload the key"
        );
    }

    broker.terminate();
    assert_eq!(broker.wait().await, 0, "SIGHUP does not stop the service");
}

#[tokio::test]
async fn core_dumps_are_disabled() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command();
    command.arg("--config").arg(config_file(&dir, upstream, ""));
    let mut broker = Running::start(command).await;

    let pid = broker.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    broker.terminate();
    broker.wait().await;

    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let values: Vec<_> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, ["0", "0"], "{core}");
}

#[tokio::test]
async fn sighup_with_an_inline_key_does_not_stop_the_service() {
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inline.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\nbase_url = \"http://{upstream}\"\npartner_key = \"{PARTNER_KEY}\"\n{}",
            clients_toml()
        ),
    )
    .unwrap();
    let mut command = command();
    command.arg("--config").arg(&path);
    let mut broker = Running::start(command).await;

    let pid = broker.child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    // Once the signal was handled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !broker.output().contains("nothing to re-read") {
        assert!(tokio::time::Instant::now() < deadline, "SIGHUP not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = broker
        .get_token(&member_query(ALICE, "AGENT"), READER_KEY)
        .await;

    assert_eq!(response.status(), 200, "still serving after SIGHUP");
    broker.stop().await;
}

#[tokio::test]
async fn a_request_hanging_past_the_grace_is_cut_and_the_process_exits_on_time() {
    let (sim, upstream) = upstream().await;
    sim.set_fault(Fault::Hang);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command();
    cmd.arg("--config")
        .arg(config_file(&dir, upstream, ""))
        .env("TOKEN_BROKER__SERVER__SHUTDOWN_GRACE", "1s")
        .env("TOKEN_BROKER__UPSTREAM__TIMEOUT", "60s");
    let mut broker = Running::start(cmd).await;
    let url = broker.tokens_url(&member_query(ALICE, "AGENT"));
    let hanging = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(READER_KEY)
            .send()
            .await
    });
    while sim.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    broker.terminate();
    let code = broker.wait().await;

    assert_eq!(code, 0, "{}", broker.output());
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "exited after the 1 s grace, not after the 60 s vendor timeout"
    );
    assert!(
        hanging.await.unwrap().is_err(),
        "the hanging request's connection was closed"
    );
    assert!(broker.output().contains("closing remaining connections"));
}
