//! The `fileflow` command: parse the command line, then run the server, a worker, a
//! migration, the `keys` command or the client (see `fileflow --help`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use fileflow::backends::open_database;
use fileflow::config::{Cli, Command};
use fileflow::startup::{Application, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Command::Client(command) = cli.command {
        // A client prints answers, not the server's logs.
        return fileflow::cli::client::run(command, &mut std::io::stdout()).await;
    }
    let process = match &cli.command {
        Command::Serve => "serve",
        Command::Api => "api",
        Command::Worker => "worker",
        _ => "admin",
    };
    let telemetry =
        fileflow::telemetry::init(cli.settings.server.log_format, cli.settings.server.otlp_endpoint.as_ref(), process)?;
    let result = run(cli).await;
    // Sending the last spans may block for a moment: off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.command == Command::Migrate {
        let data = &cli.settings.data;
        fileflow::files::create_dir(&data.data_dir, data.file_mode)
            .with_context(|| format!("cannot create {}", data.data_dir.display()))?;
        open_database(data).await?;
        tracing::info!("database is up to date");
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Keys { action } = cli.command {
        fileflow::cli::keys::run(&cli.settings.data, action, &mut std::io::stdout()).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let app = Application::build(cli.settings, cli.command).await?;
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
