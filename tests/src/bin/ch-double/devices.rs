//! The double's devices: the serial socket (one client at a time, v53's replay buffer),
//! the hybrid-vsock muxer, the guest the kernel file describes, and the disk and tap checks
//! CH makes when it creates a VM.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// v53's SerialBuffer keeps the newest 1 MiB written while no client is connected.
const SERIAL_BUFFER_MAX: usize = 1 << 20;
/// The poll period of the device threads, which bounds how long a close takes.
const TICK_MS: i32 = 50;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// poll(2) on `fds` for input; returns which are readable (or hung up).
fn poll_in(fds: &[i32], timeout_ms: i32) -> Vec<bool> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `p` is a valid array of pollfd of the length passed.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    p.iter().map(|x| x.revents != 0).collect()
}

/// Output the serial port produced, and the client it goes to.
#[derive(Default)]
pub struct SerialOut {
    pub client: Option<UnixStream>,
    pub buffer: VecDeque<u8>,
    /// The guest echoes its serial input (fault `serial-echo`).
    pub echo: bool,
}

impl SerialOut {
    /// What the guest writes to port 0x3f8.
    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(c) = &mut self.client {
            if c.write_all(bytes).is_ok() {
                return;
            }
            self.client = None;
        }
        self.buffer.extend(bytes);
        let excess = self.buffer.len().saturating_sub(SERIAL_BUFFER_MAX);
        self.buffer.drain(..excess);
    }
}

/// The listening serial socket and its manager thread; the socket file goes when it closes.
pub struct SerialSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    out: Arc<Mutex<SerialOut>>,
}

impl SerialSocket {
    /// Binds `path` (failing if it exists, as CH does) and serves it.
    /// The console devices are made anew, with an empty buffer.
    pub fn create(path: &Path, out: Arc<Mutex<SerialOut>>) -> std::io::Result<SerialSocket> {
        let listener = UnixListener::bind(path)?;
        lock(&out).buffer.clear();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, o) = (stop.clone(), out.clone());
        let thread =
            std::thread::Builder::new().name("serial-manager".into()).spawn(move || serial_loop(listener, s, o))?;
        Ok(SerialSocket { path: path.to_path_buf(), stop, thread: Some(thread), out })
    }
}

fn serial_loop(listener: UnixListener, stop: Arc<AtomicBool>, out: Arc<Mutex<SerialOut>>) {
    let mut input = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        let client_fd = lock(&out).client.as_ref().map(|c| c.as_raw_fd());
        let mut fds = vec![listener.as_raw_fd()];
        fds.extend(client_fd);
        let ready = poll_in(&fds, TICK_MS);
        if ready[0]
            && let Ok((mut stream, _)) = listener.accept()
        {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
            let mut o = lock(&out);
            if let Some(old) = o.client.take() {
                let _ = old.shutdown(Shutdown::Both);
            }
            let backlog: Vec<u8> = o.buffer.drain(..).collect();
            if stream.write_all(&backlog).is_ok() {
                o.client = Some(stream);
            }
            continue;
        }
        if ready.get(1) == Some(&true) {
            let mut o = lock(&out);
            // Input goes to a guest that does not read it, or echoes it; EOF detaches the
            // client.
            let gone = match o.client.as_mut().map(|c| {
                let _ = c.set_nonblocking(true);
                let r = c.read(&mut input);
                let _ = c.set_nonblocking(false);
                r
            }) {
                Some(Ok(0)) => true,
                Some(Ok(n)) if o.echo => {
                    o.write(&input[..n]);
                    false
                }
                Some(Err(e)) => e.kind() != std::io::ErrorKind::WouldBlock,
                _ => false,
            };
            if gone {
                o.client = None;
            }
        }
    }
}

impl Drop for SerialSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(c) = lock(&self.out).client.take() {
            let _ = c.shutdown(Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The hybrid-vsock muxer's host side. `CONNECT <port>\n` is forwarded to the Unix socket
/// `guest_listener(socket, port)`, which plays the guest's listener on that port.
pub struct VsockMuxer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    streams: Streams,
}

/// The open streams of each forwarded connection, shut down when the device goes.
type Streams = Arc<Mutex<std::collections::HashMap<u64, Vec<UnixStream>>>>;

/// Where the double looks for the guest-side listener of vsock `port`: next to the vsock
/// socket, `guest-vsock-<port>.sock`.
pub fn guest_listener(socket: &Path, port: u32) -> PathBuf {
    socket.parent().unwrap_or(Path::new("/")).join(format!("guest-vsock-{port}.sock"))
}

impl VsockMuxer {
    pub fn create(path: &Path) -> std::io::Result<VsockMuxer> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Streams::default();
        let (s, st, p) = (stop.clone(), streams.clone(), path.to_path_buf());
        let thread = std::thread::Builder::new().name("vsock".into()).spawn(move || vsock_loop(listener, p, s, st))?;
        Ok(VsockMuxer { path: path.to_path_buf(), stop, thread: Some(thread), streams })
    }
}

