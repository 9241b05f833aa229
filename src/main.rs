fn main() -> std::process::ExitCode {
    // Before the runtime starts its threads: see `memory`.
    cloudmap_xds::memory::use_one_arena();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(cloudmap_xds::cli::main()),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
