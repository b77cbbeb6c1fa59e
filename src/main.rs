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
    /// Print the EventSubscription CRD as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => match herald::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("herald: {error}");
                ExitCode::FAILURE
            }
        },
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