fn vsock_loop(listener: UnixListener, path: PathBuf, stop: Arc<AtomicBool>, streams: Streams) {
    // CH's local_port_last starts at 2^30 - 1; each host connection takes the next port
    // in [2^30, 2^31).
    let last_port = Arc::new(AtomicU32::new((1 << 30) - 1));
    let mut next_id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if !poll_in(&[listener.as_raw_fd()], TICK_MS)[0] {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        let (path, streams, last_port) = (path.clone(), streams.clone(), last_port.clone());
        next_id += 1;
        let id = next_id;
        if let Ok(c) = stream.try_clone() {
            lock(&streams).insert(id, vec![c]);
        }
        let _ = std::thread::Builder::new().name("vsock-conn".into()).spawn(move || {
            vsock_connection(stream, &path, &streams, id, &last_port);
            lock(&streams).remove(&id);
        });
    }
}

/// Reads `CONNECT <port>\n` the way CH does: at most 32 bytes, case-insensitive prefix.
fn read_connect(stream: &mut UnixStream) -> Option<u32> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        match stream.read(&mut b) {
            Ok(1) if b[0] == b'\n' => {
                let text = std::str::from_utf8(&line).ok()?;
                if text.len() < 8 || !text[..8].eq_ignore_ascii_case("connect ") {
                    return None;
                }
                return text[8..].trim().parse().ok();
            }
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    None
}

fn vsock_connection(mut host: UnixStream, path: &Path, streams: &Streams, id: u64, last_port: &AtomicU32) {
    let _ = host.set_nonblocking(false);
    let Some(port) = read_connect(&mut host) else { return };
    // Nothing listening on the guest side: the guest answers RST and CH closes the stream.
    let Ok(guest) = UnixStream::connect(guest_listener(path, port)) else { return };
    let local = last_port
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(((p + 1) & !(1 << 31)) | (1 << 30)))
        .map(|p| ((p + 1) & !(1 << 31)) | (1 << 30))
        .unwrap_or(1 << 30);
    let _ = host.set_read_timeout(None);
    if host.write_all(format!("OK {local}\n").as_bytes()).is_err() {
        return;
    }
    let (Ok(h2), Ok(g2)) = (host.try_clone(), guest.try_clone()) else { return };
    if let Ok(g3) = guest.try_clone() {
        lock(streams).entry(id).or_default().push(g3);
    }
    let up = std::thread::Builder::new().name("vsock-up".into()).spawn(move || pump(h2, g2));
    pump(guest, host);
    if let Ok(t) = up {
        let _ = t.join();
    }
}

/// Copies `from` to `to` until EOF, then half-closes `to`.
fn pump(mut from: UnixStream, mut to: UnixStream) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in lock(&self.streams).drain().flat_map(|(_, v)| v) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the kernel file makes the guest do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guest {
    /// The project's PVH test guest: prints `line` on the serial port, then idles or
    /// powers off through the ACPI port 0x600. It has no ACPI power-button handling.
    Pvh { line: Vec<u8>, shutdown: bool },
    /// Any other kernel: an idle guest that powers off on the ACPI power button.
    Other,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A PT_LOAD segment: (guest-physical address, file offset, size in the file).
type Segment = (u64, u64, u64);

/// The PVH entry from the last PT_NOTE segment (linux-loader keeps only the last one's
/// verdict), and the PT_LOAD segments as (paddr, file offset, filesz).
fn pvh_entry(elf: &[u8]) -> Option<(u32, Vec<Segment>)> {
    if elf.get(..4)? != b"\x7fELF" || *elf.get(5)? != 1 {
        return None;
    }
    let phoff = u64_at(elf, 32)? as usize;
    let (phentsize, phnum) = (u16_at(elf, 54)? as usize, u16_at(elf, 56)? as usize);
    if phentsize != 56 || phoff < 64 || u64_at(elf, 24)? < 0x10_0000 {
        return None;
    }
    let mut entry = None;
    let mut loads = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (kind, offset, paddr, filesz) =
            (u32_at(elf, ph)?, u64_at(elf, ph + 8)?, u64_at(elf, ph + 24)?, u64_at(elf, ph + 32)?);
        match kind {
            1 if filesz != 0 => loads.push((paddr, offset, filesz)),
            4 => entry = xen_note(elf.get(offset as usize..(offset + filesz) as usize)?),
            _ => {}
        }
    }
    Some((entry?, loads))
}

