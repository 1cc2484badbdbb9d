//! The same fleet guarantees with Redis behind Sentinel and as a Cluster:
//! a token is shared, an invalidation reaches the other replica, and
//! `rate_limit_per_minute` holds for the whole fleet. (Failovers and paused
//! nodes: `faults`.)

use std::time::Duration;

use token_broker::domain::UserType;
use tokio::time::Instant;

use crate::fleet::{Backdrop, alice, token_of, wait_for_metric};
use crate::helpers::*;
use crate::redis_servers::{ClusterSet, MASTER_NAME, SentinelSet};

/// Two replicas on the Redis `form` names; tokens shared, invalidations
/// heard, the rate limit counted once for both.
async fn a_fleet_on(form: &str) {
    let Backdrop {
        sim,
        upstream,
        key_file,
        dir: _dir,
    } = Backdrop::start().await;
    let limited = format!(
        "{}[[clients]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nscopes = [\"tokens:read\"]\nrate_limit_per_minute = 5\n",
        clients_toml(),
        token_broker::config::KeyDigest::of_key(TEAM_ONLY_KEY.replace("team", "limit").as_str())
    );
    let cache = format!(
        "[cache]\nencryption_key_file = {:?}\n{form}",
        key_file.display().to_string()
    );
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let replica = TestApp::builder()
            .upstream(&sim, upstream)
            .config(&cache)
            .config(&limited)
            .spawn()
            .await;
        wait_for_metric(&replica, "token_broker_shared_cache_subscribed", 1.0).await;
        replicas.push(replica);
    }
    let (a, b) = (&replicas[0], &replicas[1]);

    assert_eq!(token_of(a.get_token(&alice()).await).await.1, "miss");
    assert_eq!(
        token_of(b.get_token(&alice()).await).await,
        (ALICE_AGENT_TOKEN.into(), "hit".into())
    );
    assert_eq!(sim.calls(), 1, "one vendor call for the fleet");

    sim.add_team_member(ALICE, UserType::Agent, "tok-alice-rotated");
    let deleted = a.delete_token_as(Some(INVALIDATOR_KEY), &alice()).await;
    assert_eq!(deleted.status(), 204);
    let deadline = Instant::now() + Duration::from_secs(2);
    while token_of(b.get_token(&alice()).await).await.0 != "tok-alice-rotated" {
        assert!(
            Instant::now() < deadline,
            "the other replica kept the old token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let key = TEAM_ONLY_KEY.replace("team", "limit");
    let mut admitted = 0;
    for i in 0..10 {
        let answer = replicas[i % 2].get_token_as(Some(&key), &alice()).await;
        match answer.status().as_u16() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        admitted, 5,
        "the two replicas admit rate_limit_per_minute together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_tokens_invalidations_and_rate_limits_are_fleet_wide() {
    let Some(set) = SentinelSet::start().await else {
        return;
    };
    a_fleet_on(&format!(
        "redis_sentinels = [\"{}\"]\nredis_sentinel_master = \"{MASTER_NAME}\"\n",
        set.sentinel.address()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_tokens_invalidations_and_rate_limits_are_fleet_wide() {
    let Some(set) = ClusterSet::start().await else {
        return;
    };
    a_fleet_on(&set.seeds_toml()).await;
}
