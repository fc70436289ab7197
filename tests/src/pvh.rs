//! A tiny PVH-bootable guest for real cloud-hypervisor runs: an ELF64 (x86-64) file whose
//! one PT_LOAD segment, loaded at 1 MiB, holds 32-bit code that writes a line to serial
//! port 0x3f8 and then idles in `cli; hlt`; and a PT_NOTE with the Xen PVH entry note
//! (name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY, desc = the 32-bit entry address).
//! The shutdown variant then spins for a moment (2^18 iterations, a fraction of a
//! second) and writes 0x34 (S5 | SLP_EN) to the ACPI shutdown port 0x600, so the guest
//! powers itself off once it has been seen running.

const LOAD_ADDR: u32 = 0x10_0000;
const CODE_OFFSET: usize = 0x1000;
const NOTE_OFFSET: usize = 0xB0;

/// The guest's bytes: it prints `line` (plus a newline) on the serial console.
pub fn guest(line: &str, shutdown: bool) -> Vec<u8> {
    let mut code: Vec<u8> = vec![0x66, 0xBA, 0xF8, 0x03]; // mov dx, 0x3f8
    let msg_at = code.len() + 5 + 8 + if shutdown { 8 + 7 } else { 0 } + 4;
    code.push(0xBE); // mov esi, imm32
    code.extend((LOAD_ADDR + msg_at as u32).to_le_bytes());
    // loop: lodsb; test al, al; jz done; out dx, al; jmp loop
    code.extend([0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8]);
    if shutdown {
        code.extend([0xB9, 0x00, 0x00, 0x04, 0x00, 0x49, 0x75, 0xFD]); // mov ecx, 2^18; spin: dec ecx; jnz spin
        code.extend([0x66, 0xBA, 0x00, 0x06, 0xB0, 0x34, 0xEE]); // mov dx, 0x600; mov al, 0x34; out dx, al
    }
    code.extend([0xFA, 0xF4, 0xEB, 0xFC]); // halt: cli; hlt; jmp halt
    assert_eq!(code.len(), msg_at);
    code.extend(line.as_bytes());
    code.extend(b"\n\0");

    let mut f = vec![0u8; CODE_OFFSET];
    // ELF header.
    f[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let put = |f: &mut Vec<u8>, at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &0x3Eu16.to_le_bytes()); // EM_X86_64
    put(&mut f, 20, &1u32.to_le_bytes()); // EV_CURRENT
    put(&mut f, 24, &u64::from(LOAD_ADDR).to_le_bytes()); // e_entry (>= 1 MiB)
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
    put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize
    // Program headers: PT_LOAD (R+X) for the code, PT_NOTE for the entry note.
    let phdr = |kind: u32, flags: u32, offset: usize, addr: u64, size: usize, align: u64| {
        let mut p = Vec::with_capacity(56);
        p.extend(kind.to_le_bytes());
        p.extend(flags.to_le_bytes());
        p.extend((offset as u64).to_le_bytes());
        p.extend(addr.to_le_bytes()); // p_vaddr
        p.extend(addr.to_le_bytes()); // p_paddr
        p.extend((size as u64).to_le_bytes()); // p_filesz
        p.extend((size as u64).to_le_bytes()); // p_memsz
        p.extend(align.to_le_bytes());
        p
    };
    let note: Vec<u8> = [4u32.to_le_bytes(), 4u32.to_le_bytes(), 18u32.to_le_bytes()]
        .concat()
        .into_iter()
        .chain(*b"Xen\0")
        .chain(LOAD_ADDR.to_le_bytes())
        .collect();
    put(&mut f, 64, &phdr(1, 5, CODE_OFFSET, LOAD_ADDR.into(), code.len(), 0x1000));
    put(&mut f, 64 + 56, &phdr(4, 4, NOTE_OFFSET, 0, note.len(), 4));
    put(&mut f, NOTE_OFFSET, &note);
    f.extend(code);
    f
}

#[cfg(test)]
mod tests {
    #[test]
    fn layout() {
        let g = super::guest("hi", true);
        assert_eq!(&g[..4], b"\x7fELF");
        assert_eq!(&g[0xB0 + 12..0xB0 + 16], b"Xen\0");
        assert!(g.ends_with(b"hi\n\0"));
    }
}