fn xen_note(mut notes: &[u8]) -> Option<u32> {
    let align = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (u32_at(notes, 0)? as usize, u32_at(notes, 4)? as usize, u32_at(notes, 8)?);
        let name = notes.get(12..12 + namesz)?;
        let desc_at = 12 + align(namesz);
        if kind == 18 && namesz == 4 && name == b"Xen\0" && descsz >= 4 {
            return u32_at(notes, desc_at);
        }
        notes = notes.get(desc_at + align(descsz)..)?;
    }
    None
}

/// Reads the guest's behaviour from its code: the `mov esi, imm32` that points at the
/// message it sends to port 0x3f8, and the `out` of 0x34 to port 0x600.
pub fn inspect(kernel: &[u8]) -> Guest {
    let Some((entry, loads)) = pvh_entry(kernel) else { return Guest::Other };
    let guest_bytes = |addr: u64| -> Option<&[u8]> {
        let (paddr, offset, size) = loads.iter().find(|(p, _, s)| (*p..p + s).contains(&addr))?;
        kernel.get((offset + addr - paddr) as usize..(offset + size) as usize)
    };
    let Some(code) = guest_bytes(entry.into()) else { return Guest::Other };
    let serial = code.windows(4).position(|w| w == [0x66, 0xBA, 0xF8, 0x03]);
    let shutdown = code.windows(7).any(|w| w == [0x66, 0xBA, 0x00, 0x06, 0xB0, 0x34, 0xEE]);
    let mut line = Vec::new();
    if let Some(at) = serial
        && let Some(mov) = code[at..].iter().position(|&b| b == 0xBE).map(|p| at + p)
        && let Some(target) = u32_at(code, mov + 1)
        && let Some(msg) = guest_bytes(target.into())
    {
        line = msg.iter().take_while(|&&b| b != 0).copied().collect();
    }
    Guest::Pvh { line, shutdown }
}

/// An opened disk image, locked as CH locks it (an OFD lock over the whole file: shared when
/// read-only, exclusive otherwise).
pub fn open_disk(path: &str, readonly: bool) -> Result<File, Vec<String>> {
    let io = |e: std::io::Error, op: &str| {
        vec![
            "Error from device manager".to_string(),
            "Cannot open disk path".into(),
            format!("I/O error (path={path} op={op})"),
            e.to_string(),
        ]
    };
    let f = File::options().read(true).write(!readonly).open(path).map_err(|e| io(e, "open"))?;
    // SAFETY: a zeroed flock is valid; every field we need is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if readonly { libc::F_RDLCK } else { libc::F_WRLCK } as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // SAFETY: F_OFD_SETLK with a pointer to a valid flock, on an fd we own.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(vec![
            "Error locking disk images: Another process likely holds the lock".into(),
            format!("The disk image {path} is locked"),
            e.to_string(),
        ]);
    }
    Ok(f)
}

/// The checks `Tap::from_tap_fd` makes: the fd is open (made non-blocking) and TUNGETIFF
/// works, i.e. it is attached to a tap.
pub fn check_tap(fd: i32) -> Result<(), Vec<String>> {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    let err = |what: String, e: std::io::Error| {
        vec![
            "Error from device manager".to_string(),
            "Cannot create virtio-net device".into(),
            "Using existing tap".into(),
            what,
            e.to_string(),
        ]
    };
    // SAFETY: fcntl with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(err("Unable to set tap fd non-blocking".into(), std::io::Error::last_os_error()));
    }
    // SAFETY: fcntl with integer arguments.
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes a struct ifreq (40 bytes on x86_64) into the buffer we pass.
    if unsafe { libc::ioctl(fd, TUNGETIFF as _, ifreq.as_mut_ptr()) } < 0 {
        return Err(err(format!("Ioctl failed ({TUNGETIFF})"), std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_test_guest() {
        let g = my_hypervisor_tests::pvh::guest("hello there", true);
        assert_eq!(super::inspect(&g), super::Guest::Pvh { line: b"hello there\n".to_vec(), shutdown: true });
        let g = my_hypervisor_tests::pvh::guest("x", false);
        assert_eq!(super::inspect(&g), super::Guest::Pvh { line: b"x\n".to_vec(), shutdown: false });
        assert_eq!(super::inspect(b"not an elf"), super::Guest::Other);
    }
}
