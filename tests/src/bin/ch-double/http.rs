//! The REST API with micro_http's framing: `HTTP/1.1 <code> ` status lines (no reason
//! phrase), `Server` and `Connection: keep-alive` on every response, no Content-Length on
//! 204, several requests per connection, at most 10 connections, and no answer to a
//! request whose client half-closed.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};

use crate::vmm::{ApiReq, ApiResp, Msg};

const MAX_CONNECTIONS: usize = 10;
const MAX_PAYLOAD: usize = 51200;
const MAX_LINE: usize = 1024;

/// Serves `listener` on its own thread; requests go to the VMM loop through `tx`.
pub fn start(listener: UnixListener, tx: Sender<Msg>) -> std::io::Result<()> {
    std::thread::Builder::new().name("http-server".into()).spawn(move || {
        let live = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming() {
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Not a listening socket, or out of fds: do not spin.
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    continue;
                }
            };
            if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                let body = "{\"error\": \"Too many open connections\"}";
                let _ = write!(
                    stream,
                    "HTTP/1.1 503 \r\nServer: Firecracker API\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                continue;
            }
            live.fetch_add(1, Ordering::SeqCst);
            let (tx, conn_live) = (tx.clone(), live.clone());
            let spawned = std::thread::Builder::new().name("http-conn".into()).spawn(move || {
                serve(stream, &tx);
                conn_live.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                live.fetch_sub(1, Ordering::SeqCst);
            }
        }
    })?;
    Ok(())
}

/// One response as micro_http writes it.
pub fn render(status: u16, body: Option<&str>, server: &str) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status} \r\nServer: {server}\r\nConnection: keep-alive\r\n");
    if status != 204 && status != 100 {
        let body = body.unwrap_or("");
        r.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

enum Parsed {
    Incomplete { expect_continue: bool },
    Bad(String),
    Request { method: String, path: String, body: Option<Vec<u8>>, used: usize },
}

fn parse(buf: &[u8]) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.split(|&b| b == b'\n').any(|l| l.len() > MAX_LINE) {
            return Parsed::Bad("Invalid request.".into());
        }
        return Parsed::Incomplete { expect_continue: false };
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    if parts.len() != 3 || request_line.len() > MAX_LINE {
        return Parsed::Bad("Invalid request.".into());
    }
    if !["GET", "PUT", "PATCH"].contains(&parts[0]) {
        return Parsed::Bad("Invalid HTTP Method: Unsupported HTTP method.".into());
    }
    if !["HTTP/1.0", "HTTP/1.1"].contains(&parts[2]) {
        return Parsed::Bad("Invalid HTTP Version: Unsupported HTTP version.".into());
    }
    let uri = parts[1];
    let path = if let Some(rest) = uri.strip_prefix("http://") {
        match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => return Parsed::Bad(format!("Invalid URI: {uri}")),
        }
    } else if uri.starts_with('/') {
        uri.to_string()
    } else {
        return Parsed::Bad("Invalid URI: Unsupported URI format.".into());
    };
    let mut length = 0usize;
    let mut expect_continue = false;
    for line in lines {
        if line.len() > MAX_LINE {
            return Parsed::Bad("Invalid request.".into());
        }
        let Some((k, v)) = line.split_once(':') else {
            return Parsed::Bad("Invalid header. Reason: Invalid header.".into());
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            match v.parse() {
                Ok(n) => length = n,
                Err(_) => {
                    return Parsed::Bad(format!(
                        "Invalid header. Reason: Invalid value. Key:Content-Length; Value: {v}"
                    ));
                }
            }
        } else if k.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case("100-continue") {
            expect_continue = true;
        }
    }
    if length > MAX_PAYLOAD {
        return Parsed::Bad(format!(
            "Request payload with size {length} is larger than the limit of {MAX_PAYLOAD} allowed by server."
        ));
    }
    let body_at = head_end + 4;
    if buf.len() < body_at + length {
        return Parsed::Incomplete { expect_continue };
    }
    let body = (length > 0).then(|| buf[body_at..body_at + length].to_vec());
    let path = path.split('?').next().unwrap_or("").to_string();
    Parsed::Request { method: parts[0].to_string(), path, body, used: body_at + length }
}

