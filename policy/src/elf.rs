//! What a dynamically linked program needs to start: its ELF interpreter (PT_INTERP) and the
//! shared libraries it names (DT_NEEDED), found the way the dynamic loader finds them without
//! its cache. Used to build each VMM's minimal root (ADR 0003). Parsing is pure; the caller
//! passes a function that reads a file, so nothing here touches the filesystem.

/// Where the loader looks without /etc/ld.so.cache, in its order (glibc's system search path
/// on x86_64 Debian, then the other common layouts).
pub const LIB_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// At most this many files in one program's closure: a bound on a malformed or hostile tree.
const MAX_FILES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("{0}: not a 64-bit little-endian ELF file")]
    NotElf(String),
    #[error("{0}: truncated or malformed ELF ({1})")]
    Malformed(String, &'static str),
    #[error("{0}: cannot read it")]
    Unreadable(String),
    #[error("{lib}, needed by {by}, is in none of {dirs:?}")]
    Missing { lib: String, by: String, dirs: &'static [&'static str] },
    #[error("more than {MAX_FILES} files needed")]
    TooMany,
}

/// The interpreter and the DT_NEEDED names of one ELF64 little-endian file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Needs {
    pub interpreter: Option<String>,
    pub libraries: Vec<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}
fn c_str(b: &[u8], at: usize) -> Option<String> {
    let rest = b.get(at..)?;
    let s = &rest[..rest.iter().position(|&c| c == 0)?];
    String::from_utf8(s.to_vec()).ok()
}

/// Parses `bytes`, the file `name`.
pub fn needs(name: &str, bytes: &[u8]) -> Result<Needs, ElfError> {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1]) {
        return Err(ElfError::NotElf(name.into()));
    }
    let bad = |what| ElfError::Malformed(name.into(), what);
    let (phoff, phentsize, phnum) =
        (|| Some((u64_at(bytes, 0x20)?, u16_at(bytes, 0x36)?, u16_at(bytes, 0x38)?)))().ok_or(bad("header"))?;
    // (type, offset, vaddr, filesz) of each program header.
    let mut headers = Vec::new();
    for i in 0..usize::from(phnum) {
        let at =
            usize::try_from(phoff).ok().and_then(|o| o.checked_add(i * usize::from(phentsize))).ok_or(bad("phdr"))?;
        let h =
            (|| Some((u32_at(bytes, at)?, u64_at(bytes, at + 8)?, u64_at(bytes, at + 16)?, u64_at(bytes, at + 32)?)))();
        headers.push(h.ok_or(bad("program header"))?);
    }
    let mut out = Needs::default();
    if let Some(&(_, off, _, _)) = headers.iter().find(|h| h.0 == PT_INTERP) {
        out.interpreter = Some(c_str(bytes, off as usize).ok_or(bad("interpreter"))?);
    }
    let Some(&(_, dyn_off, _, dyn_size)) = headers.iter().find(|h| h.0 == PT_DYNAMIC) else { return Ok(out) };
    // (tag, value) pairs up to DT_NULL.
    let mut entries = Vec::new();
    for i in 0..(dyn_size / 16) as usize {
        let at = (dyn_off as usize).checked_add(i * 16).ok_or(bad("dynamic"))?;
        let (tag, val) = (u64_at(bytes, at).ok_or(bad("dynamic"))?, u64_at(bytes, at + 8).ok_or(bad("dynamic"))?);
        if tag == 0 {
            break;
        }
        entries.push((tag, val));
    }
    let Some(&(_, strtab)) = entries.iter().find(|e| e.0 == 5) else { return Ok(out) };
    // DT_STRTAB is an address: the PT_LOAD segment holding it gives its file offset.
    let load = headers.iter().find(|h| h.0 == PT_LOAD && h.2 <= strtab && strtab - h.2 < h.3).ok_or(bad("strtab"))?;
    let strtab = (strtab - load.2).checked_add(load.1).ok_or(bad("strtab"))?;
    for &(_, off) in entries.iter().filter(|e| e.0 == 1) {
        let at = strtab.checked_add(off).ok_or(bad("needed"))? as usize;
        out.libraries.push(c_str(bytes, at).ok_or(bad("needed"))?);
    }
    Ok(out)
}

