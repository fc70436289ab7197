//! systemd's readiness protocol (sd_notify(3)): one datagram, `READY=1`, to the Unix socket
//! `$NOTIFY_SOCKET` names. A name that starts with '@' is an abstract socket.

/// The one message the daemon sends, once the frontend serves the RPC socket.
pub const READY: &[u8] = b"READY=1";

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    Path(std::path::PathBuf),
    /// The name without the leading '@'.
    Abstract(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract name ('@...')")]
    Bad(String),
}

/// Parses `$NOTIFY_SOCKET`. sun_path holds 108 bytes, the NUL of a path included.
pub fn address(value: &[u8]) -> Result<NotifyAddr, NotifyError> {
    use std::os::unix::ffi::OsStrExt;
    let bad = || NotifyError::Bad(String::from_utf8_lossy(value).into_owned());
    match value.split_first() {
        Some((b'@', name)) if !name.is_empty() && name.len() < 108 => Ok(NotifyAddr::Abstract(name.to_vec())),
        Some((b'/', _)) if value.len() < 108 && !value.contains(&0) => {
            Ok(NotifyAddr::Path(std::ffi::OsStr::from_bytes(value).into()))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names_parse_and_nothing_else_does() {
        assert_eq!(address(b"/run/systemd/notify"), Ok(NotifyAddr::Path("/run/systemd/notify".into())));
        assert_eq!(address(b"@sd-notify"), Ok(NotifyAddr::Abstract(b"sd-notify".to_vec())));
        for bad in [&b""[..], b"@", b"relative/path", b"/a\0b", &[b'/'; 108]] {
            assert!(address(bad).is_err(), "{bad:?}");
        }
        assert_eq!(address(&[b'/'; 107]).map(|_| ()), Ok(()));
    }
}
