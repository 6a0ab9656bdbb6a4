//! `walq`: the command-line tool of the walq queue. `bench` shows what walq
//! does on this disk; `inspect`, `verify`, `dump` and `tail` read a queue
//! directory without modifying it (even while a live queue writes it);
//! `produce` appends records; `repair` cuts a damaged log after asking;
//! `consumer` and `group` list (read-only), reset and delete named consumers
//! and consumer groups; `serve` runs the HTTP sidecar (`walq-server`).

mod bench;
mod bench_http;
mod consumers;
mod output;
mod read;
mod serve;
mod write;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// The exit codes, also listed in `--help` (keep the two in step).
mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// `verify` found problems; `repair` found damage and cut nothing.
    pub const PROBLEMS: u8 = 1;
    /// Bad arguments or options (clap uses 2 too), a record over the limit.
    pub const USAGE: u8 = 2;
    /// The queue directory, consumer or group does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// A live queue holds the directory lock (or the consumer is open).
    pub const LOCKED: u8 = 4;
    /// Damaged data stopped the command.
    pub const CORRUPT: u8 = 5;
    /// An I/O error (a full disk included).
    pub const IO: u8 = 6;
    /// A file written by a newer walq.
    pub const UNSUPPORTED: u8 = 7;
}

const CONSUMER_EXIT_CODES_HELP: &str = "\
Exit codes: 0 success; 2 usage (a bad name, an offset outside the log);
3 not found (the queue directory, the consumer or the group); 4 locked (a live
queue holds the directory: reset and delete need its lock, list does not);
6 I/O error; 7 a consumers.journal written by a newer walq. See walq --help.";

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  verify found problems; repair found damage and cut nothing (declined, --dry-run)
  2  usage: bad arguments or options, a record over the size limit
  3  not found: the queue directory, consumer or group does not exist
  4  locked: a live queue holds the directory (produce, repair, consumer
     reset/delete, group delete), or the consumer is in use
  5  corrupt: damaged data stopped the command (see verify and repair)
  6  I/O error, a full disk included
  7  unsupported format: written by a newer walq

Read commands (inspect, verify, dump, tail, consumer list, group list) never
modify the directory, take no lock and run no recovery: they work while another
process writes the queue.";

