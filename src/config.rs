//! The command line and its settings: `fileflow --help` is the configuration reference.
//! Every flag can also be set through the environment variable shown beside it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use url::Url;

use anyhow::Context as _;

use crate::auth::{AuthMode, KeyLimits, Role};
use crate::fetch::{DestinationGuard, FetchSettings, HostList, MinRate};
use crate::http::{ServerLimits, SitePolicy};
use crate::lifecycle::RetryPolicy;
use crate::metadata::Durability;
use crate::queue::kafka::KafkaSettings;
use crate::reconciler::ReconcileSettings;
use crate::storage::{AzureSettings, GcsSettings, S3Settings};
pub use crate::telemetry::LogFormat;
use crate::worker::WorkerSettings;

#[derive(Debug, Parser)]
#[command(name = "fileflow", version, about = "Fetch files from URLs into object storage, asynchronously and safely.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub settings: Settings,
}

// Parsed once per run: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// API and workers in one process (the embedded default needs nothing else).
    Serve,
    /// The HTTP API only.
    Api,
    /// Workers only: they take jobs from the queue; no public API.
    Worker,
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Manage API keys (in the database named by --data-dir / --database-url).
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    #[command(flatten)]
    Client(ClientCommand),
}

impl ClientCommand {
    /// Where the server is, who asks, how answers print.
    pub fn args(&self) -> &ClientArgs {
        match self {
            Self::Submit { args, .. }
            | Self::Jobs { args, .. }
            | Self::Job { args, .. }
            | Self::Retry { args, .. }
            | Self::Cancel { args, .. }
            | Self::Url { args, .. } => args,
            Self::Batch { action } => match action {
                BatchCommand::Submit { args, .. }
                | BatchCommand::Show { args, .. }
                | BatchCommand::List { args, .. }
                | BatchCommand::Cancel { args, .. }
                | BatchCommand::Pause { args, .. }
                | BatchCommand::Resume { args, .. } => args,
            },
        }
    }
}

/// Where the server a client command talks to is, who asks, and how answers print.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ClientArgs {
    /// The fileflow server's base URL.
    #[arg(long, env = "FILEFLOW_SERVER", default_value = "http://127.0.0.1:8000")]
    pub server: url::Url,
    /// An API key (`ffk_…`), when the server asks for one.
    #[arg(long, env = "FILEFLOW_API_KEY", hide_env_values = true)]
    pub api_key: Option<crate::secrets::Secret>,
    /// `table` for people, `json` (the API's own answers) for scripts.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Client commands: they talk to a running fileflow over its HTTP API.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ClientCommand {
    /// Submit a job (or, with --from, every URL of a list) and print its id.
    Submit {
        #[command(flatten)]
        args: ClientArgs,
        /// The file to fetch.
        url: Option<url::Url>,
        #[arg(long)]
        bucket: String,
        /// The object's key (with a URL).
        #[arg(long)]
        key: Option<String>,
        /// A URL list in Storage Transfer Service format (`TsvHttpData-1.0`: url, size,
        /// base64 MD5); each file goes to `<prefix><host>/<path>`.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Prefix of the keys of a --from list.
        #[arg(long, default_value = "")]
        prefix: String,
        /// The content's SHA-256 (hex), checked before the object is stored.
        #[arg(long)]
        sha256: Option<String>,
        /// The content's MD5 (hex), checked before the object is stored.
        #[arg(long)]
        md5: Option<String>,
        /// `overwrite` (default), `skip`, `fail` or `if_changed` (fetch only if the origin's
        /// file changed since fileflow stored it from this URL) when the object already exists.
        #[arg(long)]
        if_exists: Option<String>,
        /// A webhook called when the job ends.
        #[arg(long)]
        notify_url: Option<String>,
        /// Among this key's waiting jobs, higher goes first (0–2147483647, default 0).
        #[arg(long)]
        priority: Option<u32>,
        /// Follow the job to its end (a progress bar on a terminal); exit non-zero unless it completes.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, newest first.
    Jobs {
        #[command(flatten)]
        args: ClientArgs,
        /// Only jobs in this status (pending, processing, completed, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only jobs older than this id (the next page).
        #[arg(long)]
        before: Option<String>,
    },
    /// Show a job.
    Job {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
    },
    /// Run a failed job again.
    Retry {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
    },
    /// Cancel a job: a waiting one at once, a running transfer within about a second.
    Cancel {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
    },
    /// Print a time-limited download link for a completed job.
    Url {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
        /// How long the link works, e.g. `10m` (the server's default when left out).
        #[arg(long)]
        expires_in: Option<humantime::Duration>,
    },
    /// Batches: a manifest of many files submitted, followed and reported on as one.
    Batch {
        #[command(subcommand)]
        action: BatchCommand,
    },
}

