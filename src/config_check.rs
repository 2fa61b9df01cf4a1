//! `millrace config publish` and `millrace config check`: two organisations make sure they run
//! the same aggregations before any report flows.
//!
//! `publish` writes the shared parameters and digest of every aggregation in a config into the
//! party's own document (`NAME.party.toml`), which it hands to its peers. `check` compares a local
//! config with a peer's document: for each aggregation, the parameters that differ and both
//! digests; aggregations only one side runs are listed too.

use std::path::Path;

use anyhow::Context;
use millrace_protocol::agreement::{differences, PublishedAggregation};
use millrace_protocol::config::Config;
use millrace_protocol::parties::PartyDocument;

/// Writes every aggregation of `config` into the party document at `document`.
pub fn publish(config: &Config, document: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(document)
        .with_context(|| format!("reading {}", document.display()))?;
    let mut doc = PartyDocument::from_toml(&document.display().to_string(), &text)?;
    let mut published = Vec::new();
    for a in &config.aggregations {
        published.push(PublishedAggregation::new(config.shared_parameters(a)?));
    }
    let n = published.len();
    doc.aggregations = published;
    std::fs::write(document, doc.to_toml())
        .with_context(|| format!("writing {}", document.display()))?;
    Ok(n)
}

/// One aggregation's comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compared {
    pub aggregation: String,
    /// Our digest and theirs (hex); `None` where that side does not run the aggregation.
    pub ours: Option<String>,
    pub theirs: Option<String>,
    /// One line per parameter that differs.
    pub differences: Vec<String>,
}

impl Compared {
    pub fn agrees(&self) -> bool {
        self.ours.is_some() && self.ours == self.theirs
    }
}

/// Compares `config` with the peer's party document at `peer`.
pub fn check(config: &Config, peer: &Path) -> anyhow::Result<(String, Vec<Compared>)> {
    let text =
        std::fs::read_to_string(peer).with_context(|| format!("reading {}", peer.display()))?;
    let doc = PartyDocument::from_toml(&peer.display().to_string(), &text)?;
    let mut out = Vec::new();
    for a in &config.aggregations {
        let ours = config.shared_parameters(a)?;
        let ours_digest = PublishedAggregation::new(ours.clone()).digest;
        match doc.aggregations.iter().find(|p| p.id == a.id) {
            Some(theirs) => out.push(Compared {
                aggregation: a.id.clone(),
                differences: differences(&ours, &theirs.parameters),
                ours: Some(ours_digest),
                theirs: Some(theirs.digest.clone()),
            }),
            None => out.push(Compared {
                aggregation: a.id.clone(),
                ours: Some(ours_digest),
                theirs: None,
                differences: vec![format!("{} does not publish this aggregation", doc.name)],
            }),
        }
    }
    for p in &doc.aggregations {
        if config.aggregation(&p.id).is_none() {
            out.push(Compared {
                aggregation: p.id.clone(),
                ours: None,
                theirs: Some(p.digest.clone()),
                differences: vec!["not in our config".to_string()],
            });
        }
    }
    Ok((doc.name, out))
}

/// Prints a comparison; returns whether every aggregation agrees.
pub fn print(peer: &str, compared: &[Compared]) -> bool {
    let mut all = true;
    for c in compared {
        if c.agrees() {
            println!(
                "{}: same as {peer} (digest {})",
                c.aggregation,
                c.ours.as_deref().unwrap_or_default()
            );
            continue;
        }
        all = false;
        println!(
            "{}: DIFFERS from {peer}: our digest {}, theirs {}",
            c.aggregation,
            c.ours.as_deref().unwrap_or("(none)"),
            c.theirs.as_deref().unwrap_or("(none)")
        );
        for d in &c.differences {
            println!("    {d}");
        }
    }
    all
}
