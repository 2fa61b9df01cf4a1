//! `millrace keygen`: keys and a ready config for one ingestor, two facilitators and a collector.

use std::path::{Path, PathBuf};

use anyhow::Context;
use millrace_protocol::config::{AggregationEntry, ConfigFile, FacilitatorEntry, IngestorEntry};
use millrace_protocol::crypto::{hpke_generate, Signer25519, VerifyKey};
use millrace_protocol::vdaf::VdafSpec;

pub const INGESTOR: &str = "ingestor-1";
pub const FACILITATORS: [&str; 2] = ["alpha", "beta"];

/// The aggregations a new deployment starts with: one of each Prio3 variant.
pub fn default_aggregations() -> Vec<(String, VdafSpec)> {
    vec![
        ("clicks".to_string(), VdafSpec::Count {}),
        (
            "spend".to_string(),
            VdafSpec::Sum {
                max_measurement: 1000,
            },
        ),
        (
            "latency".to_string(),
            VdafSpec::Histogram {
                length: 10,
                chunk_length: 3,
            },
        ),
        (
            "features".to_string(),
            VdafSpec::SumVec {
                max_measurement: 15,
                length: 8,
                chunk_length: 3,
            },
        ),
    ]
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{text}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

/// Writes `dir/keys/*` and `dir/millrace.toml`; returns the config's path. Refuses to overwrite an
/// existing config unless `force`.
pub fn keygen(dir: &Path, force: bool) -> anyhow::Result<PathBuf> {
    let config_path = dir.join("millrace.toml");
    if config_path.exists() && !force {
        anyhow::bail!(
            "{} already exists (use --force to replace it and its keys)",
            config_path.display()
        );
    }
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).with_context(|| format!("creating {}", keys.display()))?;

    let ingestor = Signer25519::generate(INGESTOR);
    write_secret(
        &keys.join(format!("{INGESTOR}.ed25519")),
        &ingestor.to_hex(),
    )?;
    let mut facilitators = Vec::new();
    for (index, name) in FACILITATORS.iter().enumerate() {
        let signer = Signer25519::generate(*name);
        let (hpke_sk, hpke_pk) = hpke_generate();
        write_secret(&keys.join(format!("{name}.ed25519")), &signer.to_hex())?;
        write_secret(&keys.join(format!("{name}.hpke")), &hpke_sk.to_hex())?;
        facilitators.push(FacilitatorEntry {
            index: index as u8,
            name: name.to_string(),
            signing_public_key: signer.public_hex(),
            hpke_public_key: hpke_pk.to_hex(),
            signing_key: Some(format!("file:keys/{name}.ed25519")),
            hpke_private_key: Some(format!("file:keys/{name}.hpke")),
        });
    }
    let mut aggregations = Vec::new();
    for (id, vdaf) in default_aggregations() {
        write_secret(
            &keys.join(format!("{id}.verify")),
            &VerifyKey::generate().to_hex(),
        )?;
        aggregations.push(AggregationEntry {
            id: id.clone(),
            vdaf,
            window: "1h".to_string(),
            grace: "10m".to_string(),
            max_age: "1day".to_string(),
            min_reports: 10,
            peer_deadline: Some("10m".to_string()),
            wait_deadline: Some("1h".to_string()),
            verify_key: format!("file:keys/{id}.verify"),
            ingestors: vec![INGESTOR.to_string()],
        });
    }
    let file = ConfigFile {
        ingestor: vec![IngestorEntry {
            name: INGESTOR.to_string(),
            public_key: ingestor.public_hex(),
            private_key: Some(format!("file:keys/{INGESTOR}.ed25519")),
        }],
        facilitator: facilitators,
        aggregation: aggregations,
    };
    let text = toml::to_string_pretty(&file).context("rendering the config")?;
    let header = "# Millrace aggregations, written by `millrace keygen`.\n\
                  # Private keys are referenced (file:PATH relative to this file, or env:VAR), never inlined:\n\
                  # give each service only the key files it needs.\n\n";
    std::fs::write(&config_path, format!("{header}{text}"))
        .with_context(|| format!("writing {}", config_path.display()))?;
    Ok(config_path)
}
