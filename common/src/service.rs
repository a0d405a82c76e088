//! What running as a system service asks of the binary: log lines a journal
//! or a log shipper can take, systemd's readiness protocol, and the signals
//! that ask for a clean stop. Shared by `edgeshift agent` and
//! `edgeshift-coordinator`.

/// How log lines are written on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

pub fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().init(),
        // Plain text into files and journals; colour only on a terminal.
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// Tells systemd (`Type=notify`) the daemon is ready; nothing without
/// `$NOTIFY_SOCKET`. Called only once every start-up check has passed.
pub fn notify_ready(status: &str) {
    let states = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ];
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!(error = %e, "readiness not sent to systemd");
    }
}

/// Tells systemd the daemon is stopping (so `systemctl status` says so).
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Resolves at the first SIGTERM or SIGINT, naming it. Installed before the
/// daemon says it is ready, so no early signal is lost to the default action.
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
