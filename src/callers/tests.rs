use std::num::NonZeroU32;

use super::*;
use crate::config::{ANONYMOUS, Scope, SpiffeId};
use crate::domain::{Email, UserId, UserType};

fn client(name: &str, key: &str, scopes: Vec<Scope>) -> ClientSettings {
    ClientSettings::new(name, KeyDigest::of_key(key), scopes)
}

fn callers() -> Callers {
    let mut restricted = client("restricted", "restricted-key", vec![Scope::TokensRead]);
    restricted.allowed_types = Some(vec![UserType::Agent]);
    restricted.allowed_email_domains = Some(vec!["Example.com".into()]);
    let mut embedder = client("embedder", "embedder-key", vec![Scope::TokensRead]);
    embedder.spiffe_ids =
        vec![SpiffeId::parse("spiffe://cluster.local/ns/inbox/sa/embedder").unwrap()];
    let mut crm = client("crm", "crm-key", vec![Scope::TokensRead]);
    crm.spiffe_ids = vec![SpiffeId::parse("spiffe://cluster.local/ns/crm/sa/app").unwrap()];
    Callers::new(
        &[
            client("reader", "reader-key", vec![Scope::TokensRead]),
            client("admin", "admin-key", vec![Scope::TokensInvalidate]),
            restricted,
            embedder,
            crm,
        ],
        false,
        None,
    )
}

async fn authenticate(c: &Callers, header: Option<&[u8]>) -> Result<Caller, Refusal> {
    c.authenticate(&Presented::new(header, None)?).await
}

fn certificate(uris: &[&str]) -> PeerCertificate {
    PeerCertificate {
        uris: uris.iter().map(|uri| Arc::from(*uri)).collect(),
    }
}

fn member(email: &str, user_type: UserType) -> Identity {
    Identity::TeamMember {
        email: Email::parse(email).unwrap(),
        user_type,
    }
}

#[tokio::test]
async fn the_matching_client_is_found_by_its_key() {
    let c = callers();
    let admin = authenticate(&c, Some(b"Bearer admin-key")).await.unwrap();
    assert_eq!(&**admin.name(), "admin");
    assert_eq!(admin.proof(), &Proof::Key);
    let reader = authenticate(&c, Some(b"bearer reader-key")).await.unwrap();
    assert_eq!(&**reader.name(), "reader");
}

#[tokio::test]
async fn a_key_shaped_like_a_jwt_is_still_a_key() {
    let jwt_shaped = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    let c = Callers::new(
        &[client("odd", jwt_shaped, vec![Scope::TokensRead])],
        false,
        None,
    );
    let header = format!("Bearer {jwt_shaped}");
    let caller = authenticate(&c, Some(header.as_bytes())).await.unwrap();
    assert_eq!(&**caller.name(), "odd");
}

#[tokio::test]
async fn unknown_malformed_and_missing_keys_are_refused() {
    let c = callers();
    for header in [
        &b"Bearer wrong"[..],
        b"Basic cmVhZGVyLWtleQ==",
        b"Bearer ",
        b"Bearer",
        b"reader-key",
    ] {
        assert_eq!(
            authenticate(&c, Some(header)).await.unwrap_err(),
            Refusal::Unauthorized
        );
    }
    assert_eq!(
        authenticate(&c, None).await.unwrap_err(),
        Refusal::Unauthorized
    );
}

#[tokio::test]
async fn a_certificate_is_the_client_naming_its_spiffe_id() {
    let c = callers();
    let cert = certificate(&[
        "https://elsewhere/x",
        "spiffe://cluster.local/ns/inbox/sa/embedder",
    ]);
    let caller = c
        .authenticate(&Presented::new(None, Some(&cert)).unwrap())
        .await
        .unwrap();
    assert_eq!(&**caller.name(), "embedder");
    assert_eq!(
        caller.proof(),
        &Proof::Certificate(Arc::from("spiffe://cluster.local/ns/inbox/sa/embedder"))
    );
}

