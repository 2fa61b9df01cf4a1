//! `millrace`: keygen, ingest, submit, demo, status, replay, bench.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use millrace::demo::{print_table, run_demo, DemoOptions};
use millrace::ingest::{ingest, IngestPlan};
use millrace_protocol::config::Config;
use millrace_store::Store;

/// Millrace: Prio3 private aggregation as a fleet of services on a message bus.
#[derive(Parser, Debug)]
#[command(name = "millrace", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One party's own keys and its public party document (--party NAME); without --party,
    /// every party's plus a ready config, on one machine (demos and tests).
    Keygen {
        /// Directory for NAME.party.toml and keys/NAME/ (and, without --party, millrace.toml).
        #[arg(long, env = "MILLRACE_DIR", default_value = "millrace")]
        dir: PathBuf,
        /// The party to generate keys for: alpha and beta (facilitators 0 and 1), collector,
        /// ingestor-N; any other name needs --role (and --index for a facilitator).
        #[arg(long)]
        party: Option<String>,
        #[arg(long, requires = "party", value_parser = ["ingestor", "facilitator", "collector"])]
        role: Option<String>,
        #[arg(long, requires = "party")]
        index: Option<u8>,
        /// For the leader (facilitator 0): the aggregations to generate verify keys for
        /// (repeatable; default: the default config's).
        #[arg(long = "aggregation", requires = "party")]
        aggregations: Vec<String>,
        /// Replace an existing config (or party document) and its keys.
        #[arg(long)]
        force: bool,
        /// The config's window length (whole hours, or minutes dividing an hour: `1m`, `5m`).
        #[arg(long, conflicts_with = "party", default_value = "1h")]
        window: String,
        /// How long after a window ends batches may still arrive.
        #[arg(long, conflicts_with = "party", default_value = "10m")]
        grace: String,
        /// Minute-long windows, 10 s grace, 10 min max age (what `demo` and `make e2e` use);
        /// overrides --window and --grace.
        #[arg(long, conflicts_with = "party")]
        short_windows: bool,
    },
    /// Key rotation: `millrace keys rotate --party NAME --dir DIR --overlap 1day`.
    Keys {
        #[command(subcommand)]
        what: KeysCommand,
    },
    /// Two organisations agree on their aggregations: `config publish`, `config check`.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Simulated clients: reports with known measurements, made now and sent through an
    /// ingestor's upload API (`--ingestor-url`), some broken on purpose; with
    /// `--direct-to-stores`, signed batches over the last three closed hours written straight into
    /// both facilitators' stores instead (no ingestor; for benchmarks and step-by-step tests).
    Ingest {
        #[arg(long, env = "MILLRACE_CONFIG")]
        config: PathBuf,
        /// The ingestor party: which aggregations take reports (and, with --direct-to-stores,
        /// whose key signs the batches).
        #[arg(long, default_value = millrace::keygen::INGESTOR)]
        ingestor: String,
        /// The ingestor service's base URL.
        #[arg(
            long,
            env = "MILLRACE_INGESTOR_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        ingestor_url: String,
        /// Bypass the ingestor service: sign batches with the ingestor party's key and write
        /// them into --store0 and --store1, timed over the last three closed hours.
        #[arg(long, requires_all = ["store0", "store1"])]
        direct_to_stores: bool,
        /// Facilitator 0's store (with --direct-to-stores).
        #[arg(long, requires = "direct_to_stores")]
        store0: Option<String>,
        /// Facilitator 1's store (with --direct-to-stores).
        #[arg(long, requires = "direct_to_stores")]
        store1: Option<String>,
        /// Reports in all, split across the aggregations.
        #[arg(long, default_value_t = 20_000)]
        reports: usize,
        /// Share of reports made invalid on purpose.
        #[arg(long, default_value_t = 0.02)]
        invalid_fraction: f64,
        /// Reports per upload body (per batch, with --direct-to-stores).
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Upload requests in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Write each window's expected result (JSON) here.
        #[arg(long)]
        expect_out: Option<PathBuf>,
    },
    /// Sends one report through an ingestor, as a client would: `millrace submit --aggregation
    /// clicks 1`. VALUE is read as the aggregation's VDAF takes it: Count 0 or 1, Sum a number,
    /// Histogram a bucket index, SumVec comma-separated numbers.
    Submit {
        /// The ingestor's base URL.
        #[arg(
            long,
            env = "MILLRACE_INGESTOR_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        ingestor_url: String,
        #[arg(long)]
        aggregation: String,
        value: String,
        /// Seal the report but write its upload encoding to this file instead of sending it
        /// (to send it with curl: `Content-Type: application/vnd.millrace.report`).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Everything in one process: keygen (minute-long windows), both facilitators' services,
    /// the mill and an ingestor on a loopback port; simulated clients send reports through the
    /// ingestor until every window has a result; then each result beside the plaintext result.
    Demo {
        #[arg(long, default_value_t = 20_000)]
        reports: usize,
        #[arg(long, default_value_t = 0.02)]
        invalid_fraction: f64,
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Keep keys, config and stores in this directory (default: a temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
    },
    /// Every window of every aggregation: both facilitators' progress side by side, why a window
    /// waits, the results; with --bus, the messages waiting on each topic's .dead and .rejected.
    /// As tables, --json, or a page (--serve). Exit 0 ok, 1 --expect differs, 2 could not run,
    /// 3 a problem (FAILED, REFUSED, unreadable, dead letters) with --fail-on-problems.
    Status(millrace::status::StatusArgs),
    /// Publish one batch's intake task or one window's aggregate task again (recovery after an
    /// outage or a bad deploy), through the marker protocol, recording who, when and why.
    Replay {
        #[command(subcommand)]
        what: ReplayCommand,
        #[command(flatten)]
        common: ReplayArgs,
    },
    /// What the worker loop moved to `{topic}.dead`: list it, show one message, redrive the
    /// originals to the topic once the cause is fixed, or purge them.
    DeadLetters {
        #[command(subcommand)]
        what: DeadLettersCommand,
        #[command(flatten)]
        common: DeadLettersArgs,
    },
    /// Benchmarks (not tests).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Writes the shared parameters and digest of every aggregation in --config into this
    /// party's document, to hand to its peers.
    Publish {
        #[arg(long, env = "MILLRACE_CONFIG")]
        config: PathBuf,
        /// The party document to update (NAME.party.toml).
        #[arg(long)]
        document: PathBuf,
    },
    /// Compares --config with a peer's party document: for each aggregation, the parameters
    /// that differ and both digests. Exit 0 if every aggregation agrees, 3 if any differs, 1 if
    /// the comparison could not run.
    Check {
        #[arg(long, env = "MILLRACE_CONFIG")]
        config: PathBuf,
        /// The peer's party document.
        #[arg(long)]
        peer: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Adds a new HPKE key (a facilitator), active now, and expires the previous one after
    /// --overlap; with --signing, also a new signing key, retiring the previous one. Rewrites
    /// DIR/NAME.party.toml: hand it to the other parties again.
    Rotate {
        #[arg(long, env = "MILLRACE_DIR", default_value = "millrace")]
        dir: PathBuf,
        #[arg(long)]
        party: String,
        /// How long reports sealed to the previous HPKE key still count.
        #[arg(long, default_value = "1day", value_parser = humantime::parse_duration)]
        overlap: std::time::Duration,
        #[arg(long)]
        signing: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ReplayCommand {
    /// One ingestion batch's intake task.
    Batch {
        #[arg(long)]
        aggregation: String,
        #[arg(long)]
        batch: String,
        /// The batch's partition (YYYY/MM/DD/HH); searched for if not given.
        #[arg(long)]
        partition: Option<String>,
    },
    /// One window's aggregate task (naming the newest manifest in the facilitator's store); with
    /// --reaggregate, the whole window again under a new manifest generation (leader only).
    Window {
        #[arg(long)]
        aggregation: String,
        /// As in object keys: 20261123T1200Z-20261123T1300Z.
        #[arg(long)]
        window: String,
        /// Re-run a FAILED or stuck window end to end: the leader (--facilitator 0) writes the
        /// next manifest generation to both stores and publishes its task; the helper follows,
        /// both write new sum parts, and the mill joins them. Refused once the window SUCCEEDED.
        #[arg(long, requires_all = ["peer_store", "collector_store"])]
        reaggregate: bool,
        /// With --reaggregate: the helper's store (the manifest goes to both).
        #[arg(long, env = "MILLRACE_PEER_STORE")]
        peer_store: Option<String>,
        /// With --reaggregate: the collector's store (a window with a result is refused).
        #[arg(long, env = "MILLRACE_COLLECTOR_STORE")]
        collector_store: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// The aggregations file (TOML).
    #[arg(long, env = "MILLRACE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Whose task: facilitator 0 or 1.
    #[arg(long, env = "MILLRACE_FACILITATOR", global = true,
          value_parser = clap::value_parser!(u8).range(0..=1))]
    facilitator: Option<u8>,
    /// That facilitator's object store.
    #[arg(long, env = "MILLRACE_STORE", global = true)]
    store: Option<String>,
    /// Message bus URL.
    #[arg(long, env = "MILLRACE_BUS", global = true)]
    bus: Option<String>,
    #[arg(
        long,
        env = "MILLRACE_TOPIC_PREFIX",
        default_value = "millrace",
        global = true
    )]
    topic_prefix: String,
    /// Why (recorded with the replay).
    #[arg(long, global = true)]
    reason: Option<String>,
    /// Who replays (recorded); default user@host.
    #[arg(long, global = true)]
    by: Option<String>,
    /// Say what would be published; write and publish nothing.
    #[arg(long, global = true)]
    dry_run: bool,
}

#[derive(Subcommand, Debug)]
enum DeadLettersCommand {
    /// Every message on `{topic}.dead` (id, attempt, size, reason, the start of the body);
    /// nothing is removed.
    List,
    /// One message whole: its attributes and body.
    Show {
        #[command(flatten)]
        which: DeadLetterOne,
    },
    /// Republishes the original body and attributes (without the ones the worker added) to the
    /// topic, then removes the dead copy. A copy whose body was cut to fit the broker is refused.
    Redrive {
        #[command(flatten)]
        which: DeadLetterSelection,
        /// Say what would be redriven; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Removes messages from `{topic}.dead`, printing each.
    Purge {
        #[command(flatten)]
        which: DeadLetterSelection,
        /// Say what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct DeadLetterOne {
    /// The message's id, as `list` shows it.
    #[arg(long)]
    id: Option<String>,
    /// The message's position in `list` (1-based; messages are sorted by id).
    #[arg(long)]
    position: Option<usize>,
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct DeadLetterSelection {
    /// The message's id, as `list` shows it.
    #[arg(long)]
    id: Option<String>,
    /// The message's position in `list` (1-based; messages are sorted by id).
    #[arg(long)]
    position: Option<usize>,
    /// Every message on `{topic}.dead`.
    #[arg(long)]
    all: bool,
}

impl DeadLetterSelection {
    fn selection(self) -> millrace_bus::dead_letters::Selection {
        use millrace_bus::dead_letters::Selection;
        match (self.id, self.position) {
            (Some(id), _) => Selection::Id(id),
            (None, Some(position)) => Selection::Position(position),
            (None, None) => Selection::All,
        }
    }
}

#[derive(clap::Args, Debug)]
struct DeadLettersArgs {
    /// Message bus URL.
    #[arg(long, env = "MILLRACE_BUS", global = true)]
    bus: Option<String>,
    #[arg(
        long,
        env = "MILLRACE_TOPIC_PREFIX",
        default_value = "millrace",
        global = true
    )]
    topic_prefix: String,
    /// The topic (`0.intake`, `millrace.0.intake` or `millrace.0.intake.dead`).
    #[arg(long, global = true)]
    topic: Option<String>,
    /// A scan of `{topic}.dead` ends once nothing new has come for this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, global = true)]
    idle: Duration,
    /// ... and after this long at most.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    max_wait: Duration,
    /// The most messages one run handles.
    #[arg(long, default_value_t = 1000, global = true)]
    limit: usize,
    /// What a scan saw is deliverable again only after this, and a scan lasts at least this long
    /// (on NATS, shorter loses messages to a withdrawn pull request until their lease runs out).
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration, global = true)]
    release_delay: Duration,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Messages/s and publish→handled latency through the worker loop on one bus.
    Bus {
        /// The bus URL (memory:// runs the in-process bus).
        #[arg(long, default_value = "memory://")]
        bus: String,
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        #[arg(long, default_value_t = 1024)]
        body_size: usize,
        #[arg(long, default_value_t = 5)]
        concurrency: usize,
        /// Concurrent publishing tasks.
        #[arg(long, default_value_t = 8)]
        publishers: usize,
    },
    /// One workflow-manager pass over settled history plus new batches (local-file store).
    Scan {
        /// History sizes (settled batches within the horizon), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        settled: Vec<usize>,
        /// New batches in the current hour.
        #[arg(long, default_value_t = 100)]
        new: usize,
        /// Leave the history unsettled (every pass lists it all): the comparison.
        #[arg(long)]
        unsettled: bool,
    },
    /// The aggregate-worker's peak memory for one window of Sum reports (batches of 1,000).
    Aggregate {
        #[arg(long, default_value_t = 100_000)]
        reports: usize,
    },
    /// (Internal) the child process of `bench aggregate`.
    #[command(hide = true)]
    AggregateChild {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        task: String,
    },
    /// The fleet's reports/s beside the bare prio + HPKE rate for the same reports.
    Vdaf {
        #[arg(long, default_value_t = 40_000)]
        reports: usize,
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
    },
    /// The ingestor (the `ingestor` binary, as a child process): reports/s accepted and upload
    /// latency with pre-sealed reports, single and bulk, beside the client's shard + seal rate
    /// on one core; then its memory under a sustained overload.
    Ingest(millrace::bench_ingest::IngestBenchOptions),
}

