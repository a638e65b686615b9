//! `controller`: the control-plane binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("controller: not wired yet")
}
