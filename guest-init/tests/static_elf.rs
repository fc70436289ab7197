//! The guest image's /init must run without a dynamic loader: the static build of
//! guest-init has no PT_INTERP program header.

mod common;

const PT_INTERP: u32 = 3;

/// The p_type of every program header of a 64-bit little-endian ELF file.
fn program_header_types(bytes: &[u8]) -> Result<Vec<u32>, String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (entsize, count) = (u16_at(0x36), u16_at(0x38));
    (0..count)
        .map(|i| {
            let at = phoff + i * entsize;
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .ok_or_else(|| format!("program header {i} is outside the file"))
        })
        .collect()
}

#[test]
fn the_static_init_has_no_program_interpreter() {
    let bytes = std::fs::read(common::STATIC_INIT)
        .unwrap_or_else(|e| panic!("{}: {e} (built by guest-init's build script)", common::STATIC_INIT));
    let types = program_header_types(&bytes).unwrap();
    assert!(!types.is_empty());
    assert!(!types.contains(&PT_INTERP), "{} has a PT_INTERP", common::STATIC_INIT);

    // The same check finds the interpreter of this (dynamically linked) test program, so a
    // pass above is not the parser's blindness.
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(program_header_types(&me).unwrap().contains(&PT_INTERP));
}

#[test]
fn outside_a_guest_it_refuses_to_run_without_test_mode() {
    let out = std::process::Command::new(common::STATIC_INIT).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as PID 1"));
    let out = std::process::Command::new(common::STATIC_INIT).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument"));
}
