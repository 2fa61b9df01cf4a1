//! Keys belong to their owners: each party's keygen writes only its own private keys, the
//! organisations exchange party documents, and a facilitator rotates its keys in the middle of a
//! run without anything stopping. Services are driven directly on the in-memory bus and stores.

#[path = "support/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use harness::{harness, now, Harness};
use millrace::ingest::{ingest, Expectations, IngestPlan};
use millrace::keygen::{default_role, keygen_party, rotate_party, FACILITATORS, INGESTOR};
use millrace_protocol::config::Config;
use millrace_protocol::layout::{result_key, Window};
use millrace_protocol::results::AggregationResult;

const PARTIES: [&str; 4] = ["alpha", "beta", "collector", "ingestor-1"];

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn aggregation_ids() -> Vec<String> {
    millrace::keygen::default_aggregations()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect()
}

#[test]
fn each_party_generates_only_its_own_private_keys() {
    let root = tempfile::tempdir().unwrap();
    let ids = aggregation_ids();
    // Each organisation on its own machine (its own directory).
    let mut secrets: Vec<(&str, String)> = Vec::new();
    for name in PARTIES {
        let dir = root.path().join(name);
        let (role, index) = default_role(name).unwrap();
        let wrote = keygen_party(&dir, name, role, index, &ids, false).unwrap();
        // Its private keys are under keys/NAME/, and the leader's verify keys with them.
        assert_eq!(wrote.private_dir, dir.join("keys").join(name));
        assert_eq!(wrote.verify_keys.is_empty(), name != "alpha", "{name}");
        for f in files_under(&wrote.private_dir) {
            let text = std::fs::read_to_string(&f).unwrap();
            secrets.push((name, text.trim().to_string()));
        }
        // Refuses to overwrite without --force.
        assert!(keygen_party(&dir, name, role, index, &ids, false).is_err());
    }
    assert!(secrets.len() >= 4 + 2 + ids.len(), "{}", secrets.len());
    // No file of one party holds another party's private key, and no party document holds any.
    for name in PARTIES {
        for f in files_under(&root.path().join(name)) {
            let text = std::fs::read_to_string(&f).unwrap();
            for (owner, secret) in &secrets {
                let own_private = *owner == name && !f.ends_with(format!("{name}.party.toml"));
                assert!(
                    own_private || !text.contains(secret.as_str()),
                    "{} (of {name}) holds a private key of {owner}",
                    f.display()
                );
            }
        }
    }

    // The exchange: alpha receives the others' documents and writes its own config; it can sign
    // as itself, never as beta, and reads no one else's private keys.
    let alpha = root.path().join("alpha");
    for other in ["beta", "ingestor-1", "collector"] {
        std::fs::copy(
            root.path().join(other).join(format!("{other}.party.toml")),
            alpha.join(format!("{other}.party.toml")),
        )
        .unwrap();
    }
    let mut text = String::from(
        "version = 1\n\n[[party]]\ndocument = \"alpha.party.toml\"\nprivate_key_dir = \"keys/alpha\"\n",
    );
    for other in ["beta", "ingestor-1", "collector"] {
        text.push_str(&format!("\n[[party]]\ndocument = \"{other}.party.toml\"\n"));
    }
    text.push_str(
        "\n[[aggregation]]\nid = \"clicks\"\nvdaf = { type = \"count\" }\nwindow = \"1h\"\n\
         grace = \"10m\"\nmax_age = \"1day\"\nmin_reports = 10\n\
         verify_key = \"file:keys/alpha/verify/clicks.verify\"\ningestors = [\"ingestor-1\"]\n",
    );
    let path = alpha.join("millrace.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let signer = config.facilitator_signer(0).unwrap();
    assert_eq!(signer.key_id(), "alpha-1");
    let err = config.facilitator_signer(1).unwrap_err().to_string();
    assert!(err.contains("no private key reference"), "{err}");
    assert!(config.ingestor_signer(INGESTOR).is_err());
    assert_eq!(config.hpke_private_keys(0).unwrap().len(), 1);
    assert!(config.hpke_private_keys(1).is_err());
    config
        .verify_key(config.aggregation("clicks").unwrap())
        .unwrap();
    // Beta's signatures are attributed to beta, by beta's key id.
    assert_eq!(
        config.facilitator_keys().unwrap().key_ids_of("beta"),
        ["beta-1"]
    );
    assert_eq!(config.collectors.len(), 1);
}

async fn write(h: &Harness, config: &Config, from: i64, to: i64, reports: usize) -> Expectations {
    ingest(
        config,
        INGESTOR,
        [&h.stores[0], &h.stores[1]],
        &IngestPlan {
            reports: reports * config.aggregations.len(),
            invalid_fraction: 0.0,
            batch_size: 10,
            start: from,
            end: to,
        },
        |_| {},
    )
    .await
    .unwrap()
}

fn expected<'a>(
    e: &'a Expectations,
    agg: &str,
    w: Window,
) -> &'a millrace::ingest::WindowExpectation {
    e.windows
        .iter()
        .find(|x| x.aggregation == agg && x.window == w.name())
        .unwrap_or_else(|| panic!("no expectation for {agg}/{}", w.name()))
}