/// `fileflow batch …`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum BatchCommand {
    /// Submit a manifest (CSV with a header row, JSON Lines, or a `TsvHttpData-1.0` URL
    /// list) and print the batch's id. A local file is sent with the request and kept in
    /// --bucket (the server reads it from there); an http(s) URL is fetched by the server.
    Submit {
        #[command(flatten)]
        args: ClientArgs,
        /// A local file, or the http(s) URL of one.
        manifest: String,
        /// The bucket of rows that name none; with a local file, also where it is kept
        /// and where the report goes.
        #[arg(long)]
        bucket: Option<String>,
        /// Put in front of every object name.
        #[arg(long, default_value = "")]
        prefix: String,
        /// `csv`, `jsonl` or `tsv` (by default from the file's extension, or its first line).
        #[arg(long)]
        format: Option<String>,
        /// Where in --bucket a local manifest is kept (default `manifests/<UTC time>-<its file name>`).
        #[arg(long)]
        manifest_key: Option<String>,
        /// Where in --bucket to write the report (a CSV, one row per manifest row) when the batch ends.
        #[arg(long)]
        report: Option<String>,
        /// `overwrite` (default), `skip`, `fail` or `if_changed` (sync: fetch only what
        /// changed since the last run), for rows that do not say.
        #[arg(long)]
        if_exists: Option<String>,
        /// For rows that do not say: higher goes first among this key's waiting jobs.
        #[arg(long)]
        priority: Option<u32>,
        /// A webhook called as each job ends, for rows that do not say.
        #[arg(long)]
        notify_url: Option<String>,
        /// Follow the batch to its end with one progress bar; exit non-zero unless every row completed.
        #[arg(long)]
        wait: bool,
    },
    /// Show a batch: its status, counts by job status, bytes done and report.
    Show {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
        /// Follow it to its end with one progress bar; exit non-zero unless every row completed.
        #[arg(long)]
        wait: bool,
    },
    /// List batches, newest first.
    List {
        #[command(flatten)]
        args: ClientArgs,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only batches older than this id (the next page).
        #[arg(long)]
        before: Option<String>,
    },
    /// Cancel a batch: its waiting jobs are cancelled, running ones asked to stop.
    Cancel {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
    },
    /// Pause a batch: none of its waiting jobs starts until it is resumed.
    Pause {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
    },
    /// Resume a paused batch.
    Resume {
        #[command(flatten)]
        args: ClientArgs,
        id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret, once.
    Create {
        /// A name to know the key by.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Buckets the key may write to, each `bucket` or `bucket/prefix/*`
        /// (comma-separated); every bucket when left out.
        #[arg(long, value_delimiter = ',')]
        buckets: Vec<String>,
        /// Requests per second this key may make (default: --key-rate-limit).
        #[arg(long)]
        rate_limit: Option<u32>,
        /// Jobs of this key not yet finished (default: --key-max-unfinished).
        #[arg(long)]
        max_unfinished: Option<u64>,
        /// Largest file a job of this key may store, e.g. `1GiB` (default and upper bound:
        /// the server's --max-file-size).
        #[arg(long)]
        file_size_limit: Option<bytesize::ByteSize>,
        /// This key's share of the workers when several keys have jobs waiting: a key of
        /// weight 3 gets three turns to a weight-1 key's one (default 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        weight: Option<u32>,
        /// Webhook for jobs of this key that name no `notify_url` of their own (used when
        /// the server has a --webhook-secret).
        #[arg(long)]
        notify_url: Option<url::Url>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// List every key (secrets are never shown again).
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Revoke a key: it is refused from the next request on.
    Revoke {
        /// The key's id, as `keys list` shows it.
        id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageKind {
    /// A local directory: `<data-dir>/objects/<bucket>/<key>`.
    Fs,
    /// An S3-compatible store.
    S3,
    /// Azure Blob Storage (a job's bucket is a container).
    Azure,
    /// Google Cloud Storage.
    Gcs,
}

/// Every setting of a process, in groups handed whole to the parts that use them.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub fetch: FetchArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// How the API is served: its addresses, the sites it answers, the connections it takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "The API server")]
pub struct ServerArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "FILEFLOW_LISTEN", default_value = "127.0.0.1:8000", global = true)]
    pub listen: SocketAddr,

    /// Also serve `/metrics` (open) and `/healthz` on this address: for worker processes,
    /// which have no API, and for scraping without an API key.
    #[arg(long, env = "FILEFLOW_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,

    /// Base URL that fileflow's own download links point at (default: `http://<listen>`).
    #[arg(long, env = "FILEFLOW_PUBLIC_URL", global = true)]
    pub public_url: Option<Url>,

    /// Host names (or addresses) the API is served under besides loopback, the listen
    /// address and --public-url's host (comma-separated): `files.example.com`,
    /// `.example.com` for a domain and its subdomains, `*` for any (only behind a proxy that
    /// checks `Host` itself). A request for another host gets 421 `misdirected_request`:
    /// the defence against DNS rebinding. When listening on `0.0.0.0` or `::`, any IP
    /// literal is served; names still have to be listed.
    #[arg(long, env = "FILEFLOW_ALLOWED_HOSTS", value_delimiter = ',', global = true)]
    pub allowed_hosts: Vec<String>,

    /// Browser apps allowed to call the API from their pages (comma-separated origins such
    /// as `https://app.example.com`): they get CORS answers, and their state-changing
    /// requests are let through. Such requests from other sites' pages get 403 `forbidden`.
    #[arg(long, env = "FILEFLOW_CORS_ORIGINS", value_delimiter = ',', global = true)]
    pub cors_origins: Vec<Url>,

    /// Connections the API serves at once; more wait to be accepted.
    #[arg(long, env = "FILEFLOW_MAX_CONNECTIONS", default_value_t = 1024, global = true)]
    pub max_connections: usize,

    /// Connections one client address may hold at once (default: an eighth of
    /// --max-connections, at least 16 or all of them when fewer); more are answered 429 and
    /// closed, so one client cannot take them all. Behind a reverse proxy every client has the proxy's address: raise it there.
    #[arg(long, env = "FILEFLOW_MAX_CONNECTIONS_PER_IP", global = true)]
    pub max_connections_per_ip: Option<usize>,

    /// Longest a client may take to send a request's headers (also how long an idle
    /// connection is kept).
    #[arg(long, env = "FILEFLOW_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub header_timeout: Duration,

    /// Longest an API request may take to be read and answered (downloads stream on).
    #[arg(long, env = "FILEFLOW_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub request_timeout: Duration,

    /// Longest a download link may last (`expires_in` above it is refused; job views and
    /// webhooks get links shortened to it). A store's own presigned links (S3, Azure, GCS)
    /// cannot be revoked, not even by revoking the key that asked for them: this bounds
    /// them. fileflow's own links (the `fs` store) also stop once their key is revoked.
    #[arg(long, env = "FILEFLOW_MAX_LINK_LIFETIME", default_value = "7d", value_parser = humantime::parse_duration, global = true)]
    pub max_link_lifetime: Duration,

    /// Log format.
    #[arg(long, env = "FILEFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,

    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g.
    /// `http://127.0.0.1:4318` (spans go to its `/v1/traces`). Without it, the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` turn export on;
    /// with none of them, nothing is exported.
    #[arg(long, env = "FILEFLOW_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<Url>,
}