/// True when the peer has half-closed: micro_http then drops the connection unanswered.
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv into a valid 1-byte buffer; MSG_PEEK leaves the data in place.
    let n = unsafe { libc::recv(stream.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n == 0
}

fn serve(mut stream: UnixStream, tx: &Sender<Msg>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut continued = false;
    loop {
        match parse(&buf) {
            Parsed::Incomplete { expect_continue } => {
                if expect_continue && !continued {
                    continued = true;
                    if stream.write_all(&render(100, None, "Cloud Hypervisor API")).is_err() {
                        return;
                    }
                }
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            Parsed::Bad(why) => {
                buf.clear();
                let body = format!("{{ \"error\": \"{why}\nAll previous unanswered requests will be dropped.\" }}");
                if stream.write_all(&render(400, Some(&body), "Firecracker API")).is_err() {
                    return;
                }
            }
            Parsed::Request { method, path, body, used } => {
                buf.drain(..used);
                continued = false;
                if buf.is_empty() && peer_hung_up(&stream) {
                    return;
                }
                let resp = route(&method, &path, body, tx);
                let wrote = stream.write_all(&render(resp.status, resp.body.as_deref(), "Cloud Hypervisor API"));
                if let Some(ack) = resp.written {
                    let _ = ack.send(());
                }
                if wrote.is_err() {
                    return;
                }
            }
        }
    }
}

fn error(status: u16, chain: &[&str]) -> ApiResp {
    ApiResp { status, body: Some(serde_json::to_string(chain).unwrap_or_default()), written: None }
}

/// Endpoints CH v53 has that the double does not implement.
const OTHER_ENDPOINTS: &[&str] = &[
    "vm.add-device",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-net",
    "vm.add-pmem",
    "vm.add-vdpa",
    "vm.add-vsock",
    "vm.add-user-device",
    "vm.coredump",
    "vm.nmi",
    "vm.receive-migration",
    "vm.remove-device",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.restore",
    "vm.send-migration",
    "vm.snapshot",
];

fn route(method: &str, path: &str, body: Option<Vec<u8>>, tx: &Sender<Msg>) -> ApiResp {
    let Some(endpoint) = path.strip_prefix("/api/v1/") else { return error(404, &["Not Found"]) };
    let bad = || error(400, &["Bad Request"]);
    let get = matches!(endpoint, "vmm.ping" | "vm.info" | "vm.counters");
    let put = matches!(
        endpoint,
        "vm.create"
            | "vmm.shutdown"
            | "vm.boot"
            | "vm.shutdown"
            | "vm.reboot"
            | "vm.power-button"
            | "vm.pause"
            | "vm.resume"
            | "vm.delete"
    );
    if !get && !put && !OTHER_ENDPOINTS.contains(&endpoint) {
        return error(404, &["Not Found"]);
    }
    if (get && method != "GET") || (!get && method != "PUT") {
        return bad();
    }
    let req = match endpoint {
        "vmm.ping" => ApiReq::Ping,
        "vm.info" => ApiReq::Info,
        "vm.counters" => ApiReq::Counters,
        "vm.create" => match body {
            Some(b) if serde_json::from_slice::<serde_json::Value>(&b).is_ok() => ApiReq::Create,
            _ => return bad(),
        },
        "vmm.shutdown" => ApiReq::VmmShutdown,
        _ if !put => {
            return error(500, &["Error from API", "Not supported by the cloud-hypervisor test double"]);
        }
        _ if body.is_some() => return bad(),
        "vm.boot" => ApiReq::Boot,
        "vm.shutdown" => ApiReq::Shutdown,
        "vm.reboot" => ApiReq::Reboot,
        "vm.power-button" => ApiReq::PowerButton,
        "vm.pause" => ApiReq::Pause,
        "vm.resume" => ApiReq::Resume,
        _ => ApiReq::Delete,
    };
    let (rtx, rrx) = channel();
    if tx.send(Msg::Api(req, rtx)).is_err() {
        return error(500, &["API request send error"]);
    }
    // The VMM loop answers when it gets to it: a busy (or hung) VMM keeps the client waiting.
    rrx.recv().unwrap_or_else(|_| error(500, &["API response receive error"]))
}
