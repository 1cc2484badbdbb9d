//! Callers known to the cluster: Kubernetes service-account
//! tokens, signed with RSA and EC keys the tests make, against a JWKS file.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::helpers::service_accounts::*;
use crate::helpers::*;

#[tokio::test]
async fn a_valid_service_account_token_is_its_client_in_every_respect() {
    let cluster = cluster().await;
    for key in [rsa(), ec()] {
        let token = sign(key, &claims("inbox:embedder"));
        let response = cluster.get(&token, &alice()).await;
        assert_eq!(response.status(), 200, "{:?}", key.algorithm);
    }
    assert_eq!(
        cluster
            .app
            .metric(r#"token_broker_client_requests_total{client="embedder",result="ok"}"#)
            .await,
        2.0,
        "metrics name the client"
    );
    // The client's policy applies: types, domains and scopes.
    let token = sign(rsa(), &claims("inbox:embedder"));
    problem(
        cluster
            .get(&token, &member_query(ALICE, "CUSTOM_USER"))
            .await,
        403,
    )
    .await;
    problem(
        cluster
            .get(&token, &member_query("eve@other.org", "AGENT"))
            .await,
        403,
    )
    .await;
    problem(
        cluster.get(&token, &format!("user_id={CUSTOMER_ID}")).await,
        403,
    )
    .await;
    // Keys keep working beside it.
    assert_eq!(cluster.app.get_token(&alice()).await.status(), 200);
}

#[tokio::test]
async fn every_forged_or_misfit_token_is_a_401() {
    let cluster = cluster().await;
    let good = claims("inbox:embedder");
    let with = |field: &str, value: serde_json::Value| {
        let mut claims = good.clone();
        claims[field] = value;
        claims
    };
    let signed = sign(rsa(), &good);
    let parts: Vec<&str> = signed.split('.').collect();
    let mut tampered_payload = good.clone();
    tampered_payload["sub"] = json!("system:serviceaccount:crm:admin");
    let tampered_signature = {
        let mut signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        signature[10] ^= 0x55;
        b64(&signature)
    };
    let unknown_kid = {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("nobody-knows".into());
        jsonwebtoken::encode(&header, &good, &rsa().encoding).unwrap()
    };
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(rsa().kid.into());
        let secret = serde_json::to_vec(&rsa().jwk).unwrap();
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&secret)).unwrap()
    };
    let cases = [
        (
            "wrong aud",
            sign(rsa(), &with("aud", json!(["kubernetes"]))),
        ),
        (
            "wrong iss",
            sign(rsa(), &with("iss", json!("https://other.example"))),
        ),
        ("expired", sign(rsa(), &with("exp", json!(now() - 120)))),
        (
            "not yet valid",
            sign(rsa(), &with("nbf", json!(now() + 120))),
        ),
        ("no exp", {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove("exp");
            sign(rsa(), &claims)
        }),
        (
            "tampered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&serde_json::to_vec(&tampered_payload).unwrap()),
                parts[2]
            ),
        ),
        (
            "tampered signature",
            format!("{}.{}.{tampered_signature}", parts[0], parts[1]),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
                parts[1]
            ),
        ),
        ("HS256 with the public key as secret", hs256_with_public_key),
        ("unknown kid", unknown_kid),
        ("signed by a key not in the JWKS", {
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some(rsa().kid.into());
            jsonwebtoken::encode(&header, &good, &rotated().encoding).unwrap()
        }),
        (
            "not a service account",
            sign(rsa(), &with("sub", json!("system:node:worker-1"))),
        ),
    ];
    for (case, token) in cases {
        let response = cluster.get(&token, &alice()).await;
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
        problem(response, 401).await;
    }
    assert_eq!(cluster.app.sim.calls(), 0);
}