/// Where fileflow keeps its own state: the data directory and the metadata database.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "State")]
pub struct DataArgs {
    /// Directory for the embedded database, the local object store and the link-signing key.
    #[arg(long, env = "FILEFLOW_DATA_DIR", default_value = "./fileflow-data", global = true)]
    pub data_dir: PathBuf,

    /// Mode of stored objects in the local store (`fs`), in octal: `0600` (the default) for
    /// this user only, `0640` or `0660` to let the group read (and write) them; their
    /// directories, the objects directory and the data directory then let the group in
    /// too. Everything else under the data directory (database, keys) stays 0600 in 0700
    /// directories, whatever the umask.
    #[arg(long, env = "FILEFLOW_FILE_MODE", default_value = "0600", global = true)]
    pub file_mode: crate::files::FileMode,

    /// Metadata database: `sqlite://PATH` (default: `<data-dir>/fileflow.db`) or `postgres://…`.
    #[arg(long, env = "FILEFLOW_DATABASE_URL", global = true)]
    pub database_url: Option<crate::secrets::Secret>,

    /// What a commit of the embedded (SQLite) database survives before a job is answered
    /// 202: `power-loss` (synchronous=FULL) or `process-crash` (synchronous=NORMAL, faster;
    /// a power loss may lose the last accepted jobs).
    #[arg(long, env = "FILEFLOW_SQLITE_DURABILITY", value_enum, default_value_t = Durability::PowerLoss, global = true)]
    pub sqlite_durability: Durability,
}

/// Where objects go.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Object store")]
pub struct StoreArgs {
    /// Where objects are stored.
    #[arg(long, env = "FILEFLOW_STORAGE", value_enum, default_value_t = StorageKind::Fs, global = true)]
    pub storage: StorageKind,

    /// Largest file fileflow stores (e.g. `500MiB`, `5GiB`); larger ones fail permanently.
    #[arg(long, env = "FILEFLOW_MAX_FILE_SIZE", default_value = "5GiB", global = true)]
    pub max_file_size: bytesize::ByteSize,

    /// Create a missing bucket instead of failing the job (S3, Azure, GCS).
    #[arg(long, env = "FILEFLOW_CREATE_BUCKETS", global = true)]
    pub create_buckets: bool,

    /// S3 endpoint URL (path-style addressing is used when set); credentials come from
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION.
    #[arg(long, env = "FILEFLOW_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<Url>,

    /// The S3 endpoint download links name, when users reach the store at another
    /// address than fileflow does (a compose network's `http://minio:9000` is
    /// `http://127.0.0.1:9000` from the host). Default: the S3 endpoint.
    #[arg(long, env = "FILEFLOW_S3_PUBLIC_ENDPOINT", global = true)]
    pub s3_public_endpoint: Option<Url>,

