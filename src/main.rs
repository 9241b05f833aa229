#[tokio::main]
async fn main() -> std::process::ExitCode {
    cloudmap_xds::cli::main().await
}
