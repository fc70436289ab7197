//! Why the broker refused a request: each check's own variant, whose text is the reason the
//! frontend sees. Nothing was changed by a refused request.

use crate::request::StateError;
use crate::vmm::FieldError;

/// Why a request was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the journal cannot be written ({0}); only Release is served until it can")]
    Journal(String),
    #[error("{path}: {why}")]
    Image { path: String, why: String },
    #[error("runtime dir: {0}")]
    RunDir(String),
    #[error("every uid in the VM uid range is in use")]
    NoUid,
    #[error("bridge {0} is not one the daemon allows (--allowed-bridge)")]
    Bridge(String),
    #[error("{0}")]
    Kvm(String),
    #[error("{0}")]
    Tap(String),
    #[error("{0}")]
    Vmm(String),
    #[error("cloud-hypervisor not found at {0}")]
    NoCloudHypervisorAt(String),
    #[error("cloud-hypervisor not found on PATH; install it or pass --cloud-hypervisor")]
    NoCloudHypervisor,
    /// The binary failed the start-up check (`ch_binary`); the daemon must be restarted
    /// once it is fixed.
    #[error("cloud-hypervisor refused at daemon start: {0}")]
    CloudHypervisor(String),
    #[error(transparent)]
    ChBinary(#[from] crate::ch_binary::ChError),
    #[error("VMM {pid} did not exit within {ms} ms of SIGKILL; release again later")]
    StillAlive { pid: u32, ms: u16 },
    #[error("release of VM {vm} is incomplete: {steps}")]
    Release { vm: String, steps: String },
    #[error("the reply carries {got} fds, its row says {row}")]
    ReplyFds { got: usize, row: u8 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sys(#[from] nix::errno::Errno),
}

impl Refusal {
    /// For `map_err`: a VMM step that failed, as "`what`: error".
    pub fn vmm<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> Refusal {
        move |e| Refusal::Vmm(format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_check_and_the_cause() {
        let e = Refusal::vmm("bind api socket")(std::io::Error::from_raw_os_error(libc::EADDRINUSE));
        assert!(matches!(&e, Refusal::Vmm(m) if m.starts_with("bind api socket: Address already in use")), "{e}");
        let image = Refusal::Image { path: "/srv/k".into(), why: "is not a regular file".into() };
        assert_eq!(image.to_string(), "/srv/k: is not a regular file");
        assert_eq!(
            Refusal::Bridge("br9".into()).to_string(),
            "bridge br9 is not one the daemon allows (--allowed-bridge)"
        );
        let journal = Refusal::Journal("disk full".into()).to_string();
        assert_eq!(journal, "the journal cannot be written (disk full); only Release is served until it can");
        let at = Refusal::NoCloudHypervisorAt("/opt/ch".into()).to_string();
        assert_eq!(at, "cloud-hypervisor not found at /opt/ch");
        assert!(Refusal::NoCloudHypervisor.to_string().contains("--cloud-hypervisor"));
        let alive = Refusal::StillAlive { pid: 42, ms: 5000 }.to_string();
        assert_eq!(alive, "VMM 42 did not exit within 5000 ms of SIGKILL; release again later");
        assert_eq!(Refusal::from(nix::errno::Errno::ENOENT).to_string(), "ENOENT: No such file or directory");
    }
}
