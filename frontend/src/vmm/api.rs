//! cloud-hypervisor's REST API (`/api/v1/...`), over HTTP/1.1 on a stream the broker
//! connected for us. One connection per call: CH keeps connections alive, but a fresh one
//! costs one broker request and never leaves a half-read response behind.

use std::os::fd::OwnedFd;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// The largest response body read from a VMM.
pub const MAX_RESPONSE: usize = 256 * 1024;
/// vmm.ping and vm.info: a live VMM answers at once.
pub const QUICK: Duration = Duration::from_secs(2);
/// Actions (power-button, shutdown).
pub const ACTION: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VmmApiError {
    /// The VMM did not answer in time: busy, not necessarily dead.
    #[error("the VMM did not answer {0} within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("{0}: HTTP {1}: {2}")]
    Status(&'static str, StatusCode, String),
    #[error("{0}: {1}")]
    Transport(&'static str, String),
}

/// The part of `vm.info` the frontend uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmInfo {
    /// Created, Running, Shutdown, Paused or BreakPoint.
    pub state: String,
}

/// One request on a connected api socket; returns the body of a 2xx answer.
pub async fn call(sock: OwnedFd, method: Method, what: &'static str, timeout: Duration) -> Result<Bytes, VmmApiError> {
    let t = |e: &dyn std::fmt::Display| VmmApiError::Transport(what, e.to_string());
    let exchange = async {
        let std = std::os::unix::net::UnixStream::from(sock);
        std.set_nonblocking(true).map_err(|e| t(&e))?;
        let stream = tokio::net::UnixStream::from_std(std).map_err(|e| t(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| t(&e))?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(format!("/api/v1/{what}"))
            .header("Host", "localhost")
            .header("Accept", "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| t(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| t(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await.map_err(|e| t(&e))?.to_bytes();
        driver.abort();
        if !status.is_success() {
            return Err(VmmApiError::Status(what, status, String::from_utf8_lossy(&body).chars().take(512).collect()));
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| VmmApiError::Timeout(what, timeout))?
}

pub async fn vm_info(sock: OwnedFd) -> Result<VmInfo, VmmApiError> {
    let body = call(sock, Method::GET, "vm.info", QUICK).await?;
    serde_json::from_slice(&body).map_err(|e| VmmApiError::Transport("vm.info", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Answers one request the way CH's micro_http does: no reason phrase, keep-alive, a
    /// Content-Length except on 204.
    fn serve(mut s: UnixStream, status: u16, body: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                req.push(b[0]);
            }
            let len = if status == 204 { String::new() } else { format!("Content-Length: {}\r\n", body.len()) };
            let head = format!(
                "HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n{len}\r\n"
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(body.as_bytes()).unwrap();
            String::from_utf8(req).unwrap()
        })
    }

    #[tokio::test]
    async fn info_and_actions_with_ch_framing() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = serve(b, 200, r#"{"config":{},"state":"Running","memory_actual_size":0,"device_tree":null}"#);
        assert_eq!(vm_info(a.into()).await.unwrap(), VmInfo { state: "Running".into() });
        assert!(server.join().unwrap().starts_with("GET /api/v1/vm.info HTTP/1.1\r\n"));

        let (a, b) = UnixStream::pair().unwrap();
        let server = serve(b, 204, "");
        assert!(call(a.into(), Method::PUT, "vm.power-button", ACTION).await.unwrap().is_empty());
        assert!(server.join().unwrap().starts_with("PUT /api/v1/vm.power-button HTTP/1.1\r\n"));

        let (a, b) = UnixStream::pair().unwrap();
        let _server = serve(b, 500, r#"["VmNotRunning"]"#);
        let e = call(a.into(), Method::PUT, "vm.shutdown", ACTION).await.unwrap_err();
        assert!(
            matches!(e, VmmApiError::Status("vm.shutdown", StatusCode::INTERNAL_SERVER_ERROR, ref b) if b.contains("VmNotRunning"))
        );
    }

    #[tokio::test]
    async fn silence_is_a_timeout_and_size_is_capped() {
        let (a, _b) = UnixStream::pair().unwrap();
        let e = call(a.into(), Method::GET, "vmm.ping", Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, VmmApiError::Timeout("vmm.ping", _)), "{e}");

        let (a, mut b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            let _ = b.read(&mut buf);
            let big = MAX_RESPONSE + 1;
            let _ = write!(b, "HTTP/1.1 200 \r\nContent-Length: {big}\r\n\r\n");
            let _ = b.write_all(&vec![b'x'; big]);
        });
        let e = call(a.into(), Method::GET, "vm.info", QUICK).await.unwrap_err();
        assert!(matches!(e, VmmApiError::Transport("vm.info", _)), "{e}");
    }
}
