//! The binary's entry: parse, set up logging, run a subcommand.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::config::{Cli, CloudMapArgs, Command, ExportArgs, LogFormat, RenderArgs, ServeArgs};
use crate::model::Registry;
use crate::source::registry_file;
use crate::{app, render, source, translate};

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Render(args) => render(*args).await,
        Command::Export(args) => export(*args).await,
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

/// The registry file when given, else one complete Cloud Map read.
async fn registry(
    file: Option<&std::path::Path>,
    cloudmap: &CloudMapArgs,
    timeout: Duration,
) -> anyhow::Result<Registry> {
    match file {
        Some(path) => Ok(registry_file::load(path)?),
        None => {
            eprintln!("reading Cloud Map (no --registry-file given)...");
            read_cloudmap(cloudmap, timeout).await
        }
    }
}

/// One complete Cloud Map read. Warnings (a failing call, a denied optional
/// action) go to standard error, so a preview never differs silently from `serve`.
async fn read_cloudmap(cloudmap: &CloudMapArgs, timeout: Duration) -> anyhow::Result<Registry> {
    crate::telemetry::init(LogFormat::Text, READ_LOG_FILTER)?;
    source::cloudmap::read_once(&cloudmap.settings(), timeout).await.context("reading Cloud Map")
}

/// What `render` and `export` log while they read Cloud Map.
const READ_LOG_FILTER: &str = "warn";

async fn render(args: RenderArgs) -> anyhow::Result<()> {
    let options = args.publish.translate_options()?;
    let registry = registry(args.registry_file.as_deref(), &args.cloudmap, args.read_timeout).await?;
    if let Some(target) = &args.explain {
        let (service, explanation) = translate::explain(&registry, target, &options).with_context(|| {
            format!("no ServiceEntry {target:?} (give cloudmap-<service>.<namespace> or NAMESPACE/SERVICE)")
        })?;
        let value = render::explanation_json(&service, &explanation, &options.publish_namespace);
        print!("{}", serde_norway::to_string(&value)?);
        return Ok(());
    }
    let translation = translate::translate(&registry, &options);
    let mut stderr = std::io::stderr().lock();
    for s in &translation.skipped {
        let instance = s.instance.as_deref().unwrap_or("-");
        writeln!(stderr, "skipped: {}/{} instance {instance}: {}", s.namespace, s.service, s.reason)?;
    }
    for p in &translation.invalid_settings {
        writeln!(stderr, "ignored: {}/{}: {}", p.namespace, p.service, p.setting)?;
    }
    print!("{}", render::yaml(&translation.entries)?);
    Ok(())
}

async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let registry = read_cloudmap(&args.cloudmap, args.read_timeout).await?;
    let text = registry_file::to_yaml(&registry)?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} services to {}", registry.services.len(), path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}