    /// S3 region (the standard AWS_REGION variable).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1", global = true)]
    pub s3_region: String,

    /// S3 access key (the standard AWS_ACCESS_KEY_ID variable; prefer it to the flag).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true, global = true)]
    pub s3_access_key_id: Option<String>,

    /// S3 secret key (the standard AWS_SECRET_ACCESS_KEY variable; prefer it to the flag).
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true, global = true)]
    pub s3_secret_access_key: Option<crate::secrets::Secret>,

    /// Azure storage account (the standard AZURE_STORAGE_ACCOUNT_NAME variable; the other
    /// `AZURE_*` credential variables of object_store are read too).
    #[arg(long, env = "AZURE_STORAGE_ACCOUNT_NAME", global = true)]
    pub azure_account: Option<String>,

    /// Azure account key, base64 (AZURE_STORAGE_ACCOUNT_KEY; prefer it to the flag). Signs
    /// download links; needed to create containers.
    #[arg(long, env = "AZURE_STORAGE_ACCOUNT_KEY", hide_env_values = true, global = true)]
    pub azure_access_key: Option<crate::secrets::Secret>,

    /// The account's blob endpoint (AZURE_STORAGE_ENDPOINT), e.g.
    /// `http://127.0.0.1:10000/devstoreaccount1` for Azurite. Default: the public cloud's.
    #[arg(long, env = "AZURE_STORAGE_ENDPOINT", global = true)]
    pub azure_endpoint: Option<Url>,

    /// Use Azurite (AZURE_STORAGE_USE_EMULATOR): its development account and key at
    /// `http://127.0.0.1:10000` (or AZURITE_BLOB_STORAGE_URL), unless given.
    #[arg(long, env = "AZURE_STORAGE_USE_EMULATOR", global = true)]
    pub azure_use_emulator: bool,

    /// The blob endpoint download links name, when users reach the account elsewhere.
    #[arg(long, env = "FILEFLOW_AZURE_PUBLIC_ENDPOINT", global = true)]
    pub azure_public_endpoint: Option<Url>,

    /// GCS service account file (GOOGLE_SERVICE_ACCOUNT; the other `GOOGLE_*` variables of
    /// object_store are read too). Links are signed with its key when it has one.
    #[arg(long, env = "GOOGLE_SERVICE_ACCOUNT", global = true)]
    pub gcs_service_account: Option<String>,

    /// GCS base URL, for an emulator (default `https://storage.googleapis.com`).
    #[arg(long, env = "FILEFLOW_GCS_ENDPOINT", global = true)]
    pub gcs_endpoint: Option<Url>,

    /// The GCS base URL download links name, when users reach the service elsewhere.
    #[arg(long, env = "FILEFLOW_GCS_PUBLIC_ENDPOINT", global = true)]
    pub gcs_public_endpoint: Option<Url>,

    /// The project buckets fileflow creates belong to (GOOGLE_CLOUD_PROJECT).
    #[arg(long, env = "GOOGLE_CLOUD_PROJECT", global = true)]
    pub gcs_project: Option<String>,
}

/// The distributed queue.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kafka")]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (`host:port,…`); when set, Kafka is the queue instead of the embedded one.
    #[arg(long = "kafka-brokers", env = "FILEFLOW_KAFKA_BROKERS", global = true)]
    pub brokers: Option<String>,

    /// A librdkafka client setting, `key=value` (repeatable), for every Kafka client: TLS
    /// and SASL for a managed Kafka (`security.protocol=SASL_SSL`, `sasl.mechanism=SCRAM-SHA-512`,
    /// `sasl.username=…`, `ssl.ca.location=…`). Also read from the environment as
    /// `FILEFLOW_KAFKA_OPTION_<KEY>` (`FILEFLOW_KAFKA_OPTION_SASL_PASSWORD` is `sasl.password`;
    /// flags win). Secret values are never logged.
    // Kept as given and checked at start (`queue::kafka::gather_options`): a parse error
    // here would echo the value, which may be a secret.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", global = true)]
    pub options: Vec<crate::secrets::Secret>,

    /// The jobs topic; retries go to `<topic>-retry`, give-ups to `<topic>-dlq`.
    #[arg(long = "kafka-topic", env = "FILEFLOW_KAFKA_TOPIC", default_value = "upload_file_topic", global = true)]
    pub topic: String,

    /// Consumer group shared by all workers.
    #[arg(long = "kafka-group", env = "FILEFLOW_KAFKA_GROUP", default_value = "fileflow-workers", global = true)]
    pub group: String,

    /// Partitions of the jobs and retry topics when fileflow creates them (the most workers
    /// that can share the load).
    #[arg(long = "kafka-partitions", env = "FILEFLOW_KAFKA_PARTITIONS", default_value_t = 6, global = true)]
    pub partitions: i32,

    /// Replicas of each topic fileflow creates; `0` (the default) takes min(3, brokers in
    /// the cluster), so a lone broker works and a real cluster survives losing one.
    #[arg(
        long = "kafka-replication-factor",
        env = "FILEFLOW_KAFKA_REPLICATION_FACTOR",
        default_value_t = 0,
        global = true
    )]
    pub replication_factor: i32,

    /// Most jobs on the jobs topic that no worker has started (counted in PostgreSQL); past it, the
    /// relay holds new jobs in PostgreSQL, where the turns between keys and the priorities
    /// decide what goes next (a topic is first come, first served). `0`: no bound.
    #[arg(long, env = "FILEFLOW_KAFKA_MAX_BACKLOG", default_value_t = 128, global = true)]
    pub max_backlog: u64,
}

