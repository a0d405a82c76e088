//! Evaluation harness: emulated edge cloud, baselines, reports (being built: see issues 2–9).