/// Every file `programs` need to start, themselves included, each once, in the order found:
/// interpreters and libraries, libraries' own needs too, each library at the first of
/// `LIB_DIRS` that holds it. `read` returns a file's bytes, or None if it does not exist.
pub fn closure(programs: &[&str], mut read: impl FnMut(&str) -> Option<Vec<u8>>) -> Result<Vec<String>, ElfError> {
    let mut files: Vec<String> = Vec::new();
    let mut todo: Vec<(String, Option<Vec<u8>>)> = programs.iter().map(|p| (p.to_string(), None)).collect();
    while let Some((path, bytes)) = todo.pop() {
        if files.contains(&path) {
            continue;
        }
        if files.len() >= MAX_FILES {
            return Err(ElfError::TooMany);
        }
        let bytes = bytes.or_else(|| read(&path)).ok_or_else(|| ElfError::Unreadable(path.clone()))?;
        let n = needs(&path, &bytes)?;
        if let Some(interp) = n.interpreter {
            todo.push((interp, None));
        }
        for lib in n.libraries {
            let found = LIB_DIRS.iter().find_map(|d| {
                let p = format!("{d}/{lib}");
                read(&p).map(|b| (p, Some(b)))
            });
            todo.push(found.ok_or_else(|| ElfError::Missing { lib, by: path.clone(), dirs: LIB_DIRS })?);
        }
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 LE image: one PT_LOAD covering the file at vaddr 0x1000, a PT_INTERP
    /// and a PT_DYNAMIC with DT_STRTAB and the given DT_NEEDED names.
    fn elf(interp: Option<&str>, needed: &[&str]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut offs = Vec::new();
        for n in needed {
            offs.push(strtab.len() as u64);
            strtab.extend(n.as_bytes());
            strtab.push(0);
        }
        let phoff = 64usize;
        let ph = |t: u32, off: u64, vaddr: u64, size: u64| {
            let mut h = vec![0u8; 56];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&off.to_le_bytes());
            h[16..24].copy_from_slice(&vaddr.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h
        };
        let data_at = phoff + 3 * 56;
        let interp_bytes = interp.map(|i| format!("{i}\0").into_bytes()).unwrap_or_default();
        let strtab_at = data_at + interp_bytes.len();
        let dyn_at = strtab_at + strtab.len();
        let mut dynamic = Vec::new();
        dynamic.extend(5u64.to_le_bytes());
        dynamic.extend((0x1000 + strtab_at as u64).to_le_bytes());
        for o in offs {
            dynamic.extend(1u64.to_le_bytes());
            dynamic.extend(o.to_le_bytes());
        }
        dynamic.extend([0u8; 16]);
        let total = dyn_at + dynamic.len();
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        b[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        b.extend(ph(1, 0, 0x1000, total as u64));
        b.extend(ph(if interp.is_some() { 3 } else { 6 }, data_at as u64, 0, interp_bytes.len() as u64));
        b.extend(ph(2, dyn_at as u64, 0x1000 + dyn_at as u64, dynamic.len() as u64));
        b.extend(interp_bytes);
        b.extend(strtab);
        b.extend(dynamic);
        b
    }

    #[test]
    fn parses_interpreter_and_needed() {
        let n = needs("ch", &elf(Some("/lib64/ld.so"), &["libc.so.6", "libgcc_s.so.1"])).unwrap();
        assert_eq!(n.interpreter.as_deref(), Some("/lib64/ld.so"));
        assert_eq!(n.libraries, vec!["libc.so.6", "libgcc_s.so.1"]);
        assert_eq!(needs("x", &elf(None, &[])).unwrap(), Needs::default());
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        assert!(matches!(needs("x", b"#!/bin/sh"), Err(ElfError::NotElf(_))));
        let good = elf(Some("/lib64/ld.so"), &["libc.so.6"]);
        for cut in 0..good.len() {
            let _ = needs("x", &good[..cut]);
        }
        let mut bad = good.clone();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(needs("x", &bad).is_err());
    }

    #[test]
    fn closure_follows_libraries_and_reports_a_missing_one() {
        let mut files = std::collections::HashMap::from([
            ("/bin/ch".to_string(), elf(Some("/lib64/ld.so"), &["libc.so.6", "libgcc_s.so.1"])),
            ("/lib64/ld.so".to_string(), elf(None, &[])),
            ("/usr/lib/x86_64-linux-gnu/libc.so.6".to_string(), elf(None, &["ld.so"])),
            ("/lib/x86_64-linux-gnu/libgcc_s.so.1".to_string(), elf(None, &["libc.so.6"])),
        ]);
        let mut all = closure(&["/bin/ch", "/bin/ch"], |p| files.get(p).cloned()).unwrap();
        all.sort();
        let want =
            ["/bin/ch", "/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib64/ld.so", "/usr/lib/x86_64-linux-gnu/libc.so.6"];
        assert_eq!(all, want);
        files.insert("/lib/x86_64-linux-gnu/libgcc_s.so.1".into(), elf(None, &["libgone.so"]));
        let err = closure(&["/bin/ch"], |p| files.get(p).cloned()).unwrap_err();
        let by = "/lib/x86_64-linux-gnu/libgcc_s.so.1".to_string();
        assert_eq!(err, ElfError::Missing { lib: "libgone.so".into(), by, dirs: LIB_DIRS });
        assert_eq!(closure(&["/nope"], |p| files.get(p).cloned()), Err(ElfError::Unreadable("/nope".into())));
    }
}
