//! Faults a test asks for on the VM's kernel command line (CH's `--cmdline`): words
//! `ch_double.fault=NAME` or `ch_double.fault=NAME=MS` (several words, or several
//! comma-separated faults in one word); MS counts from `vm/booted`. An unknown fault name is
//! an error (exit 1).
//!
//! | fault | effect |
//! |---|---|
//! | `exit-at-boot` | boot fails after `vm/booting`: CH's failed-boot events, exit 1 |
//! | `hang` | nothing happens: no events, the API never answers, SIGTERM is ignored |
//! | `hang=MS` | the VMM stops answering the API and signals MS after boot |
//! | `slow-boot=MS` | boot takes MS more; API requests wait until it is done |
//! | `slow-create=MS` | for MS before booting, the API answers and vm.info says `Created` (real CH has this window between its vm.create and vm.boot) |
//! | `crash=MS` | the VMM kills itself with SIGKILL MS after boot |
//! | `crash-exit=MS` | the VMM fails with exit status 1 MS after boot |
//! | `ignore-power-button` | the guest ignores the power button |
//! | `honour-power-button` | the guest powers off on the power button |
//! | `guest-shutdown=MS` | the guest powers off MS after boot |
//! | `guest-reboot=MS` | the guest reboots MS after boot (once per boot) |
//! | `panic=MS` | the guest panics MS after boot: `guest/panic` with `--pvpanic`; it keeps running |
//! | `quiet-exit` | events not yet written when the VMM exits are lost |
//! | `flood-log=MS` | the VMM writes to its log without end, MS after boot |
//! | `flood-reboots=MS` | MS after boot, the event monitor gets 100000 `vm`/`rebooted` events at once (the guest does not reboot) |

#[derive(Debug, Default, Clone)]
pub struct Faults {
    pub exit_at_boot: bool,
    pub hang: bool,
    pub hang_after: Option<u64>,
    pub slow_boot: Option<u64>,
    pub slow_create: Option<u64>,
    pub crash: Option<u64>,
    pub crash_exit: Option<u64>,
    pub power_button: Option<bool>,
    pub guest_shutdown: Option<u64>,
    pub guest_reboot: Option<u64>,
    pub panic: Option<u64>,
    pub quiet_exit: bool,
    pub flood_log: Option<u64>,
    pub flood_reboots: Option<u64>,
    /// The guest echoes what it reads on its serial port.
    pub serial_echo: bool,
    /// The guest prints this many KiB on its serial port at boot.
    pub serial_flood: Option<u64>,
    /// The VMM writes this many MiB to its log, 1 MiB every 60 ms, then `chatty-done`.
    pub chatty_log: Option<u64>,
}

impl Faults {
    pub fn parse(cmdline: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for word in cmdline.split_whitespace() {
            let Some(list) = word.strip_prefix("ch_double.fault=") else { continue };
            for item in list.split(',') {
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n, Some(a)),
                    None => (item, None),
                };
                let ms = || -> Result<u64, String> {
                    arg.ok_or_else(|| format!("fault {name} needs =MS"))?
                        .parse()
                        .map_err(|_| format!("fault {name}: {arg:?} is not a number of milliseconds"))
                };
                match name {
                    "exit-at-boot" => f.exit_at_boot = true,
                    "hang" if arg.is_none() => f.hang = true,
                    "hang" => f.hang_after = Some(ms()?),
                    "slow-boot" => f.slow_boot = Some(ms()?),
                    "slow-create" => f.slow_create = Some(ms()?),
                    "crash" => f.crash = Some(ms()?),
                    "crash-exit" => f.crash_exit = Some(ms()?),
                    "ignore-power-button" => f.power_button = Some(false),
                    "honour-power-button" => f.power_button = Some(true),
                    "guest-shutdown" => f.guest_shutdown = Some(ms()?),
                    "guest-reboot" => f.guest_reboot = Some(ms()?),
                    "panic" => f.panic = Some(ms()?),
                    "quiet-exit" => f.quiet_exit = true,
                    "flood-log" => f.flood_log = Some(ms()?),
                    "flood-reboots" => f.flood_reboots = Some(ms()?),
                    "serial-echo" => f.serial_echo = true,
                    "chatty-log" => {
                        let mib = arg.and_then(|a| a.parse().ok());
                        f.chatty_log = Some(mib.ok_or_else(|| format!("fault {name} needs =MIB"))?);
                    }
                    "serial-flood" => {
                        let kib = arg.and_then(|a| a.parse().ok());
                        f.serial_flood = Some(kib.ok_or_else(|| format!("fault {name} needs =KIB"))?);
                    }
                    _ => return Err(format!("unknown ch_double fault {item:?}")),
                }
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::Faults;

    #[test]
    fn faults_from_the_command_line() {
        let f = Faults::parse("console=ttyS0 ch_double.fault=crash=50,quiet-exit ch_double.fault=hang").unwrap();
        assert_eq!((f.crash, f.quiet_exit, f.hang, f.hang_after), (Some(50), true, true, None));
        let f = Faults::parse("ch_double.fault=hang=7 ch_double.fault=ignore-power-button").unwrap();
        assert_eq!((f.hang, f.hang_after, f.power_button), (false, Some(7), Some(false)));
        assert_eq!(Faults::parse("").unwrap().crash, None);
        let f = Faults::parse("ch_double.fault=serial-echo,serial-flood=64").unwrap();
        assert_eq!((f.serial_echo, f.serial_flood), (true, Some(64)));
        for bad in [
            "ch_double.fault=serial-flood",
            "ch_double.fault=nope",
            "ch_double.fault=crash",
            "ch_double.fault=crash=soon",
            "ch_double.fault=",
        ] {
            assert!(Faults::parse(bad).is_err(), "{bad}");
        }
    }
}