/// How origins are reached, and how long and how slowly they may take.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Fetching")]
pub struct FetchArgs {
    /// Allow fetching from loopback, private and other non-public addresses.
    #[arg(long = "fetch-allow-private", env = "FILEFLOW_FETCH_ALLOW_PRIVATE", global = true)]
    pub allow_private: bool,

    /// Hosts, IP addresses or CIDRs fetched from although non-public (comma-separated).
    #[arg(long = "fetch-allow", env = "FILEFLOW_FETCH_ALLOW", value_delimiter = ',', global = true)]
    pub allow: Vec<String>,

    /// Hosts, IP addresses or CIDRs never fetched from, even if public (comma-separated).
    #[arg(long = "fetch-deny", env = "FILEFLOW_FETCH_DENY", value_delimiter = ',', global = true)]
    pub deny: Vec<String>,

    /// Proxy for origin requests (`http://…`); proxy environment variables are ignored.
    #[arg(long = "fetch-proxy", env = "FILEFLOW_FETCH_PROXY", global = true)]
    pub proxy: Option<Url>,

    /// Longest wait for a connection to an origin.
    #[arg(long, env = "FILEFLOW_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub connect_timeout: Duration,

    /// Longest wait for the next bytes from an origin.
    #[arg(long, env = "FILEFLOW_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub read_timeout: Duration,

    /// Longest one attempt at a job may take, however slowly the origin sends.
    #[arg(long, env = "FILEFLOW_TRANSFER_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration, global = true)]
    pub transfer_timeout: Duration,

    /// Slowest an origin may send (bytes per second, e.g. `1KiB`), averaged over
    /// --min-rate-window; a slower transfer is cut and retried. `0` turns the floor off.
    #[arg(long, env = "FILEFLOW_MIN_TRANSFER_RATE", default_value = "1KiB", global = true)]
    pub min_transfer_rate: bytesize::ByteSize,

    /// The window over which --min-transfer-rate is measured.
    #[arg(long, env = "FILEFLOW_MIN_RATE_WINDOW", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub min_rate_window: Duration,

    /// Redirects followed per fetch.
    #[arg(long, env = "FILEFLOW_MAX_REDIRECTS", default_value_t = 5, global = true)]
    pub max_redirects: usize,
}

/// What a transient failure is given.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Retries")]
pub struct RetryArgs {
    /// Retries after a transient failure (so at most this + 1 attempts).
    #[arg(long, env = "FILEFLOW_MAX_RETRIES", default_value_t = 3, global = true)]
    pub max_retries: u32,

    /// First retry delay; later ones double, with jitter, up to --retry-max-delay.
    #[arg(long = "retry-base-delay", env = "FILEFLOW_RETRY_BASE_DELAY", default_value = "1s", value_parser = humantime::parse_duration, global = true)]
    pub base_delay: Duration,

    /// Longest retry delay, also the cap on an origin's Retry-After.
    #[arg(long = "retry-max-delay", env = "FILEFLOW_RETRY_MAX_DELAY", default_value = "5m", value_parser = humantime::parse_duration, global = true)]
    pub max_delay: Duration,
}

/// How many transfers run, how claims last, how a process stops.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Workers")]
pub struct WorkerArgs {
    /// Transfers (origin → store) one process runs at once; as many jobs again are kept
    /// claimed ahead of them, and finished ones have their outcome recorded while the next
    /// transfers run. A transfer mostly waits on the network, so slots are many and cheap:
    /// what they may hold in memory is bounded by --max-memory, what one origin host may
    /// take of them by --per-host-concurrency.
    #[arg(long, env = "FILEFLOW_WORKER_CONCURRENCY", default_value_t = 64, global = true)]
    pub worker_concurrency: usize,

    /// Transfers one process runs at once from the same origin host (host and port);
    /// more jobs for it wait, or go back to the queue for a moment, while other hosts'
    /// jobs go on.
    #[arg(long, env = "FILEFLOW_PER_HOST_CONCURRENCY", default_value_t = 8, global = true)]
    pub per_host_concurrency: usize,

