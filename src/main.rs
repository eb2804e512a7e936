use clap::Parser;

use weft::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(config) => {
            weft::telemetry::init(&config.log, config.log_format)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(weft::daemon::run(config))
        }
    }
}
