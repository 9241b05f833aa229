//! Logging setup: text or JSON, filtered by `--log`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --log filter {filter:?}")]
    Filter { filter: String, source: tracing_subscriber::filter::ParseError },
}

pub fn init(format: LogFormat, filter: &str) -> Result<(), Error> {
    let env_filter =
        EnvFilter::try_new(filter).map_err(|source| Error::Filter { filter: filter.to_owned(), source })?;
    let builder = tracing_subscriber::fmt().with_env_filter(env_filter).with_writer(std::io::stderr);
    // A second init (tests running several servers in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    Ok(())
}