    /// Bytes a second one process takes at most from a host, for origins that ask for it:
    /// `HOST=RATE`, repeated or comma-separated (`files.example.com=10MiB`); the host's name
    /// as in its URLs, any port. Every transfer and range from the host shares the rate;
    /// it must be above --per-host-concurrency × --min-transfer-rate, which would cut them.
    #[arg(long = "host-rate", env = "FILEFLOW_HOST_RATE", value_delimiter = ',', global = true)]
    pub host_rates: Vec<crate::worker::HostRate>,

    /// Memory one process's transfers may hold in buffers at once: each reserves what its
    /// write can buffer (the store's parts in flight, or the file's length when smaller)
    /// before reading its body, and waits while the budget is spent; ranges of a large file
    /// are fetched at once only as far as the budget has room.
    #[arg(long, env = "FILEFLOW_MAX_MEMORY", default_value = "1GiB", global = true)]
    pub max_memory: bytesize::ByteSize,

    /// Ranges of one large file fetched at once, when its origin serves ranges of a version
    /// it names (a strong ETag or Last-Modified, `Accept-Ranges: bytes`); never more than
    /// the host's free places (--per-host-concurrency). `1`: one stream per file.
    #[arg(long, env = "FILEFLOW_SEGMENTS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64), global = true)]
    pub segments: u16,

    /// Files larger than this are fetched in ranges (--segments), when the origin allows.
    /// The default gives each of 8 ranges at least one 8 MiB piece; a smaller file is over
    /// in a few seconds even from an origin that caps each connection at 16 MiB/s.
    #[arg(long, env = "FILEFLOW_SEGMENT_THRESHOLD", default_value = "64MiB", global = true)]
    pub segment_threshold: bytesize::ByteSize,

    /// The digests every transfer computes and records: `sha256`, `md5`, `crc64nvme`
    /// (comma-separated). A digest a job declares is computed (and checked) anyway, and MD5
    /// is always computed for the disk store, where it is the object's ETag. Fewer digests,
    /// less CPU per byte.
    #[arg(
        long,
        env = "FILEFLOW_DIGESTS",
        value_enum,
        value_delimiter = ',',
        default_value = "sha256,md5,crc64nvme",
        global = true
    )]
    pub digests: Vec<crate::worker::DigestName>,

    /// How long a worker's claim on a job lasts without renewal; a crashed worker's jobs are
    /// picked up again after this.
    #[arg(long, env = "FILEFLOW_JOB_LEASE", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub job_lease: Duration,

    /// On SIGINT/SIGTERM, how long jobs in flight may run on before they are handed back.
    #[arg(long, env = "FILEFLOW_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_grace: Duration,
}

/// The API processes' sweep for jobs that should be moving, and for old ones.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Sweeps")]
pub struct SweepArgs {
    /// How often an API process sweeps for jobs that should be moving and are not (one
    /// process at a time across replicas).
    #[arg(long, env = "FILEFLOW_RECONCILE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub reconcile_interval: Duration,

    /// How long past its due time (or since it was last announced) a `pending` job, or a
    /// `processing` job past its lease, may wait before the sweep announces it again.
    #[arg(long, env = "FILEFLOW_RECONCILE_GRACE", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub reconcile_grace: Duration,

    /// Delete finished jobs (completed, failed, cancelled) this long after they finished,
    /// in bounded batches at each sweep, e.g. `30d`; their objects stay. Default: kept.
    #[arg(long, env = "FILEFLOW_RETENTION", value_parser = humantime::parse_duration, global = true)]
    pub retention: Option<Duration>,
}

/// Who may call the API, how often, and the keys that protect what is stored.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Access")]
pub struct AuthArgs {
    /// Whether API requests need a key: `auto` asks for one unless the API listens on
    /// loopback and no key exists; `required` always; `off` never (logged at every start).
    #[arg(long = "auth", env = "FILEFLOW_AUTH", value_enum, default_value_t = AuthMode::Auto, global = true)]
    pub mode: AuthMode,

    /// Requests per second one API key may make, unless the key says otherwise (`0`: no limit).
    #[arg(long, env = "FILEFLOW_KEY_RATE_LIMIT", default_value_t = 100, global = true)]
    pub key_rate_limit: u32,

    /// Unfinished jobs (pending or processing) one API key may have, unless the key says
    /// otherwise (`0`: no limit).
    #[arg(long, env = "FILEFLOW_KEY_MAX_UNFINISHED", default_value_t = 10_000, global = true)]
    pub key_max_unfinished: u64,

    /// Requests per second one client address may make without a valid API key, once keys
    /// are needed: an address over it gets 429 `rate_limited` before any key is looked up,
    /// so a flood of bad keys cannot starve callers with good ones. `0`: no limit.
    #[arg(long, env = "FILEFLOW_UNAUTHENTICATED_RATE_LIMIT", default_value_t = 20, global = true)]
    pub unauthenticated_rate_limit: u32,

