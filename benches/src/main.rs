//! Benchmark driver (being built): compares raw TCP, ztunnel HBONE and Envoy in one run.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("benchmark driver not built yet")
}
