//! Audit events: written whatever `log.level` says, one per token handed out
//! and per invalidation, none for `HEAD`.

use crate::helpers::*;
use crate::process::{Running, audit_events, command, config_file, upstream};

#[tokio::test]
async fn audit_events_are_written_whatever_the_log_level_and_head_writes_none() {
    for level in ["warn", "token_broker=debug", "error"] {
        let (sim, upstream) = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = command();
        cmd.arg("--config").arg(config_file(
            &dir,
            upstream,
            &format!("[log]\nlevel = \"{level}\"\n"),
        ));
        let mut broker = Running::start_quiet(cmd).await;
        let http = reqwest::Client::new();
        let url = format!(
            "http://{}/v1/tokens?{}",
            broker.api,
            member_query(ALICE, "AGENT")
        );
        let got = http.get(&url).bearer_auth(READER_KEY).send().await.unwrap();
        assert_eq!(got.status(), 200);
        let head = http
            .head(&url)
            .bearer_auth(READER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 405, "HEAD is refused on a token route");
        let vendor_head = http
            .head(format!(
                "http://{}/ext/get-user-token?userId={CUSTOMER_ID}",
                broker.api
            ))
            .bearer_auth(READER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(vendor_head.status(), 405);
        broker.stop().await;

        let audit = audit_events(&broker.output());
        assert_eq!(audit.len(), 1, "level {level}: {audit:?}");
        assert_eq!(audit[0]["outcome"], "issued");
        assert_eq!(audit[0]["caller"], "reader");
        assert_eq!(sim.calls(), 1, "HEAD made no vendor call");
    }
}