    /// Key that encrypts per-job origin headers in the database: 32 bytes in base64. Every
    /// process sharing a database needs the same key; when left out, the key in
    /// `<data-dir>/encryption.key` is used (generated on first start).
    #[arg(long, env = "FILEFLOW_ENCRYPTION_KEY", hide_env_values = true, global = true)]
    pub encryption_key: Option<crate::secrets::Secret>,

    /// Key that signs webhooks (`whsec_` and base64, as in the Standard Webhooks
    /// specification); jobs may ask for a `notify_url` only when it is set.
    #[arg(long, env = "FILEFLOW_WEBHOOK_SECRET", hide_env_values = true, global = true)]
    pub webhook_secret: Option<crate::secrets::WebhookSecret>,
}

impl Settings {
    /// The settings a bare `fileflow serve` runs with, rooted at `data_dir`.
    pub fn defaults(data_dir: PathBuf) -> Self {
        let mut cli = Cli::parse_from(["fileflow", "serve"]);
        cli.settings.data.data_dir = data_dir;
        cli.settings
    }

    /// The worker's limits and timings.
    pub fn worker_settings(&self) -> WorkerSettings {
        WorkerSettings {
            policy: self.retry.policy(),
            lease: self.worker.job_lease,
            max_file_size: self.store.max_file_size.as_u64(),
            transfer_timeout: self.fetch.transfer_timeout,
            min_rate: self.fetch.min_rate(),
            segments: usize::from(self.worker.segments),
            segment_threshold: self.worker.segment_threshold.as_u64(),
            digests: crate::worker::DigestSet::of(&self.worker.digests),
        }
    }
}

impl ServerArgs {
    /// --max-connections-per-ip, or its default: an eighth of --max-connections, but at
    /// least 16 (or all of them, when fewer), so a small server does not refuse one busy
    /// client outright.
    pub fn connections_per_ip(&self) -> usize {
        let share = (self.max_connections / 8).max(self.max_connections.min(16));
        self.max_connections_per_ip.unwrap_or(share).max(1)
    }

    /// What the API's listener accepts.
    pub fn limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.connections_per_ip(),
            header_timeout: self.header_timeout,
        }
    }

    /// The hosts the API answers under and the sites that may change things.
    pub fn sites(&self) -> Result<SitePolicy, String> {
        SitePolicy::new(self.listen, self.public_url.as_ref(), &self.allowed_hosts, &self.cors_origins)
    }
}

impl FetchArgs {
    /// The HTTP client's timeouts, redirects and proxy.
    pub fn client(&self) -> FetchSettings {
        FetchSettings {
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
            max_redirects: self.max_redirects,
            proxy: self.proxy.clone(),
        }
    }

    /// The addresses fetches (and webhooks) may reach.
    pub fn guard(&self) -> anyhow::Result<DestinationGuard> {
        let allow = HostList::parse(&self.allow).map_err(|e| anyhow::anyhow!("--fetch-allow: {e}"))?;
        let deny = HostList::parse(&self.deny).map_err(|e| anyhow::anyhow!("--fetch-deny: {e}"))?;
        Ok(DestinationGuard::with_lists(self.allow_private, allow, deny))
    }

    /// The slowest an origin may send.
    pub fn min_rate(&self) -> MinRate {
        MinRate { bytes_per_second: self.min_transfer_rate.as_u64(), window: self.min_rate_window }
    }
}

impl RetryArgs {
    /// The backoff of jobs' transient failures.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy { max_retries: self.max_retries, base_delay: self.base_delay, max_delay: self.max_delay }
    }
}

impl SweepArgs {
    /// The reconciler's timings.
    pub fn reconcile(&self) -> ReconcileSettings {
        ReconcileSettings { interval: self.reconcile_interval, grace: self.reconcile_grace, retention: self.retention }
    }
}

impl AuthArgs {
    /// The limits of keys that do not name their own.
    pub fn key_defaults(&self) -> KeyLimits {
        KeyLimits {
            rate_limit: Some(self.key_rate_limit).filter(|&r| r > 0),
            max_unfinished: Some(self.key_max_unfinished).filter(|&n| n > 0),
            max_file_size: None,
            weight: None,
        }
    }
}

impl KafkaArgs {
    /// The Kafka clients' settings, when Kafka is the queue. A poll may wait as long as
    /// one transfer (`transfer_timeout`) before the group counts the member gone.
    pub fn settings(&self, transfer_timeout: Duration) -> anyhow::Result<Option<KafkaSettings>> {
        let Some(brokers) = &self.brokers else { return Ok(None) };
        let options = crate::queue::kafka::gather_options(
            std::env::vars(),
            &self.options.iter().map(|o| o.expose().to_owned()).collect::<Vec<_>>(),
        )
        .map_err(|e| anyhow::anyhow!("Kafka client settings: {e}"))?;
        Ok(Some(KafkaSettings {
            brokers: brokers.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            max_poll_interval: transfer_timeout + Duration::from_secs(60),
            options,
        }))
    }
}