#[tokio::test]
async fn a_valid_token_no_client_names_is_a_403_and_a_namespace_wildcard_admits_its_own_only() {
    let cluster = cluster().await;
    let unnamed = sign(ec(), &claims("inbox:other-app"));
    problem(cluster.get(&unnamed, &alice()).await, 403).await;

    for name in ["billing", "sync-job"] {
        let token = sign(ec(), &claims(&format!("crm:{name}")));
        assert_eq!(cluster.get(&token, &alice()).await.status(), 200, "{name}");
    }
    let other_namespace = sign(ec(), &claims("crm-staging:billing"));
    problem(cluster.get(&other_namespace, &alice()).await, 403).await;
    assert_eq!(
        cluster
            .app
            .metric(r#"token_broker_client_requests_total{client="crm",result="ok"}"#)
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_with_one_token_verify_its_signature_once() {
    let cluster = cluster().await;
    let token = sign(rsa(), &claims("inbox:embedder"));
    let query = alice();
    assert_eq!(cluster.get(&token, &query).await.status(), 200);
    for batch in std::iter::once(99).chain(std::iter::repeat_n(100, 99)) {
        let statuses =
            futures::future::join_all((0..batch).map(|_| cluster.get(&token, &query))).await;
        assert!(statuses.iter().all(|r| r.status() == 200));
    }
    let verified = cluster.counted("verified").await;
    let cached = cluster.counted("cached").await;
    assert_eq!(
        (verified, cached),
        (1.0, 9_999.0),
        "one signature check for 10,000 hits"
    );
}

/// The real binary accepting the cluster's tokens (JWKS in a file), with the
/// client `embedder` for `inbox:embedder`; the directory and the vendor live
/// as long as the returned values.
async fn broker_accepting_service_accounts() -> (
    crate::helpers::process::Running,
    tempfile::TempDir,
    token_broker::simulator::Simulator,
) {
    use crate::helpers::process::{Running, command, config_file, upstream};
    let (sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[rsa(), ec()])).unwrap();
    let extra = format!(
        "[auth.kubernetes]\nissuer = \"{ISSUER}\"\njwks_file = {:?}\n\n[[clients]]\nname = \"embedder\"\nservice_accounts = [\"inbox:embedder\"]\nscopes = [\"tokens:read\"]\n",
        jwks_file.display().to_string()
    );
    let mut cmd = command();
    cmd.arg("--config").arg(config_file(&dir, upstream, &extra));
    let broker = Running::start(cmd).await;
    (broker, dir, sim)
}

#[tokio::test]
async fn the_audit_event_names_the_client_and_the_service_account() {
    use crate::helpers::process::audit_events;
    let (mut broker, _dir, _sim) = broker_accepting_service_accounts().await;
    let token = sign(ec(), &claims("inbox:embedder"));
    let response = broker.get_token(&alice(), &token).await;
    assert_eq!(response.status(), 200);
    broker.stop().await;

    let output = broker.output();
    let audit = audit_events(&output);
    assert_eq!(audit.len(), 1, "{output}");
    assert_eq!(audit[0]["caller"], "embedder");
    assert_eq!(audit[0]["service_account"], "inbox:embedder");
    assert!(!output.contains(&token), "the token is never logged");
}

#[tokio::test]
async fn a_service_account_no_client_names_is_audited_as_denied_with_its_name() {
    use crate::helpers::process::audit_events;
    let (mut broker, _dir, _sim) = broker_accepting_service_accounts().await;
    let token = sign(ec(), &claims("billing:stranger"));
    let response = broker.get_token(&alice(), &token).await;
    assert_eq!(response.status(), 403);
    broker.stop().await;

    let audit = audit_events(&broker.output());
    assert_eq!(audit.len(), 1, "{audit:?}");
    let event = &audit[0];
    assert_eq!(event["outcome"], "denied");
    assert_eq!(event["status"], 403);
    assert_eq!(event["rule"], "service_account");
    assert_eq!(event["proof"], "service_account");
    assert_eq!(event["service_account"], "billing:stranger");
    assert!(event.get("caller").is_none(), "no client is them: {event}");
    assert_eq!(event["identity"], "team_member");
    assert_eq!(event["user_type"], "AGENT");
}

#[tokio::test]
async fn a_wrong_issuer_is_named_at_start_and_in_one_warning_naming_both() {
    use crate::helpers::process::events;
    let (mut broker, _dir, _sim) = broker_accepting_service_accounts().await;
    let eks = "https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE";
    for _ in 0..3 {
        let mut claims = claims("inbox:embedder");
        claims["iss"] = json!(eks);
        let response = broker.get_token(&alice(), &sign(ec(), &claims)).await;
        assert_eq!(response.status(), 401);
    }
    broker.stop().await;

    let events = events(&broker.output());
    let started = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("accepted from this issuer")
        })
        .collect::<Vec<_>>();
    assert_eq!(started.len(), 1, "{events:?}");
    assert_eq!(started[0]["issuer"], ISSUER);
    let warnings = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("names another issuer")
        })
        .collect::<Vec<_>>();
    assert_eq!(
        warnings.len(),
        1,
        "one warning for three tokens: {events:?}"
    );
    assert_eq!(warnings[0]["level"], "WARN");
    assert_eq!(warnings[0]["expected"], ISSUER);
    assert_eq!(warnings[0]["presented"], eks);
}

