//! The ACPI power button: the input device named "Power Button" sends KEY_POWER.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// struct input_event on 64-bit: timeval (16), type (2), code (2), value (4).
const EVENT_SIZE: usize = 24;

/// Watches every power-button event device, now and as modules add them, and sets
/// `shutdown` when the button is pressed.
pub fn watch(shutdown: Arc<AtomicBool>) {
    let mut watched = Vec::new();
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/input") {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with("event") || watched.contains(&name) {
                    continue;
                }
                let dev_name = std::fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
                if dev_name.trim() != "Power Button" {
                    continue;
                }
                match File::open(format!("/dev/input/{name}")) {
                    Ok(f) => {
                        log!("my_hypervisor-init: watching /dev/input/{name} (Power Button)");
                        let flag = Arc::clone(&shutdown);
                        std::thread::spawn(move || read_events(f, &flag));
                        watched.push(name);
                    }
                    Err(e) => log!("my_hypervisor-init: /dev/input/{name}: {e}"),
                }
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn read_events(mut f: File, shutdown: &AtomicBool) {
    let mut ev = [0u8; EVENT_SIZE];
    while f.read_exact(&mut ev).is_ok() {
        let kind = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 {
            log!("my_hypervisor-init: power button pressed");
            shutdown.store(true, Ordering::SeqCst);
        }
    }
}