impl StoreArgs {
    /// The S3 store's settings.
    pub fn s3(&self) -> anyhow::Result<S3Settings> {
        let needed = |value: Option<String>, name: &str| value.with_context(|| format!("--storage s3 needs {name}"));
        Ok(S3Settings {
            endpoint: self.s3_endpoint.clone(),
            public_endpoint: self.s3_public_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: needed(self.s3_access_key_id.clone(), "AWS_ACCESS_KEY_ID")?,
            secret_access_key: needed(
                self.s3_secret_access_key.as_ref().map(|s| s.expose().to_owned()),
                "AWS_SECRET_ACCESS_KEY",
            )?
            .into(),
            create_buckets: self.create_buckets,
            max_file_size: self.max_file_size.as_u64(),
        })
    }

    /// The Azure store's settings.
    pub fn azure(&self) -> AzureSettings {
        AzureSettings {
            account: self.azure_account.clone(),
            access_key: self.azure_access_key.clone(),
            endpoint: self.azure_endpoint.clone(),
            public_endpoint: self.azure_public_endpoint.clone(),
            use_emulator: self.azure_use_emulator,
            create_buckets: self.create_buckets,
            max_file_size: self.max_file_size.as_u64(),
        }
    }

    /// The GCS store's settings.
    pub fn gcs(&self) -> GcsSettings {
        GcsSettings {
            service_account: self.gcs_service_account.clone(),
            endpoint: self.gcs_endpoint.clone(),
            public_endpoint: self.gcs_public_endpoint.clone(),
            project: self.gcs_project.clone(),
            create_buckets: self.create_buckets,
            max_file_size: self.max_file_size.as_u64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_units() {
        let cli = Cli::parse_from([
            "fileflow",
            "worker",
            "--max-file-size",
            "500MiB",
            "--retry-base-delay",
            "50ms",
            "--fetch-allow-private",
        ]);
        assert_eq!(cli.command, Command::Worker);
        assert_eq!(cli.settings.store.max_file_size.as_u64(), 500 * 1024 * 1024);
        assert_eq!(cli.settings.retry.base_delay, Duration::from_millis(50));
        assert!(cli.settings.fetch.allow_private);
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::defaults(PathBuf::from("./fileflow-data"));
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(s.retry.max_retries, 3);
        assert_eq!(s.store.max_file_size.as_u64(), 5 << 30);
        assert_eq!(s.retry.base_delay, Duration::from_secs(1));
        assert!(!s.fetch.allow_private);
        assert_eq!(s.store.storage, StorageKind::Fs);
        assert_eq!(s.auth.mode, AuthMode::Auto);
        assert_eq!(s.server.connections_per_ip(), 128, "an eighth of 1024");
        let small = ServerArgs { max_connections: 8, ..s.server.clone() };
        assert_eq!(small.connections_per_ip(), 8, "all of a small server's");
        let medium = ServerArgs { max_connections: 64, ..s.server };
        assert_eq!(medium.connections_per_ip(), 16, "at least 16");
    }

    #[test]
    fn no_secret_setting_shows_in_debug() {
        let cli = Cli::parse_from([
            "fileflow",
            "serve",
            "--database-url",
            "postgres://fileflow:pg-s3cret@db/fileflow",
            "--s3-secret-access-key",
            "aws-s3cret",
            "--azure-access-key",
            "azure-s3cret",
            "--encryption-key",
            "enc-s3cret",
            "--webhook-secret",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "--kafka-option",
            "sasl.password=kafka-s3cret",
        ]);
        let shown = format!("{cli:?} {:#?}", cli.settings);
        for secret in ["s3cret", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
            assert!(!shown.contains(secret), "{secret} shows in {shown}");
        }
        assert!(shown.contains("[redacted]"));
        assert_eq!(cli.settings.auth.encryption_key.unwrap().expose(), "enc-s3cret");
    }

    #[test]
    fn keys_create_takes_a_role_buckets_and_limits() {
        let cli = Cli::parse_from([
            "fileflow",
            "keys",
            "create",
            "--name",
            "ci",
            "--role",
            "submitter",
            "--buckets",
            "photos,docs/team-a/*",
            "--file-size-limit",
            "1GiB",
            "--output",
            "json",
        ]);
        let Command::Keys { action: KeysCommand::Create { name, role, buckets, file_size_limit, output, .. } } =
            cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((name.as_str(), role, output), ("ci", Role::Submitter, OutputFormat::Json));
        assert_eq!(buckets, ["photos", "docs/team-a/*"]);
        assert_eq!(file_size_limit.unwrap().as_u64(), 1 << 30);
        // The server's own flags do not leak into the key's limits.
        let cli = Cli::parse_from(["fileflow", "keys", "create", "--name", "n", "--role", "admin"]);
        let Command::Keys { action: KeysCommand::Create { file_size_limit, rate_limit, max_unfinished, .. } } =
            cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((file_size_limit, rate_limit, max_unfinished), (None, None, None));
    }
}
