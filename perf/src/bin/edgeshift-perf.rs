//! `edgeshift-perf`: benchmarks, the emulated edge cloud and the demo (being built).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("edgeshift-perf is not built yet")
}
