//! An invalidation confirmed by a 204 holds on every replica, whatever the
//! replicas saw before and whatever Redis gives back afterwards; a `DELETE`
//! the shared cache did not take is a 503; a stuck fetch lock costs a few
//! Redis calls a second. Each test reproduces a way the promise once broke.

use std::time::Duration;

use token_broker::domain::UserType;
use tokio::time::Instant;

use crate::fault_proxy::{Fault, FaultProxy};
use crate::fleet::{Fleet, alice, token_of, wait_for_metric};
use crate::helpers::*;
use crate::redis_servers::{RedisServer, restore, snapshot};

/// Polls `replica` until it serves `expected` for alice; how long that took.
pub async fn until_served(replica: &TestApp, expected: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (token, _) = token_of(replica.get_token(&alice()).await).await;
        if token == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still serving {token} {:?} after the DELETE was confirmed",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rotates alice's token at the vendor and invalidates it through `replica`.
pub async fn rotate_and_delete(fleet: &Fleet, replica: &TestApp, token: &str) {
    fleet.sim.add_team_member(ALICE, UserType::Agent, token);
    let deleted = replica
        .delete_token_as(Some(INVALIDATOR_KEY), &alice())
        .await;
    assert_eq!(deleted.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_holds_on_a_replica_that_looked_up_more_keys_than_max_entries() {
    let Some(fleet) = Fleet::start(2, "[cache]\nmax_entries = 4\n").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    for i in 0..20 {
        fleet
            .sim
            .add_customer(&format!("c{i}"), &format!("tok-c{i}"));
        token_of(b.get_token(&format!("user_id=c{i}")).await).await;
    }
    for _ in 0..5 {
        assert_eq!(
            token_of(b.get_token(&alice()).await).await.0,
            ALICE_AGENT_TOKEN
        );
    }
    rotate_and_delete(&fleet, a, "tok-alice-rotated").await;
    until_served(b, "tok-alice-rotated", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_written_back_after_a_delete_is_never_served_again() {
    let Some(fleet) = Fleet::start(2, "").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    token_of(a.get_token(&alice()).await).await;
    // A snapshot of everything Redis holds, as a backup would take it.
    let redis = fleet.redis.connection().await.unwrap();
    let saved = snapshot(redis.clone()).await.unwrap();
    assert!(
        saved.iter().any(|(k, _)| k.ends_with(":entry")),
        "{saved:?}"
    );

    rotate_and_delete(&fleet, a, "tok-alice-rotated").await;
    // The snapshot restored: the old value and the old generation are back.
    restore(redis, &saved, false).await.unwrap();
    for replica in [b, a] {
        let (token, cache) = token_of(replica.get_token(&alice()).await).await;
        assert_eq!(token, "tok-alice-rotated", "the restored token came back");
        assert_ne!(cache, "stale");
    }
    let refused = b
        .metric("token_broker_shared_cache_values_refused_total{reason=\"stale_generation\"}")
        .await;
    assert!(refused >= 1.0, "refusals counted: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_noticed_and_the_replica_stops_serving_what_it_held() {
    let Some(fleet) = Fleet::start(1, "").await else {
        return;
    };
    let proxy = FaultProxy::start(fleet.redis.address().parse().unwrap()).await;
    let cut_off = fleet
        .replica_via(&format!("redis://{}", proxy.addr), "")
        .await;
    wait_for_metric(&cut_off, "token_broker_shared_cache_subscribed", 1.0).await;
    assert_eq!(
        token_of(cut_off.get_token(&alice()).await).await.0,
        ALICE_AGENT_TOKEN
    );
    // Connections stay open, nothing goes through: no reset, no error.
    proxy.set(Fault::Blackhole);
    rotate_and_delete(&fleet, &fleet.replicas[0], "tok-alice-rotated").await;
    let took = until_served(&cut_off, "tok-alice-rotated", Duration::from_secs(4)).await;
    eprintln!("the cut-off replica served the new token {took:?} after the DELETE");
    wait_for_metric(
        &cut_off,
        "token_broker_shared_cache_subscription_losses_total",
        1.0,
    )
    .await;
    assert_eq!(
        cut_off.metric("token_broker_shared_cache_subscribed").await,
        0.0
    );

    proxy.set(Fault::Pass);
    wait_for_metric(&cut_off, "token_broker_shared_cache_subscribed", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_the_shared_cache_cannot_take_is_a_503_and_still_drops_the_local_entry() {
    let Some(fleet) = Fleet::start(1, "[cache]\nredis_timeout = \"200ms\"\n").await else {
        return;
    };
    let replica = &fleet.replicas[0];
    token_of(replica.get_token(&alice()).await).await;
    fleet.redis.pause();
    let refused = replica
        .delete_token_as(Some(INVALIDATOR_KEY), &alice())
        .await;
    assert_eq!(refused.headers()["retry-after"], "1");
    let problem = problem(refused, 503).await;
    assert_eq!(
        problem["type"],
        "urn:token-broker:problem:invalidation-not-shared"
    );
    let (_, cache) = token_of(replica.get_token(&alice()).await).await;
    assert_eq!(cache, "miss", "the local entry went all the same");
    fleet.redis.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let retried = replica
            .delete_token_as(Some(INVALIDATOR_KEY), &alice())
            .await;
        if retried.status() == 204 {
            break;
        }
        assert_eq!(retried.status(), 503);
        assert!(
            Instant::now() < deadline,
            "never confirmed after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_a_delete_is_confirmed_only_once_a_redis_replica_holds_it() {
    let Some(fleet) = Fleet::start(1, "[cache]\nredis_min_replicas = 1\n").await else {
        return;
    };
    let replica = &fleet.replicas[0];
    let alone = replica
        .delete_token_as(Some(INVALIDATOR_KEY), &alice())
        .await;
    problem(alone, 503).await;

    let port = fleet.redis.port.to_string();
    let _redis_replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let deleted = replica
            .delete_token_as(Some(INVALIDATOR_KEY), &alice())
            .await;
        if deleted.status() == 204 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a Redis replica never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        replica
            .metric("token_broker_shared_cache_operations_total{op=\"replicate\",result=\"ok\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_nobody_releases_delays_a_miss_by_upstream_timeout_at_a_few_calls_a_second() {
    let Some(fleet) = Fleet::start(1, "[upstream]\ntimeout = \"2s\"\n").await else {
        return;
    };
    let replica = &fleet.replicas[0];
    let customer = format!("user_id={CUSTOMER_ID}");
    fleet.only_a_lock_for_the_customer(60_000).await;
    let claims = "token_broker_shared_cache_operations_total{op=\"claim\",result=\"ok\"}";
    let before = replica.metric(claims).await;
    let other = fleet.replica("[upstream]\ntimeout = \"2s\"\n").await;
    wait_for_metric(&other, "token_broker_shared_cache_subscribed", 1.0).await;
    let before_other = other.metric(claims).await;
    let started = Instant::now();
    let (token, cache) = token_of(other.get_token(&customer).await).await;
    let waited = started.elapsed();
    assert_eq!((token.as_str(), cache.as_str()), (CUSTOMER_TOKEN, "miss"));
    assert!(
        waited >= Duration::from_secs(2),
        "it waited for the holder: {waited:?}"
    );
    let calls = other.metric(claims).await - before_other;
    assert!(
        calls <= 15.0,
        "{calls} claims in a {waited:?} wait: waiters poll slowly"
    );
    assert_eq!(replica.metric(claims).await, before);
}
