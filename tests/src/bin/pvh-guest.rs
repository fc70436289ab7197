//! Writes the tiny PVH test guest: `pvh-guest OUT [--shutdown] [LINE]`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args.first().expect("usage: pvh-guest OUT [--shutdown] [LINE]");
    let shutdown = args.iter().any(|a| a == "--shutdown");
    let line = args.iter().skip(1).find(|a| *a != "--shutdown").map_or("my_hypervisor test guest", String::as_str);
    std::fs::write(out, my_hypervisor_tests::pvh::guest(line, shutdown)).expect("write the guest");
}
