//! `millrace dead-letters list|show|redrive|purge --topic T`: what the worker loop moved to
//! `{T}.dead`, for an operator to look at, send back to `T` once the cause is fixed ("retry all
//! dead"), or delete.
//!
//! The operations themselves ([`millrace_bus::dead_letters`]) use only the `Bus` trait and run in
//! every backend's conformance suite; this module names the topic, runs one operation and says
//! what it did, in plain text.

use std::fmt::Write as _;

use anyhow::Context;
use millrace_bus::dead_letters::{
    self, DeadLetter, Listing, PurgeReport, RedriveReport, ScanOptions, Selection,
};
use millrace_bus::Bus;

/// One dead-letter operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    List,
    Show(Selection),
    Redrive { which: Selection, dry_run: bool },
    Purge { which: Selection, dry_run: bool },
}

/// What an operation printed, and whether it did all it was asked (the exit status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub text: String,
    pub ok: bool,
}

/// The full topic name for `--topic`: `topic` as given if it is under `prefix` (`millrace.0.intake`,
/// `millrace.0.intake.dead`), else under it (`0.intake` with prefix `millrace`).
pub fn resolve_topic(prefix: &str, topic: &str) -> anyhow::Result<String> {
    let topic = topic.trim();
    anyhow::ensure!(
        !topic.is_empty(),
        "--topic is empty: name a topic, e.g. millrace.0.intake"
    );
    anyhow::ensure!(
        !topic.chars().any(|c| c.is_whitespace() || c.is_control()),
        "--topic {topic:?}: a topic name has no spaces or control characters"
    );
    anyhow::ensure!(
        !dead_letters::origin_topic(topic).is_empty() && !topic.ends_with(".dead.dead"),
        "--topic {topic:?}: name the original topic or its .dead topic"
    );
    if prefix.is_empty() || topic == prefix || topic.starts_with(&format!("{prefix}.")) {
        Ok(topic.to_string())
    } else {
        Ok(format!("{prefix}.{topic}"))
    }
}

/// Runs `action` on `topic`'s dead letters (`topic` with or without `.dead`).
pub async fn run(
    bus: &dyn Bus,
    topic: &str,
    action: &Action,
    options: &ScanOptions,
) -> anyhow::Result<Outcome> {
    let dead = millrace_bus::dead_topic(dead_letters::origin_topic(topic));
    let context = || format!("dead letters of {dead} on the {} bus", bus.name());
    Ok(match action {
        Action::List => {
            let listing = dead_letters::list(bus, topic, options)
                .await
                .with_context(context)?;
            Outcome {
                text: describe_listing(&listing, options),
                ok: true,
            }
        }
        Action::Show(which) => {
            let letter = dead_letters::show(bus, topic, which, options)
                .await
                .with_context(context)?;
            Outcome {
                text: describe_letter(&letter),
                ok: true,
            }
        }
        Action::Redrive { which, dry_run } => {
            let report = dead_letters::redrive(bus, topic, which, *dry_run, options)
                .await
                .with_context(context)?;
            Outcome {
                ok: report.refused.is_empty()
                    && report.redriven.iter().all(|r| r.still_on_dead.is_none()),
                text: describe_redrive(&report, options),
            }
        }
        Action::Purge { which, dry_run } => {
            let report = dead_letters::purge(bus, topic, which, *dry_run, options)
                .await
                .with_context(context)?;
            Outcome {
                ok: report.failed.is_empty(),
                text: describe_purge(&report, options),
            }
        }
    })
}

/// The body's size, and the original's if the copy was cut.
fn size(letter: &DeadLetter) -> String {
    match letter.body_cut_from() {
        Some(original) => format!("{} B (cut from {original} B)", letter.body.len()),
        None => format!("{} B", letter.body.len()),
    }
}

fn incomplete_note(complete: bool, options: &ScanOptions) -> String {
    if complete {
        String::new()
    } else {
        format!(
            "note: the scan stopped at its limit ({} messages or {}) while messages were still \
             coming: there may be more; run again\n",
            options.limit,
            humantime::format_duration(options.max_wait)
        )
    }
}

