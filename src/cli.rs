//! The binary's entry: parse, set up logging, run a subcommand.

use std::process::ExitCode;

use clap::Parser;

use crate::config::{Cli, Command, RenderArgs, ServeArgs};
use crate::{app, render, source, translate};

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Render(args) => render_file(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::telemetry::init(args.log_format, &args.log)?;
    app::check(&args)?;
    tracing::info!(config = %serde_json::to_string(&args)?, publish_namespace = %args.publish.namespace()?, "effective configuration");
    app::build(args).await?.run_until_signal().await
}

fn render_file(args: &RenderArgs) -> anyhow::Result<()> {
    let registry = source::registry_file::load(&args.registry_file)?;
    let translation = translate::translate(&registry, &args.publish.translate_options()?);
    for s in &translation.skipped {
        eprintln!(
            "skipped: {}/{} instance {}: {}",
            s.namespace,
            s.service,
            s.instance.as_deref().unwrap_or("-"),
            s.reason
        );
    }
    print!("{}", render::yaml(&translation.entries)?);
    Ok(())
}
