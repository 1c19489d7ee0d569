pub async fn run(_args: crate::args::DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("demo: not built yet")
}
