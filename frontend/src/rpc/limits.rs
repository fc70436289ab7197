//! Resource limits of the RPC transport. Each one is a frontend command-line flag; the defaults
//! are the ones documented in docs/api.md.

use std::time::Duration;

/// Limits applied to every client connection. Parsed from the command line (`--rpc-*` flags).
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Longest accepted request line in bytes, newline excluded. A longer line is answered
    /// with an error and the connection is closed.
    #[arg(long = "rpc-max-line-bytes", default_value_t = 1024 * 1024)]
    pub max_line_bytes: usize,
    /// Most simultaneous client connections. Further connections are accepted and closed at once.
    #[arg(long = "rpc-max-connections", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a whole request line may take to arrive, counted from its first byte.
    #[arg(long = "rpc-line-timeout", value_parser = parse_secs, default_value = "10")]
    pub line_timeout: Duration,
    /// Seconds a connection may stay silent between requests. Connections holding an active
    /// subscription are exempt.
    #[arg(long = "rpc-idle-timeout", value_parser = parse_secs, default_value = "300")]
    pub idle_timeout: Duration,
    /// Seconds one outgoing message may take to be written to a client that does not read.
    #[arg(long = "rpc-write-timeout", value_parser = parse_secs, default_value = "10")]
    pub write_timeout: Duration,
    /// Messages (responses and subscription notifications) queued per connection. When it is
    /// full, responses and notifications wait for the client to read; a client that reads
    /// nothing for `write_timeout` is disconnected, which ends its subscriptions.
    #[arg(long = "rpc-max-queued-messages", default_value_t = 64)]
    pub max_queued_messages: usize,
    /// Largest response in bytes; a bigger result is replaced by an error.
    #[arg(long = "rpc-max-response-bytes", default_value_t = 1024 * 1024)]
    pub max_response_bytes: u32,
    /// Most requests in one batch.
    #[arg(long = "rpc-max-batch-len", default_value_t = 100)]
    pub max_batch_len: usize,
    /// Most requests (lines) handled at once on one connection. At the bound the server stops
    /// reading that connection until one of them is answered.
    #[arg(long = "rpc-max-in-flight", default_value_t = 32)]
    pub max_in_flight: usize,
    /// Most active subscriptions per connection.
    #[arg(long = "rpc-max-subscriptions", default_value_t = 16)]
    pub max_subscriptions: u32,
}

impl Default for Limits {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            limits: Limits,
        }
        // The flags above all carry valid defaults, so parsing no arguments cannot fail.
        Defaults::parse_from(["limits"]).limits
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?} is not a valid duration: {e}"))
}

/// Extra descriptors the frontend needs besides client connections (logs, broker channel,
/// listener, runtime).
const FD_RESERVE: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit so that `max_connections` clients fit
/// (each one costs a descriptor). Logs when that cannot be done. Returns the new soft limit.
pub fn raise_nofile_limit(max_connections: usize) -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the rlimit struct we own and pass by valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit only reads the rlimit struct passed by valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        } else {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                soft = lim.rlim_cur,
                hard = lim.rlim_max,
                "cannot raise RLIMIT_NOFILE"
            );
        }
    }
    let needed = max_connections as u64 + FD_RESERVE;
    if lim.rlim_cur < needed {
        tracing::warn!(
            soft = lim.rlim_cur,
            needed,
            max_connections,
            "RLIMIT_NOFILE is below what the connection limit needs; accept will back off when out of descriptors"
        );
    } else {
        tracing::debug!(soft = lim.rlim_cur, "RLIMIT_NOFILE");
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let l = Limits::default();
        assert_eq!(l.max_line_bytes, 1 << 20);
        assert_eq!(l.max_connections, 1024);
        assert_eq!(l.line_timeout, Duration::from_secs(10));
        assert_eq!(l.idle_timeout, Duration::from_secs(300));
        assert_eq!(l.write_timeout, Duration::from_secs(10));
        assert_eq!(l.max_queued_messages, 64);
        assert_eq!(l.max_in_flight, 32);
    }

    #[test]
    fn fractional_seconds_parse() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("x").is_err());
    }
}
