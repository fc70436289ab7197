//! The unprivileged frontend. Nothing here may assume root: every privileged action is a
//! typed request to the broker.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

pub mod broker;
pub mod console;
pub mod exec;
pub mod rpc;
pub mod vm;
pub mod vmm;

/// The serial logs' dir, below the state dir.
pub const LOG_DIR: &str = "logs";

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub console_dir: PathBuf,
    /// Where images may come from; the broker checks again when it opens them.
    pub image_roots: Vec<PathBuf>,
    pub limits: rpc::Limits,
    pub console: console::ConsoleLimits,
}

pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MYHV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" { b.json().init() } else { b.init() }
}

use tokio::sync::broadcast::error::RecvError;

/// Serves the API until the broker channel closes (the broker is gone) or serving fails.
pub fn run(cfg: Config, listen: OwnedFd, broker: OwnedFd) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rpc::limits::raise_nofile_limit(cfg.limits.max_connections);
    let result = rt.block_on(async move {
        let broker = broker::BrokerClient::start(broker)?;
        console::install(&cfg.console_dir, &cfg.state_dir.join(LOG_DIR), cfg.console.clone(), broker.clone())?;
        let (driver, mut reports) = vmm::driver::BrokerDriver::start(broker.clone());
        let config = vm::ManagerConfig::new(&cfg.state_dir, cfg.image_roots.clone());
        let manager = vm::Manager::open(config, Some(std::sync::Arc::new(driver)))?;
        // What happens to running VMs (exits, panics, reboots) reaches their records, in order
        // for each VM (see `vm::Manager::report`).
        let m = manager.clone();
        tokio::spawn(async move {
            while let Some((vm_id, report)) = reports.recv().await {
                m.report(&vm_id, report);
            }
        });
        manager.recover();
        let mut events = broker.events();
        let shutdown = async move {
            while !matches!(
                events.recv().await,
                Ok(my_hypervisor_broker_proto::Event::Shutdown) | Err(RecvError::Closed)
            ) {}
        };
        let stopping = manager.clone();
        let methods = rpc::methods(manager).map_err(std::io::Error::other)?;
        let std_listener = std::os::unix::net::UnixListener::from(listen);
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(std_listener)?;
        tracing::info!(state_dir = %cfg.state_dir.display(), "frontend serving");
        // The listener answers from here on: the broker tells the service manager (READY=1).
        let b = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = b.call(my_hypervisor_broker_proto::Request::Serving).await {
                tracing::warn!(error = %e, "tell the broker the frontend serves");
            }
        });
        tokio::select! {
            r = rpc::serve(listener, methods, cfg.limits) => r,
            () = broker.closed() => {
                tracing::warn!("broker channel closed; exiting");
                Ok(())
            }
            () = shutdown => {
                stopping.daemon_shutdown().await;
                tracing::info!("the daemon stops its VMs: they are recorded stopped; exiting");
                Ok(())
            }
        }
    });
    // A blocking task (a console client's write, say) must not hold the exit: the state on
    // disk is whole at every instant, so a bounded wait is enough.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
