//! The per-chunk dirty-rate heat map: a VM-like writer (fio, zipf-skewed 4 KiB
//! random writes: a few hot chunks, a long cold tail) on a loop device over a
//! copy of the VM disk, watched by `edgeshift dirty` one interval at a time.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::record::Heatmap;
use crate::scenario::ScenarioError;

/// A loop device detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ScenarioError + '_ {
    move |source| ScenarioError::Io {
        what: what.to_string(),
        source,
    }
}

/// Measures `rows` intervals of `interval` seconds on a copy of `image`
/// (made in `work`), with `edgeshift` at `bin`.
pub fn measure(
    bin: &Path,
    image: &Path,
    work: &Path,
    rows: usize,
    interval: f64,
) -> Result<Heatmap, ScenarioError> {
    std::fs::create_dir_all(work).map_err(io("creating the heat-map dir"))?;
    let disk = work.join("heat.raw");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(&disk)
        .status()
        .map_err(io("cp"))?;
    if !st.success() {
        return Err(ScenarioError::Output("cp".into(), st.to_string()));
    }
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&disk)
        .output()
        .map_err(io("losetup"))?;
    if !out.status.success() {
        return Err(ScenarioError::Output(
            "losetup".into(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let runtime = (rows as f64 * interval + 5.0).ceil() as u64;
    let mut fio = Command::new("fio")
        .args([
            "--name=heat",
            &format!("--filename={}", dev.0),
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--random_distribution=zipf:1.2",
            "--rate_iops=400",
            "--time_based",
            &format!("--runtime={runtime}"),
            "--output=/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("starting fio"))?;
    let result = (|| {
        let mut table: Vec<Vec<f64>> = Vec::new();
        let mut chunk_size = 0u64;
        let mut tracker = String::new();
        for _ in 0..rows {
            let out = Command::new(bin)
                .args([
                    "dirty",
                    "--device",
                    &dev.0,
                    "--duration",
                    &interval.to_string(),
                    "--json",
                ])
                .output()
                .map_err(io("edgeshift dirty"))?;
            if !out.status.success() {
                return Err(ScenarioError::Tool {
                    cmd: "edgeshift dirty".into(),
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
                ScenarioError::Output(
                    "edgeshift dirty --json".into(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                )
            })?;
            chunk_size = v["chunk_size"].as_u64().unwrap_or(chunk_size);
            tracker = v["tracker"].as_str().unwrap_or("?").to_string();
            let mut row: Vec<(u64, f64)> = Vec::new();
            for c in v["chunks"].as_array().into_iter().flatten() {
                if let (Some(i), Some(w)) = (c["index"].as_u64(), c["writes"].as_f64()) {
                    row.push((i, w / interval));
                }
            }
            let size = std::fs::metadata(&disk).map_err(io("stat"))?.len();
            let n = size.div_ceil(chunk_size.max(1)) as usize;
            let mut dense = vec![0.0; n];
            for (i, r) in row {
                if let Some(slot) = dense.get_mut(i as usize) {
                    *slot = r;
                }
            }
            table.push(dense);
        }
        let chunks = table.first().map_or(0, |r| r.len() as u64);
        Ok(Heatmap {
            chunk_size,
            chunks,
            interval,
            rows: table,
            tracker,
        })
    })();
    let _ = fio.kill();
    let _ = fio.wait();
    drop(dev);
    let _ = std::fs::remove_file(&disk);
    result
}