#[tokio::test]
async fn an_unnamed_certificate_is_403_and_one_naming_two_clients_401() {
    let c = callers();
    let stranger = certificate(&["spiffe://cluster.local/ns/other/sa/x"]);
    let refusal = c
        .authenticate(&Presented::new(None, Some(&stranger)).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            refusal,
            Refusal::NotAClient {
                rule: Rule::Certificate,
                ..
            }
        ),
        "{refusal:?}"
    );
    let both = certificate(&[
        "spiffe://cluster.local/ns/inbox/sa/embedder",
        "spiffe://cluster.local/ns/crm/sa/app",
    ]);
    let refusal = c
        .authenticate(&Presented::new(None, Some(&both)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(refusal, Refusal::Unauthorized);
}

#[tokio::test]
async fn the_authorization_header_wins_over_a_certificate() {
    let c = callers();
    let cert = certificate(&["spiffe://cluster.local/ns/inbox/sa/embedder"]);
    let by_key = c
        .authenticate(&Presented::new(Some(b"Bearer reader-key"), Some(&cert)).unwrap())
        .await
        .unwrap();
    assert_eq!(&**by_key.name(), "reader");
    let wrong_key = c
        .authenticate(&Presented::new(Some(b"Bearer wrong"), Some(&cert)).unwrap())
        .await;
    assert_eq!(wrong_key.unwrap_err(), Refusal::Unauthorized);
}

#[tokio::test]
async fn anonymous_has_every_scope_but_a_presented_key_is_still_checked() {
    let c = Callers::new(&[], true, None);
    let anon = authenticate(&c, None).await.unwrap();
    assert_eq!(&**anon.name(), ANONYMOUS);
    assert_eq!(anon.proof(), &Proof::Anonymous);
    let customer = Identity::Customer(UserId::parse("c1").unwrap());
    assert!(anon.authorize(Action::Read, &customer).is_ok());
    assert!(anon.authorize(Action::Invalidate, &customer).is_ok());
    assert!(authenticate(&c, Some(b"Bearer whatever")).await.is_err());
}

#[tokio::test]
async fn policy_refusals_name_the_rule() {
    let c = callers();
    let restricted = authenticate(&c, Some(b"Bearer restricted-key"))
        .await
        .unwrap();
    assert!(
        restricted
            .authorize(Action::Read, &member("a@eu.EXAMPLE.com", UserType::Agent))
            .is_ok()
    );
    let type_refusal = restricted
        .authorize(Action::Read, &member("a@example.com", UserType::CustomUser))
        .unwrap_err();
    assert!(type_refusal.to_string().contains("type CUSTOM_USER"));
    let domain_refusal = restricted
        .authorize(Action::Read, &member("a@badexample.com", UserType::Agent))
        .unwrap_err();
    assert!(domain_refusal.to_string().contains("email domain"));
    assert!(!domain_refusal.to_string().contains("example.com"));
    let customer = Identity::Customer(UserId::parse("c1").unwrap());
    let scope = restricted.authorize(Action::Read, &customer).unwrap_err();
    assert!(scope.to_string().contains("customer_tokens:read"));
}

#[tokio::test]
async fn the_rate_limit_refuses_beyond_the_burst_with_a_wait() {
    let mut limited = client("limited", "limited-key", vec![Scope::TokensRead]);
    limited.rate_limit_per_minute = NonZeroU32::new(2);
    let c = Callers::new(&[limited], false, None);
    let caller = authenticate(&c, Some(b"Bearer limited-key")).await.unwrap();
    assert!(c.admit(&caller).await.is_ok());
    assert!(c.admit(&caller).await.is_ok());
    let Err(Refusal::RateLimited { wait }) = c.admit(&caller).await else {
        panic!("third request in a minute should be limited");
    };
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(30),
        "{wait:?}"
    );
}
