//! A 204 holds against a hostile or restored Redis, in bounded memory: a
//! writer that sets a generation out of range, a publisher that forges or
//! replays messages, a restore followed by a new replica, a flood of
//! distinct invalidations, and a subscription that answers but hears nobody.
//! Each test is one way the promise once broke.

use std::time::Duration;

use futures::StreamExt;
use token_broker::domain::UserType;
use tokio::time::Instant;

use crate::fault_proxy::{Fault, FaultProxy};
use crate::fleet::{Fleet, alice, token_of, wait_for_metric};
use crate::helpers::process::{Running, command, config_file};
use crate::helpers::*;
use crate::invalidation::{rotate_and_delete, until_served};
use crate::redis_servers::{restore, snapshot};

const INVALIDATED: &str = "token-broker:v3:invalidated";

/// The Redis keys of alice's agent token (the only identity fetched so far).
async fn alice_keys(redis: &mut redis::aio::MultiplexedConnection) -> (String, String) {
    let entries: Vec<String> = redis::cmd("KEYS")
        .arg("token-broker:*:entry")
        .query_async(redis)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = entries[0].clone();
    let generation = entry.replace(":entry", ":generation");
    (entry, generation)
}

async fn sum_of(replicas: &[&TestApp], sample: &str) -> f64 {
    let mut sum = 0.0;
    for replica in replicas {
        sum += replica.metric(sample).await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_set_to_the_largest_u64_does_not_wrap_and_the_delete_holds() {
    let Some(fleet) = Fleet::start(2, "").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    token_of(a.get_token(&alice()).await).await;
    assert_eq!(
        token_of(b.get_token(&alice()).await).await.0,
        ALICE_AGENT_TOKEN
    );
    let mut redis = fleet.redis.connection().await.unwrap();
    let (_, generation) = alice_keys(&mut redis).await;
    for hostile in [
        "18446744073709551615",
        "-9223372036854775808",
        "1e300",
        "garbage",
    ] {
        let _: () = redis::cmd("SET")
            .arg(&generation)
            .arg(hostile)
            .query_async(&mut redis)
            .await
            .unwrap();
        let rotated = format!("tok-alice-after-{}", hostile.len());
        fleet.sim.add_team_member(ALICE, UserType::Agent, &rotated);
        let deleted = a.delete_token_as(Some(INVALIDATOR_KEY), &alice()).await;
        assert_eq!(deleted.status(), 204, "after {hostile}");
        let now: String = redis::cmd("GET")
            .arg(&generation)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(
            now.len() <= 17 && now.bytes().all(|b| b.is_ascii_digit()),
            "{hostile} became {now}: replaced, never wrapped"
        );
        until_served(b, &rotated, Duration::from_secs(2)).await;
        until_served(a, &rotated, Duration::from_secs(2)).await;
    }
    assert!(a.metric("token_broker_shared_cache_rollbacks_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_altered_message_counts_as_a_lost_subscription_and_a_replay_changes_nothing() {
    let Some(fleet) = Fleet::start(2, "").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    // A publisher on the fleet's channel: it hears the real message...
    let client = redis::Client::open(fleet.redis.url()).unwrap();
    let mut listener = client.get_async_pubsub().await.unwrap();
    listener.subscribe(INVALIDATED).await.unwrap();
    token_of(b.get_token(&alice()).await).await;
    rotate_and_delete(&fleet, a, "tok-alice-rotated").await;
    let captured: Vec<u8> = {
        let mut messages = listener.on_message();
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .unwrap()
            .unwrap();
        message.get_payload_bytes().to_vec()
    };
    let clear = captured.iter().take_while(|b| b.is_ascii_digit()).count();
    assert!(
        !(clear > 0 && captured.get(clear) == Some(&b':')),
        "no generation travels in the clear"
    );
    until_served(b, "tok-alice-rotated", Duration::from_secs(2)).await;
    let mut redis = fleet.redis.connection().await.unwrap();
    let losses = "token_broker_shared_cache_subscription_losses_total";

    // ...replays it: nothing is lost, nothing moves back.
    let before = b.metric(losses).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(INVALIDATED)
        .arg(&captured)
        .query_async(&mut redis)
        .await
        .unwrap();
    until_served(b, "tok-alice-rotated", Duration::from_secs(2)).await;
    assert_eq!(b.metric(losses).await, before, "a replay is no loss");

    // ...then alters it, prefixes the old clear-text generation, or sends garbage.
    let mut altered = captured.clone();
    altered[20] ^= 1;
    let mut prefixed = b"18446744073709551615:".to_vec();
    prefixed.extend_from_slice(&captured);
    for (n, forged) in [altered, prefixed, b"garbage".to_vec()]
        .into_iter()
        .enumerate()
    {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(INVALIDATED)
            .arg(&forged)
            .query_async(&mut redis)
            .await
            .unwrap();
        wait_for_metric(b, losses, before + 1.0 + n as f64).await;
        wait_for_metric(b, "token_broker_shared_cache_subscribed", 1.0).await;
    }
    until_served(b, "tok-alice-rotated", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_after_a_restore_refuses_what_the_restore_brought_back() {
    let Some(mut fleet) = Fleet::start(2, "").await else {
        return;
    };
    let (a, b) = (&fleet.replicas[0], &fleet.replicas[1]);
    token_of(a.get_token(&alice()).await).await;
    token_of(b.get_token(&alice()).await).await;
    let redis = fleet.redis.connection().await.unwrap();
    let saved = snapshot(redis.clone()).await.unwrap();
    assert!(
        saved.iter().any(|(k, _)| k.ends_with("{fleet}")),
        "{saved:?}"
    );

    rotate_and_delete(&fleet, a, "tok-alice-rotated").await;
    // The backup restored over everything.
    restore(redis, &saved, true).await.unwrap();
    // A replica that saw the invalidation notices on its own, with nobody asking it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sum_of(&[a, b], "token_broker_shared_cache_rollbacks_total").await < 1.0 {
        assert!(Instant::now() < deadline, "no replica noticed the restore");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = fleet.replica("").await;
    fleet.replicas.push(c);
    fleet.subscribed().await;
    let c = &fleet.replicas[2];
    let (token, cache) = token_of(c.get_token(&alice()).await).await;
    assert_eq!(
        token, "tok-alice-rotated",
        "the restored token came back ({cache})"
    );
    for replica in &fleet.replicas[..2] {
        assert_eq!(
            token_of(replica.get_token(&alice()).await).await.0,
            "tok-alice-rotated"
        );
    }
}

/// Resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_distinct_deletes_leave_memory_bounded_where_they_are_only_heard() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let Some(fleet) = Fleet::start(1, "[cache]\nmax_entries = 1000\n").await else {
        return;
    };
    let a = &fleet.replicas[0];
    // The replica that only hears the invalidations runs as its own process.
    let dir = tempfile::tempdir().unwrap();
    let mut listening = command();
    listening.arg("serve").arg("--config").arg(config_file(
        &dir,
        fleet.upstream,
        &format!("{}max_entries = 1000\n", fleet.cache_toml()),
    ));
    let b = Running::start(listening).await;
    let subscribed = "token_broker_shared_cache_subscribed";
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.metric(subscribed).await != Some(1.0) {
        assert!(Instant::now() < deadline, "the listener never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = b.child.id().unwrap();
    let send = |from: usize, to: usize| {
        futures::stream::iter(from..to)
            .map(|i| async move {
                let deleted = a
                    .delete_token_as(Some(INVALIDATOR_KEY), &format!("user_id=gone-{i}"))
                    .await;
                assert_eq!(deleted.status(), 204);
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
    };
    // Warm up past the bound, so what is measured is growth beyond it.
    send(0, 2_000).await;
    let before = resident_kib(pid);
    send(2_000, 22_000).await;
    let heard = "token_broker_shared_cache_invalidations_heard_total";
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.metric(heard).await < Some(22_000.0) {
        assert!(
            Instant::now() < deadline,
            "the listener never heard them all"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = resident_kib(pid);
    let grown = after.saturating_sub(before);
    eprintln!(
        "the listener's resident memory: {before} KiB, then {after} KiB after 20k invalidations"
    );
    // Unbounded, it grew ~14 MiB for 20k identities (0.7 KiB each).
    assert!(grown < 6 * 1024, "grew {grown} KiB");

    let mut redis = fleet.redis.connection().await.unwrap();
    let generations: Vec<String> = redis::cmd("KEYS")
        .arg("token-broker:*:generation")
        .query_async(&mut redis)
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&generations[0])
        .query_async(&mut redis)
        .await
        .unwrap();
    // ttl (10m) + stale_if_error (1h) + a minute: not a day.
    assert!(
        ttl > 0 && ttl <= 71 * 60 * 1000,
        "a generation lives {ttl} ms"
    );
}

/// A replica of `fleet` that reaches Redis through a fault proxy, in sync,
/// holding alice's token.
async fn behind_a_proxy(fleet: &Fleet) -> (FaultProxy, TestApp) {
    let proxy = FaultProxy::start(fleet.redis.address().parse().unwrap()).await;
    let replica = fleet
        .replica_via(&format!("redis://{}", proxy.addr), "")
        .await;
    wait_for_metric(&replica, "token_broker_shared_cache_subscribed", 1.0).await;
    assert_eq!(
        token_of(replica.get_token(&alice()).await).await.0,
        ALICE_AGENT_TOKEN
    );
    (proxy, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_answers_but_hears_nobody_is_noticed_by_its_canary() {
    let Some(fleet) = Fleet::start(1, "").await else {
        return;
    };
    let (proxy, deaf) = behind_a_proxy(&fleet).await;
    // Every reply passes (PONGs, command answers), every published message is dropped.
    proxy.set(Fault::DropMessages);
    rotate_and_delete(&fleet, &fleet.replicas[0], "tok-alice-rotated").await;
    until_served(&deaf, "tok-alice-rotated", Duration::from_secs(4)).await;
    wait_for_metric(&deaf, "token_broker_shared_cache_canary_misses_total", 1.0).await;
    proxy.set(Fault::Pass);
    wait_for_metric(&deaf, "token_broker_shared_cache_subscribed", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_lost_while_the_canary_still_comes_back_is_noticed_by_its_sequence() {
    let Some(fleet) = Fleet::start(1, "").await else {
        return;
    };
    let (proxy, lossy) = behind_a_proxy(&fleet).await;
    // Only the invalidation is lost: canaries keep coming back, so the
    // canary never misses, however long the DELETE takes.
    proxy.set(Fault::DropChannel(INVALIDATED));
    rotate_and_delete(&fleet, &fleet.replicas[0], "tok-alice-rotated").await;
    proxy.set(Fault::Pass);
    // Without the sequence it would serve the old token for its whole ttl;
    // the bound leaves a loaded machine room (the 2 s promise is the fault
    // suite's to judge).
    until_served(&lossy, "tok-alice-rotated", Duration::from_secs(5)).await;
    let misses = lossy
        .metric("token_broker_shared_cache_canary_misses_total")
        .await;
    assert_eq!(misses, 0.0, "the canary never noticed: the sequence did");
    wait_for_metric(
        &lossy,
        "token_broker_shared_cache_subscription_losses_total",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_fetched_while_deaf_is_dropped_once_the_subscription_hears_again() {
    let Some(fleet) = Fleet::start(1, "").await else {
        return;
    };
    let (proxy, deaf) = behind_a_proxy(&fleet).await;
    proxy.set(Fault::DropMessages);
    wait_for_metric(&deaf, "token_broker_shared_cache_canary_misses_total", 1.0).await;
    // Subscribed again (still deaf); what follows happens before this
    // subscription's own silence limit.
    let resubscribed = "token_broker_shared_cache_operations_total{op=\"subscribe\",result=\"ok\"}";
    wait_for_metric(&deaf, resubscribed, 2.0).await;
    // Not in sync: asked of the vendor, kept briefly.
    assert_eq!(
        token_of(deaf.get_token(&alice()).await).await.0,
        ALICE_AGENT_TOKEN
    );
    // Its invalidation is published while messages still do not arrive.
    rotate_and_delete(&fleet, &fleet.replicas[0], "tok-alice-rotated").await;
    proxy.set(Fault::Pass);
    wait_for_metric(&deaf, "token_broker_shared_cache_subscribed", 1.0).await;
    until_served(&deaf, "tok-alice-rotated", Duration::from_secs(2)).await;
}