/// The `list` table: position, id, attempt, size, reason and the start of the body.
pub fn describe_listing(listing: &Listing, options: &ScanOptions) -> String {
    let mut out = format!("{}: {} message(s)\n", listing.topic, listing.letters.len());
    if !listing.letters.is_empty() {
        let id_width = listing
            .letters
            .iter()
            .map(|l| l.id.chars().count())
            .max()
            .unwrap_or(2)
            .max(2);
        let _ = writeln!(
            out,
            "{:>4}  {:<id_width$}  {:>7}  {:<12}  {:<50}  body",
            "pos", "id", "attempt", "size", "reason"
        );
        for l in &listing.letters {
            let reason = millrace_bus::limits::bounded_text(l.reason().unwrap_or("-"), 50);
            let _ = writeln!(
                out,
                "{:>4}  {:<id_width$}  {:>7}  {:<12}  {:<50}  {}",
                l.position,
                l.id,
                l.attempt().unwrap_or("-"),
                size(l),
                reason,
                l.preview(60)
            );
        }
    }
    out.push_str(&incomplete_note(listing.complete, options));
    out
}

/// One message whole: its attributes and its body.
pub fn describe_letter(letter: &DeadLetter) -> String {
    let mut out = format!(
        "message {} (position {}, delivered to `inspect` {} time(s))\n",
        letter.id, letter.position, letter.deliveries
    );
    out.push_str("attributes:\n");
    for (k, v) in &letter.attributes {
        let _ = writeln!(
            out,
            "  {k} = {}",
            millrace_bus::limits::bounded_text(v, usize::MAX)
        );
    }
    let _ = writeln!(out, "body ({}):", size(letter));
    match std::str::from_utf8(&letter.body) {
        Ok(text) => {
            out.push_str(text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
        Err(_) => {
            let _ = writeln!(out, "(not UTF-8; hex) {}", hex::encode(&letter.body));
        }
    }
    out
}

/// What a redrive did (or, dry, would do), and what it refused.
pub fn describe_redrive(report: &RedriveReport, options: &ScanOptions) -> String {
    let mut out = String::new();
    let verb = if report.dry_run {
        "would redrive"
    } else {
        "redrove"
    };
    for r in &report.redriven {
        let _ = write!(
            out,
            "{verb} {} ({}) from {} to {}",
            r.letter.id,
            size(&r.letter),
            report.topic,
            report.to
        );
        if let Some(id) = &r.new_id {
            let _ = write!(out, " as {id}");
        }
        if let Some(dropped) = r.letter.dropped_attributes() {
            let _ = write!(
                out,
                " (without the {dropped} attribute(s) the dead copy could not carry)"
            );
        }
        out.push('\n');
        if let Some(why) = &r.still_on_dead {
            let _ = writeln!(
                out,
                "  but its dead copy could not be removed and is still on {}: {why}; purge it with --id {}",
                report.topic, r.letter.id
            );
        }
    }
    for (_, error) in &report.refused {
        let _ = writeln!(out, "refused: {error}");
    }
    let _ = writeln!(
        out,
        "{}: {} {verb}, {} refused{}",
        report.topic,
        report.redriven.len(),
        report.refused.len(),
        if report.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    out.push_str(&incomplete_note(report.complete, options));
    out
}

/// What a purge removed (or, dry, would remove).
pub fn describe_purge(report: &PurgeReport, options: &ScanOptions) -> String {
    let mut out = String::new();
    let verb = if report.dry_run {
        "would purge"
    } else {
        "purged"
    };
    for l in &report.purged {
        let _ = writeln!(
            out,
            "{verb} {} ({}; reason: {}): {}",
            l.id,
            size(l),
            millrace_bus::limits::bounded_text(l.reason().unwrap_or("-"), 200),
            l.preview(60)
        );
    }
    for (l, e) in &report.failed {
        let _ = writeln!(out, "could not purge {}: {e}", l.id);
    }
    let _ = writeln!(
        out,
        "{}: {} {verb}, {} failed{}",
        report.topic,
        report.purged.len(),
        report.failed.len(),
        if report.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    out.push_str(&incomplete_note(report.complete, options));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_named_under_the_prefix_once() {
        let r = |t| resolve_topic("millrace", t).unwrap();
        assert_eq!(r("0.intake"), "millrace.0.intake");
        assert_eq!(r("millrace.0.intake"), "millrace.0.intake");
        assert_eq!(r("millrace.0.intake.dead"), "millrace.0.intake.dead");
        assert_eq!(r("collect.dead"), "millrace.collect.dead");
        let err = resolve_topic("millrace", " ").unwrap_err().to_string();
        assert!(err.contains("--topic is empty"), "{err}");
        let err = resolve_topic("millrace", "a b").unwrap_err().to_string();
        assert!(err.contains("\"a b\""), "{err}");
    }
}