#[tokio::test]
async fn time_claims_from_the_future_or_out_of_range_are_401s_never_a_500() {
    let cluster = cluster().await;
    let ten_years = 10 * 365 * 86_400;
    let mut future = claims("inbox:embedder");
    future["iat"] = json!(now() + ten_years);
    future["nbf"] = json!(now());
    future["exp"] = json!(now() + ten_years + 3600);
    let mut huge_exp = claims("inbox:embedder");
    huge_exp["exp"] = json!(u64::MAX);
    huge_exp["iat"] = json!(u64::MAX - 3600);
    let mut huge_nbf = claims("inbox:embedder");
    huge_nbf["nbf"] = json!(u64::MAX);
    let mut slightly_ahead = claims("inbox:embedder");
    slightly_ahead["iat"] = json!(now() + 30);
    for (case, claims) in [
        ("iat ten years ahead", future),
        ("exp = 2^64 - 1", huge_exp),
        ("nbf = 2^64 - 1", huge_nbf),
    ] {
        let response = cluster.get(&sign(rsa(), &claims), &alice()).await;
        assert_eq!(response.status(), 401, "{case}");
        problem(response, 401).await;
    }
    assert_eq!(
        cluster
            .get(&sign(rsa(), &slightly_ahead), &alice())
            .await
            .status(),
        200,
        "an iat within the leeway is clock skew"
    );
}

#[tokio::test]
async fn long_lived_tokens_and_tokens_without_iat_are_refused() {
    let cluster = cluster().await;
    let lasting = |seconds: u64| {
        let mut claims = claims("inbox:embedder");
        claims["exp"] = json!(claims["iat"].as_u64().unwrap() + seconds);
        claims
    };
    let mut without_iat = claims("inbox:embedder");
    without_iat.as_object_mut().unwrap().remove("iat");
    for (case, claims) in [
        ("ten years", lasting(10 * 365 * 86_400)),
        ("no iat", without_iat),
        ("a day and a minute", lasting(86_400 + 60)),
    ] {
        let response = cluster.get(&sign(rsa(), &claims), &alice()).await;
        assert_eq!(response.status(), 401, "{case}");
        problem(response, 401).await;
    }
    let a_day = lasting(86_400);
    assert_eq!(
        cluster.get(&sign(rsa(), &a_day), &alice()).await.status(),
        200,
        "exactly max_token_lifetime (24h) is allowed"
    );
    assert_eq!(cluster.counted("rejected_lifetime").await, 3.0);
}

#[tokio::test]
async fn a_subject_whose_names_are_not_kubernetes_names_is_refused() {
    let cluster = cluster().await;
    for subject in [
        "crm:",
        ":billing",
        "crm:Billing",
        "crm:-billing",
        "crm:billing:extra",
        "CRM:billing",
        "crm:billing_job",
        &format!("crm:{}", "a".repeat(254)),
        &format!("{}:billing", "n".repeat(64)),
    ] {
        let token = sign(ec(), &claims(subject));
        let response = cluster.get(&token, &alice()).await;
        assert_eq!(response.status(), 401, "{subject}");
        problem(response, 401).await;
    }
    let dotted = sign(ec(), &claims("crm:billing.v2"));
    assert_eq!(
        cluster.get(&dotted, &alice()).await.status(),
        200,
        "a name may be a DNS subdomain"
    );
    assert_eq!(cluster.counted("rejected_subject").await, 9.0);
}