/// Exact, or within the noise bound of a DP aggregation.
fn close_enough(
    agg: &millrace_protocol::config::Aggregation,
    released: &millrace_protocol::vdaf::AggregateValue,
    plaintext: &millrace_protocol::vdaf::AggregateValue,
) -> bool {
    millrace_protocol::dp::accepts(
        agg.dp.as_ref().map(|dp| dp.noise_bound()),
        released,
        plaintext,
    )
}

#[tokio::test]
async fn rotation_in_the_middle_of_a_run_keeps_overlap_reports_and_expires_the_old_key() {
    let mut h = harness(0, 0.0, 10).await;
    let config_path = h._dir.path().join("millrace.toml");
    let old = Config::load(&config_path).unwrap();
    let hour = now().div_euclid(3600) * 3600;
    let w = [4, 3, 2].map(|ago| Window::containing(hour - ago * 3600, 3600));

    // Window 0 is ingested and validated before the rotation (alpha signs with alpha-1).
    let first = write(&h, &old, w[0].start, w[0].end, 20).await;
    h.validate_all(now()).await;
    // An ingestor that never hears of the rotation keeps sealing to alpha's HPKE key 1.
    let stale = write(&h, &old, w[1].start, w[2].end, 40).await;
    // Alpha rotates both keys as of window 1's start, with a one-hour overlap: HPKE key 1
    // expires at window 2's start. It restarts its services on the new config.
    let rotation = rotate_party(h._dir.path(), FACILITATORS[0], w[1].start, 3600, true).unwrap();
    assert_eq!(rotation.new_hpke_key, Some(2));
    h.config = Arc::new(Config::load(&config_path).unwrap());
    assert_eq!(h.config.facilitator_signer(0).unwrap().key_id(), "alpha-2");
    // An ingestor with the new document seals window 2's reports to key 2.
    assert_eq!(h.config.hpke_public_key_at(0, w[2].start).unwrap().0, 2);
    let fresh = write(&h, &h.config.clone(), w[2].start, w[2].end, 20).await;
    let t = now();
    h.validate_all(t).await;
    h.complete(t).await;

    for agg in &h.config.aggregations {
        let result = |window: Window| {
            let h = &h;
            let id = agg.id.clone();
            async move {
                let bytes = h
                    .collector
                    .get_required(&result_key(&id, window))
                    .await
                    .unwrap_or_else(|e| panic!("{id}/{}: no result: {e}", window.name()));
                AggregationResult::from_json(&bytes).unwrap()
            }
        };
        // Before the rotation, and during the overlap: every report counts (window 0's
        // validations, signed with the retired alpha-1, still verify).
        for (window, e) in [
            (w[0], expected(&first, &agg.id, w[0])),
            (w[1], expected(&stale, &agg.id, w[1])),
        ] {
            let r = result(window).await;
            assert_eq!(
                (r.report_count, r.invalid_count),
                (e.valid, 0),
                "{}/{}",
                agg.id,
                window.name()
            );
            assert!(close_enough(agg, &r.result, &e.expected), "{}", agg.id);
        }
        // After the expiry: the stale ingestor's reports are invalid as `expired-key`; the
        // fresh ones count; the window completes.
        let r = result(w[2]).await;
        let e_fresh = expected(&fresh, &agg.id, w[2]);
        let e_stale = expected(&stale, &agg.id, w[2]);
        assert_eq!(r.report_count, e_fresh.valid, "{}", agg.id);
        assert!(
            close_enough(agg, &r.result, &e_fresh.expected),
            "{}",
            agg.id
        );
        assert_eq!(
            r.invalid_reasons,
            [("expired-key".to_string(), e_stale.valid)].into(),
            "{}",
            agg.id
        );
    }
}
