//! Callers cannot starve each other of the vendor: the
//! `upstream.max_in_flight` slots go round the waiting callers in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::helpers::*;

/// One caller backfills a hundred cold keys through a slow vendor with four
/// slots; another caller's single cold miss, sent once the backlog is
/// queued, is served within about one vendor round trip: before most of the
/// backlog, where first come, first served would put it after all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_with_a_backlog_does_not_delay_another_callers_single_miss() {
    let app = TestApp::builder()
        .config("[upstream]\nmax_in_flight = 4\ntimeout = \"60s\"\n")
        .spawn()
        .await;
    app.sim.add_numbered_agents(101);
    app.sim.set_latency(Duration::from_millis(300));
    let done = Arc::new(AtomicUsize::new(0));
    let backlog: Vec<_> = (0..100)
        .map(|i| {
            let (app_url, http, done) = (app.url(""), app.http.clone(), done.clone());
            tokio::spawn(async move {
                let response = http
                    .get(format!(
                        "{app_url}/v1/tokens?{}",
                        member_query(&format!("user{i}@example.com"), "AGENT")
                    ))
                    .bearer_auth(READER_KEY)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    // The backlog holds every slot, and the rest of it waits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.sim.in_flight() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backlog never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let single = app
        .get_token_as(
            Some(TEAM_ONLY_KEY),
            &member_query("user100@example.com", "AGENT"),
        )
        .await;
    let backlog_done = done.load(Ordering::SeqCst);
    assert_eq!(single.status(), 200);
    assert!(
        backlog_done <= 12,
        "the single miss waited for {backlog_done} of the backlog's 100 fetches"
    );
    for request in backlog {
        request.await.unwrap();
    }
    let waited = app
        .metric(r#"token_broker_upstream_queue_wait_seconds_count{client="team-only"}"#)
        .await;
    assert_eq!(
        waited, 1.0,
        "the single caller's wait is measured as its own"
    );
}

/// A refresh-ahead runs in the background, but its vendor slot is the turn
/// of the caller whose hit started it, not of whoever fetched the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_refresh_waits_in_the_turn_of_the_caller_whose_hit_started_it() {
    let app = TestApp::builder()
        .config("[cache]\nttl = \"2s\"\nrefresh_ahead = 0.5\n")
        .spawn()
        .await;
    let waits = |client: &'static str| {
        let app = &app;
        async move {
            app.metric(&format!(
                r#"token_broker_upstream_queue_wait_seconds_count{{client="{client}"}}"#
            ))
            .await
        }
    };
    let alice = member_query(ALICE, "AGENT");
    assert_eq!(
        app.get_token_as(Some(READER_KEY), &alice).await.status(),
        200
    );
    assert_eq!(waits("reader").await, 1.0);

    // Past ttl × refresh_ahead, a hit of the other caller starts the refresh.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hit = app.get_token_as(Some(TEAM_ONLY_KEY), &alice).await;
        assert_eq!(hit.status(), 200);
        if waits("team-only").await >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh was counted for the caller whose hit started it"
        );
    }
    assert_eq!(
        waits("reader").await,
        1.0,
        "not for the caller that fetched it"
    );
    assert!(app.sim.calls() >= 2, "the refresh asked the vendor");
}