#[tokio::main]
async fn main() -> ExitCode {
    millrace_runtime::telemetry::init_logging("warn");
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("millrace: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen {
            dir,
            party: None,
            force,
            window,
            grace,
            short_windows,
            ..
        } => {
            let timing = if short_windows {
                millrace::keygen::WindowTiming::minutes()
            } else {
                millrace::keygen::WindowTiming {
                    window,
                    grace,
                    ..Default::default()
                }
            };
            let path = millrace::keygen::keygen_with(&dir, force, &timing)?;
            println!(
                "wrote {}, the party documents {}/*.party.toml and every party's keys in {}/keys/",
                path.display(),
                dir.display(),
                dir.display()
            );
        }
        Command::Keygen {
            dir,
            party: Some(name),
            role,
            index,
            aggregations,
            force,
            ..
        } => {
            use millrace_protocol::parties::PartyRole;
            let (role, index) = match role.as_deref() {
                Some("ingestor") => (PartyRole::Ingestor, None),
                Some("collector") => (PartyRole::Collector, None),
                Some(_) => (PartyRole::Facilitator, index),
                None => millrace::keygen::default_role(&name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "party {name:?} is not one of the default config's (alpha, beta, \
                         collector, ingestor-N): say --role (and --index for a facilitator)"
                    )
                })?,
            };
            let aggregations = if aggregations.is_empty() {
                millrace::keygen::default_aggregations()
                    .into_iter()
                    .map(|(id, _, _)| id)
                    .collect()
            } else {
                aggregations
            };
            let wrote =
                millrace::keygen::keygen_party(&dir, &name, role, index, &aggregations, force)?;
            println!(
                "wrote {name}'s party document {} (hand it to the other parties)",
                wrote.document.display()
            );
            println!(
                "wrote {name}'s private keys in {} (they stay with {name})",
                wrote.private_dir.display()
            );
            if !wrote.verify_keys.is_empty() {
                println!(
                    "wrote {} verify keys in {}/verify/: hand them to the helper (facilitator \
                     1) over a secure channel, and to nobody else",
                    wrote.verify_keys.len(),
                    wrote.private_dir.display()
                );
            }
        }
        Command::Config {
            what: ConfigCommand::Publish { config, document },
        } => {
            let config = Config::load(&config)?;
            let n = millrace::config_check::publish(&config, &document)?;
            println!(
                "published {n} aggregations in {}: hand it to your peers",
                document.display()
            );
        }
        Command::Config {
            what: ConfigCommand::Check { config, peer },
        } => {
            let config = Config::load(&config)?;
            let (name, compared) = millrace::config_check::check(&config, &peer)?;
            if !millrace::config_check::print(&name, &compared) {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Keys {
            what:
                KeysCommand::Rotate {
                    dir,
                    party,
                    overlap,
                    signing,
                },
        } => {
            let now = chrono::Utc::now().timestamp();
            let overlap_secs = i64::try_from(overlap.as_secs()).unwrap_or(i64::MAX);
            let what = millrace::keygen::rotate_party(&dir, &party, now, overlap_secs, signing)?;
            if let Some(id) = what.new_hpke_key {
                println!("{party}: new HPKE key {id}, active now");
            }
            for (id, at) in &what.expiring {
                println!("{party}: HPKE key {id} expires {at}");
            }
            if let Some(id) = &what.new_signing_key {
                println!(
                    "{party}: new signing key {id}; retired {}",
                    what.retired_signing_keys.join(", ")
                );
            }
            println!(
                "hand {} to the other parties again, and restart {party}'s services",
                millrace::keygen::document_path(&dir, &party).display()
            );
        }
        Command::Ingest {
            config,
            ingestor,
            ingestor_url,
            direct_to_stores,
            store0,
            store1,
            reports,
            invalid_fraction,
            batch_size,
            concurrency,
            expect_out,
        } => {
            let config = Config::load(&config)?;
            let exp = match (direct_to_stores, store0, store1) {
                (true, Some(store0), Some(store1)) => {
                    let stores = [Store::open(&store0)?, Store::open(&store1)?];
                    let (start, end) = millrace::demo::past_span(chrono::Utc::now().timestamp());
                    let plan = IngestPlan {
                        reports,
                        invalid_fraction,
                        batch_size,
                        start,
                        end,
                    };
                    let exp =
                        ingest(&config, &ingestor, [&stores[0], &stores[1]], &plan, |_| {}).await?;
                    println!(
                        "wrote {} reports in {} windows straight into both stores",
                        exp.reports,
                        exp.windows.len()
                    );
                    exp
                }
                (true, _, _) => anyhow::bail!("--direct-to-stores needs --store0 and --store1"),
                (false, _, _) => {
                    let client = Arc::new(millrace_client::Client::new(&ingestor_url)?);
                    let plan = millrace::ingest::UploadPlan {
                        reports,
                        invalid_fraction,
                        bulk_size: batch_size,
                        concurrency,
                    };
                    let (exp, repeats) =
                        millrace::ingest::upload(&config, &ingestor, client, &plan, |_| {}).await?;
                    println!(
                        "sent {} reports in {} windows through {ingestor_url} ({repeats} repeated \
                         reports acknowledged and stored once)",
                        exp.reports,
                        exp.windows.len()
                    );
                    exp
                }
            };
            if let Some(path) = expect_out {
                std::fs::write(&path, serde_json::to_vec_pretty(&exp)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Command::Submit {
            ingestor_url,
            aggregation,
            value,
            write,
        } => {
            let client = millrace_client::Client::new(&ingestor_url)?;
            let config = client.aggregation(&aggregation).await?;
            let measurement =
                millrace_client::parse_measurement(&config.document.aggregation.vdaf, &value)?;
            if let Some(path) = write {
                let report = config.seal(&measurement, chrono::Utc::now().timestamp())?;
                std::fs::write(&path, report.encode()?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!(
                    "wrote a sealed report for aggregation {aggregation} to {} (not sent)",
                    path.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let receipt = client.submit(&aggregation, &measurement).await?;
            println!(
                "report accepted for aggregation {aggregation} by {ingestor_url}{}",
                if receipt.duplicates > 0 {
                    " (it had it already)"
                } else {
                    ""
                }
            );
        }
        Command::Demo {
            reports,
            invalid_fraction,
            batch_size,
            dir,
            timeout_secs,
        } => {
            let outcome = run_demo(&DemoOptions {
                dir,
                reports,
                invalid_fraction,
                batch_size,
                timeout: Duration::from_secs(timeout_secs),
                show_progress: true,
            })
            .await?;
            print_table(&outcome);
            if !outcome.all_correct() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status(args) => {
            // Exit codes of their own (see StatusArgs): an error here means status could not run.
            return Ok(match millrace::status::run(args).await {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("millrace status: {e:#}");
                    ExitCode::from(millrace::status::EXIT_CANNOT_RUN)
                }
            });
        }
        Command::Replay { what, common } => {
            let need = |v: Option<String>, flag: &str| {
                v.ok_or_else(|| anyhow::anyhow!("millrace replay needs --{flag}"))
            };
            let config_path = common
                .config
                .ok_or_else(|| anyhow::anyhow!("millrace replay needs --config"))?;
            let facilitator = common
                .facilitator
                .ok_or_else(|| anyhow::anyhow!("millrace replay needs --facilitator"))?;
            let store = need(common.store, "store")?;
            let bus_url = need(common.bus, "bus")?;
            let reason = need(common.reason, "reason")?;
            let request = millrace::replay::ReplayRequest {
                config: Arc::new(Config::load(&config_path)?),
                facilitator,
                store: Store::open(&store)?,
                bus: millrace_bus::connect(&bus_url).await.with_context(|| {
                    format!("opening the bus {}", millrace_secrets::redact(&bus_url))
                })?,
                topic_prefix: common.topic_prefix,
                by: common.by.unwrap_or_else(millrace::replay::default_operator),
                reason,
                dry_run: common.dry_run,
            };
            if let ReplayCommand::Window {
                aggregation,
                window,
                reaggregate: true,
                peer_store,
                collector_store,
            } = &what
            {
                let peer = Store::open(&need(peer_store.clone(), "peer-store")?)?;
                let collector = Store::open(&need(collector_store.clone(), "collector-store")?)?;
                let done =
                    millrace::replay::reaggregate(request, peer, &collector, aggregation, window)
                        .await?;
                print!("{}", millrace::replay::describe_reaggregated(&done));
                return Ok(ExitCode::SUCCESS);
            }
            let target = match what {
                ReplayCommand::Batch {
                    aggregation,
                    batch,
                    partition,
                } => millrace_workflow_manager::ReplayTarget::Batch {
                    aggregation,
                    batch,
                    partition,
                },
                ReplayCommand::Window {
                    aggregation,
                    window,
                    ..
                } => millrace_workflow_manager::ReplayTarget::Window {
                    aggregation,
                    window,
                },
            };
            let done = millrace::replay::replay(request, &target).await?;
            print!("{}", millrace::replay::describe(&done));
        }
        Command::DeadLetters { what, common } => {
            use millrace::dead_letters::Action;
            let bus_url = common
                .bus
                .ok_or_else(|| anyhow::anyhow!("millrace dead-letters needs --bus"))?;
            let topic = common
                .topic
                .ok_or_else(|| anyhow::anyhow!("millrace dead-letters needs --topic"))?;
            anyhow::ensure!(common.limit > 0, "--limit must be at least 1");
            let topic = millrace::dead_letters::resolve_topic(&common.topic_prefix, &topic)?;
            let action = match what {
                DeadLettersCommand::List => Action::List,
                DeadLettersCommand::Show { which } => {
                    Action::Show(match (which.id, which.position) {
                        (Some(id), _) => millrace_bus::dead_letters::Selection::Id(id),
                        (None, Some(n)) => millrace_bus::dead_letters::Selection::Position(n),
                        (None, None) => {
                            anyhow::bail!("millrace dead-letters show needs --id or --position")
                        }
                    })
                }
                DeadLettersCommand::Redrive { which, dry_run } => Action::Redrive {
                    which: which.selection(),
                    dry_run,
                },
                DeadLettersCommand::Purge { which, dry_run } => Action::Purge {
                    which: which.selection(),
                    dry_run,
                },
            };
            let bus = millrace_bus::connect(&bus_url).await.with_context(|| {
                format!("opening the bus {}", millrace_secrets::redact(&bus_url))
            })?;
            let options = millrace_bus::dead_letters::ScanOptions {
                idle: common.idle,
                max_wait: common.max_wait,
                limit: common.limit,
                release_delay: common.release_delay,
            };
            let outcome = millrace::dead_letters::run(&*bus, &topic, &action, &options).await?;
            print!("{}", outcome.text);
            if !outcome.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Bench {
            what:
                BenchCommand::Scan {
                    settled,
                    new,
                    unsettled,
                },
        } => {
            println!(
                "{:>15} {:>6} {:>12} {:>12} {:>19}",
                "settled batches", "new", "pass with new", "idle pass", "partitions listed"
            );
            for row in millrace::bench_windows::bench_scan(&settled, new, !unsettled).await? {
                println!(
                    "{:>15} {:>6} {:>10.1}ms {:>10.1}ms {:>19}",
                    row.settled_batches,
                    row.new_batches,
                    row.first_pass.as_secs_f64() * 1e3,
                    row.idle_pass.as_secs_f64() * 1e3,
                    row.partitions_listed
                );
            }
        }
        Command::Bench {
            what: BenchCommand::Aggregate { reports },
        } => {
            let dir = tempfile::tempdir().context("a temporary directory")?;
            let started = std::time::Instant::now();
            let task = millrace::bench_windows::prepare_aggregate(dir.path(), reports).await?;
            println!(
                "prepared one window of {reports} Sum reports in {:.0} s (ingest, intake on both sides, manifest)",
                started.elapsed().as_secs_f64()
            );
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(["bench", "aggregate-child", "--dir"])
                .arg(dir.path())
                .args([
                    "--task",
                    &String::from_utf8_lossy(&millrace_protocol::tasks::TaskMessage::to_json(
                        &task,
                    )),
                ])
                .output()
                .context("running the aggregate-worker child process")?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            anyhow::ensure!(
                out.status.success(),
                "the child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Command::Bench {
            what: BenchCommand::AggregateChild { dir, task },
        } => {
            let task = <millrace_protocol::tasks::AggregateTask as millrace_protocol::tasks::TaskMessage>::from_json(task.as_bytes())?;
            let run = millrace::bench_windows::run_aggregate(&dir, &task).await?;
            println!(
                "aggregate-worker: {} reports in {:.1} s, peak RSS {}",
                run.reports,
                run.elapsed.as_secs_f64(),
                run.peak_rss_bytes
                    .map(|b| format!("{:.1} MB", b as f64 / 1e6))
                    .unwrap_or_else(|| "unknown (no /proc)".to_string())
            );
        }
        Command::Bench {
            what:
                BenchCommand::Bus {
                    bus,
                    messages,
                    body_size,
                    concurrency,
                    publishers,
                },
        } => {
            let handle: Arc<dyn millrace_bus::Bus> = if bus.starts_with("memory:") {
                Arc::new(millrace_bus::memory::MemoryBus::new())
            } else {
                millrace_bus::connect(&bus).await.with_context(|| {
                    format!("opening the bus {}", millrace_secrets::redact(&bus))
                })?
            };
            let topic = format!(
                "bench-{}-{}",
                std::process::id(),
                chrono::Utc::now().timestamp()
            );
            let r = millrace::bench::bench_bus_worker(
                handle.clone(),
                &topic,
                messages,
                body_size,
                concurrency,
                publishers,
            )
            .await?;
            println!(
                "{}: worker loop: {} messages of {body_size} B: {:.0} msg/s, publish→handled p50 {:.2} ms, p99 {:.2} ms",
                handle.name(),
                r.messages,
                r.per_sec,
                r.p50_ms,
                r.p99_ms
            );
            // The plainest loop the same client crate allows, against the same broker, on its
            // own topic, with the worker's prefetch.
            let reference_topic = format!("{topic}-reference");
            let (scheme, rest) = bus.split_once("://").unwrap_or((bus.as_str(), ""));
            let reference = match scheme {
                "amqp" | "amqps" => Some((
                    "lapin",
                    millrace::bench_reference::reference_amqp(
                        &bus,
                        &reference_topic,
                        messages,
                        body_size,
                        publishers,
                        u16::try_from(concurrency).unwrap_or(u16::MAX),
                    )
                    .await?,
                )),
                "nats" => Some((
                    "async-nats",
                    millrace::bench_reference::reference_nats(
                        &bus,
                        &reference_topic,
                        messages,
                        body_size,
                        publishers,
                        concurrency,
                    )
                    .await?,
                )),
                "kafka" => {
                    let bootstrap = rest.split(['/', '?']).next().unwrap_or_default();
                    Some((
                        "rdkafka",
                        millrace::bench_reference::reference_kafka(
                            bootstrap,
                            &reference_topic,
                            messages,
                            body_size,
                            publishers,
                        )
                        .await?,
                    ))
                }
                _ => None,
            };
            if let Some((krate, reference)) = reference {
                println!(
                    "reference (plain {krate} loop): {:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms",
                    reference.per_sec, reference.p50_ms, reference.p99_ms
                );
                println!(
                    "worker loop / reference: {:.1}%",
                    100.0 * r.per_sec / reference.per_sec
                );
            }
        }
        Command::Bench {
            what:
                BenchCommand::Vdaf {
                    reports,
                    batch_size,
                },
        } => {
            let o = millrace::bench::bench_vdaf(reports, batch_size).await?;
            println!("reports: {} on {} threads", o.reports, o.threads);
            println!(
                "bare prio + HPKE (both facilitators): {:>10.0} reports/s",
                o.bare_per_sec
            );
            println!(
                "millrace fleet (one process, memory bus, file stores): {:>10.0} reports/s",
                o.fleet_per_sec
            );
            println!(
                "fleet / bare: {:.1}%",
                100.0 * o.fleet_per_sec / o.bare_per_sec
            );
            if !o.all_correct {
                println!("SOME RESULTS DIFFER FROM THE PLAINTEXT RESULT");
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Bench {
            what: BenchCommand::Ingest(options),
        } => {
            print!("{}", millrace::bench_ingest::bench_ingest(&options).await?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
