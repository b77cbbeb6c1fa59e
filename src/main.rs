use clap::{Parser, Subcommand};
use herald::config::{Config, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "herald", version, about = "BlueKing CMDB event subscriptions on Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller, delivery and HTTP server.
    Run {
        /// YAML configuration file (docs/configuration.md).
        #[arg(long, env = "HERALD_CONFIG")]
        config: Option<PathBuf>,
        /// herald's own namespace (overrides `namespace`).
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        /// This instance's name (overrides `instance`).
        #[arg(long, env = "POD_NAME")]
        instance: Option<String>,
        /// HTTP listen address (overrides `listen`).
        #[arg(long, env = "HERALD_LISTEN")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Print herald's CRDs as YAML (all of them, or the one committed as FILE in crds/).
    Crd {
        /// For example `cmdbsources.herald.dev.yaml`.
        file: Option<String>,
    },
    /// Import a bk-cmdb 3.5–3.9 event server's (or another herald's) subscriptions,
    /// keeping their ids (docs/migration.md).
    Import(ImportArgs),
}

#[derive(clap::Args)]
struct ImportArgs {
    /// Base URL of the event server to read with search_subscription.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    from_url: Option<String>,
    /// Read through the ESB gateway path with app credentials instead of the direct path.
    #[arg(long, requires = "from_url")]
    esb: bool,
    #[arg(long, env = "HERALD_IMPORT_APP_CODE")]
    app_code: Option<String>,
    /// Prefer the environment variable: arguments show in process lists.
    #[arg(long, env = "HERALD_IMPORT_APP_SECRET", hide_env_values = true)]
    app_secret: Option<String>,
    /// Bearer token for the direct path (a herald source needs one).
    #[arg(long, env = "HERALD_IMPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// BK_User (direct path) or bk_username (ESB) of the reads.
    #[arg(long, default_value = "admin")]
    user: String,
    /// Supplier accounts to read (repeat the flag for several).
    #[arg(long = "account", default_value = "0")]
    accounts: Vec<String>,
    /// A JSON file of subscription records instead of an event server.
    #[arg(long)]
    file: Option<PathBuf>,
    /// herald's namespace: where imported subscriptions go by default.
    #[arg(long, env = "POD_NAMESPACE", default_value = "herald-system")]
    namespace: String,
    /// ACCOUNT=NAMESPACE: put this account's subscriptions in another namespace (it must
    /// allow the account).
    #[arg(long = "account-namespace", value_parser = account_namespace)]
    account_namespaces: Vec<(String, String)>,
    /// What to do with a record imported before.
    #[arg(long, value_enum, default_value = "skip")]
    existing: herald::import::Existing,
    /// Print what would be done, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Proxy for --from-url (HTTP_PROXY and the like are ignored: the reads carry credentials).
    #[arg(long)]
    proxy: Option<String>,
}

fn account_namespace(text: &str) -> Result<(String, String), String> {
    let (account, namespace) = text.split_once('=').ok_or("expected ACCOUNT=NAMESPACE")?;
    Ok((account.to_string(), namespace.to_string()))
}

impl ImportArgs {
    fn options(self) -> Result<herald::import::ImportOptions, String> {
        use herald::import::{ApiSource, Source};
        let source = match (self.file, self.from_url) {
            (Some(path), _) => Source::File(path),
            (None, Some(url)) if self.esb => Source::Api(ApiSource::Esb {
                url,
                app_code: self.app_code.ok_or("--esb needs --app-code (or HERALD_IMPORT_APP_CODE)")?,
                app_secret: self.app_secret.ok_or("--esb needs --app-secret (or HERALD_IMPORT_APP_SECRET)")?,
                user: self.user,
            }),
            (None, Some(url)) => Source::Api(ApiSource::Direct { url, user: self.user, token: self.token }),
            (None, None) => return Err("give --from-url or --file".into()),
        };
        Ok(herald::import::ImportOptions {
            source,
            accounts: self.accounts,
            namespace: self.namespace,
            account_namespaces: self.account_namespaces.into_iter().collect(),
            existing: self.existing,
            dry_run: self.dry_run,
            proxy: self.proxy,
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd { file } => match herald::crd::crd_yamls() {
            Ok(crds) => {
                let chosen: Vec<String> = crds
                    .into_iter()
                    .filter(|(name, _)| file.as_deref().is_none_or(|f| f == *name))
                    .map(|(_, yaml)| yaml)
                    .collect();
                if chosen.is_empty() {
                    eprintln!("herald: no CRD is committed as {}", file.unwrap_or_default());
                    return ExitCode::FAILURE;
                }
                print!("{}", chosen.join("---\n"));
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("herald: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Import(args) => {
            let options = match args.options() {
                Ok(options) => options,
                Err(error) => {
                    eprintln!("herald import: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match herald::import::run(&options).await {
                Ok(summary) => {
                    print!("{}", summary.render(options.dry_run));
                    if summary.refused() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                }
                Err(error) => {
                    eprintln!("herald import: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config, namespace, instance, listen } => {
            herald::telemetry::init();
            let config = match Config::load(config.as_deref(), Overrides { namespace, instance, listen }) {
                Ok(config) => config,
                Err(error) => {
                    tracing::error!(%error, "invalid configuration");
                    return ExitCode::FAILURE;
                }
            };
            let shutdown = CancellationToken::new();
            herald::app::cancel_on_signals(shutdown.clone());
            match herald::app::run(config, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "herald stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
