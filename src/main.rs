use clap::Parser;

use weft::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    // A managed plugin's settable variables can be emptied but not unset: treat an
    // empty WEFT_* variable as absent, so defaults apply.
    for (key, value) in std::env::vars_os() {
        if value.is_empty() && key.to_string_lossy().starts_with("WEFT_") {
            std::env::remove_var(key);
        }
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(config) => {
            weft::telemetry::init(&config.log, config.log_format)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(weft::daemon::run(*config))
        }
        Command::Status(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let status = runtime.block_on(weft::status::fetch(&args.socket))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", weft::status::render(&status));
            }
            Ok(())
        }
    }
}