/// The walq command-line tool: measure, inspect, verify, read, write and repair
/// walq queue directories.
#[derive(Debug, Parser)]
#[command(name = "walq", version, about, after_help = EXIT_CODES_HELP)]
struct Cli {
    /// Log to stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure walq on this disk beside the disk's own limits (fdatasync latency, bandwidth);
    /// with --http, the HTTP sidecar (walq serve) under concurrent keep-alive clients.
    Bench(bench::BenchArgs),
    /// Show segments, offsets, sizes, time range, and what the last recovery cut.
    Inspect {
        /// The queue directory.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Read every batch with pread and check every checksum, offset and index entry.
    Verify {
        /// The queue directory.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print records from --from up to (not including) --to.
    Dump {
        /// The queue directory.
        dir: PathBuf,
        /// The first offset to print (default: the first one held).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Start at this named consumer's committed position (read from consumers.journal).
        #[arg(long, value_name = "NAME", conflicts_with = "from")]
        consumer: Option<String>,
        /// Stop before this offset (default: the end of the log).
        #[arg(long)]
        to: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// The same as --format json.
        #[arg(long)]
        json: bool,
    },
    /// Print the last records, and with -f keep printing new ones as they are written.
    Tail {
        /// The queue directory.
        dir: PathBuf,
        /// How many of the last records to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: u64,
        /// Follow: poll for new records until interrupted (read-only, works while another process writes).
        #[arg(short, long)]
        follow: bool,
        /// How often to poll when following, in milliseconds.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// The same as --format json.
        #[arg(long)]
        json: bool,
    },
    /// Append one record per line of stdin (or of each FILE), durably.
    Produce(write::ProduceArgs),
    /// Cut the log at its first damage, after showing what is dropped and asking.
    Repair(write::RepairArgs),
    /// Named consumers: list (read-only), reset a position, delete.
    #[command(after_help = CONSUMER_EXIT_CODES_HELP)]
    Consumer {
        #[command(subcommand)]
        command: consumers::ConsumerCommand,
    },
    /// Consumer groups: list (read-only), delete.
    #[command(after_help = CONSUMER_EXIT_CODES_HELP)]
    Group {
        #[command(subcommand)]
        command: consumers::GroupCommand,
    },
    /// Serve a directory of named queues over HTTP (the sidecar), with probes and metrics.
    #[command(after_help = serve::SERVE_HELP)]
    Serve(Box<serve::ServeArgs>),
}

/// How `dump` and `tail` print records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One line per record: offset, time, key, headers, value (escaped).
    Text,
    /// One JSON object per line; bytes as a string if UTF-8, else {"hex": "..."}.
    Json,
    /// The values only, each followed by a newline.
    Raw,
    /// A header line per record, then a hex dump of its value.
    Hex,
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
enum Failure {
    /// An error from walq.
    Walq(walq::Error),
    /// Something the user asked for that cannot be done.
    Usage(String),
    /// The command ran and found problems (already printed).
    Problems,
    /// Writing the output failed (a closed pipe is not a failure).
    Output(std::io::Error),
    /// A message to print and the exit code to end with (`serve`).
    Exit(String, u8),
}

impl From<walq::Error> for Failure {
    fn from(e: walq::Error) -> Failure {
        Failure::Walq(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Output(e)
    }
}

fn walq_exit_code(e: &walq::Error) -> u8 {
    match e {
        walq::Error::NotFound { .. } | walq::Error::UnknownConsumer { .. } => exit::NOT_FOUND,
        walq::Error::Locked { .. } | walq::Error::InUse { .. } => exit::LOCKED,
        walq::Error::Corrupt { .. } => exit::CORRUPT,
        walq::Error::UnsupportedFormat { .. } => exit::UNSUPPORTED,
        walq::Error::InvalidOption { .. }
        | walq::Error::RecordTooLarge { .. }
        | walq::Error::OffsetOutOfRange { .. } => exit::USAGE,
        _ => exit::IO,
    }
}

type CmdResult = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server says what it does (info) unless asked for more.
    init_logging(if matches!(cli.command, Command::Serve(_)) { cli.verbose.max(1) } else { cli.verbose });
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Inspect { dir, json } => read::inspect(&dir, json),
        Command::Verify { dir, json } => read::verify(&dir, json),
        Command::Dump { dir, from, consumer, to, format, json } => {
            read::dump(&dir, from, consumer.as_deref(), to, if json { Format::Json } else { format })
        }
        Command::Tail { dir, lines, follow, interval_ms, format, json } => {
            read::tail(&dir, lines, follow, interval_ms, if json { Format::Json } else { format })
        }
        Command::Produce(args) => write::produce(&args),
        Command::Repair(args) => write::repair(&args),
        Command::Consumer { command } => consumers::consumer(&command),
        Command::Group { command } => consumers::group(&command),
        Command::Serve(args) => serve::serve(&args),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(Failure::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(exit::OK),
        Err(Failure::Output(e)) => {
            eprintln!("walq: writing the output: {e}");
            ExitCode::from(exit::IO)
        }
        Err(Failure::Walq(walq::Error::NotFound { dir })) => {
            eprintln!("walq: queue directory {} does not exist", dir.display());
            ExitCode::from(exit::NOT_FOUND)
        }
        Err(Failure::Walq(walq::Error::UnknownConsumer { kind, name })) => {
            eprintln!("walq: no {kind} named {name:?} exists; list them with walq {kind} list DIR");
            ExitCode::from(exit::NOT_FOUND)
        }
        Err(Failure::Walq(e)) => {
            eprintln!("walq: {e}");
            ExitCode::from(walq_exit_code(&e))
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("walq: {msg}");
            ExitCode::from(exit::USAGE)
        }
        Err(Failure::Problems) => ExitCode::from(exit::PROBLEMS),
        Err(Failure::Exit(msg, code)) => {
            eprintln!("walq serve: {msg}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = if std::env::var_os("RUST_LOG").is_some() {
        EnvFilter::from_default_env()
    } else {
        EnvFilter::new(level)
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        // A closed stderr must not turn a log line into a panic (the
        // subscriber reports its own write errors with eprintln!, which
        // panics): `walq serve` would then miss the SIGTERM it was logging.
        .log_internal_errors(false)
        .init();
}
