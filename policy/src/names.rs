//! Which names and paths may cross the broker boundary at all.

// The VM-id rule, defined once: the broker, the frontend's params and spec checks, and the
// API's JSON Schema all use these.
macro_rules! vm_id_max {
    () => {
        64
    };
}

/// The longest VM id, in bytes.
pub const VM_ID_MAX: usize = vm_id_max!();
/// The VM-id rule in words, for error messages and documentation.
pub const VM_ID_RULE: &str = concat!("1 to ", vm_id_max!(), " characters of [a-z0-9-]");
/// The VM-id rule as a regular expression (the JSON Schema `pattern` of a VM id).
pub const VM_ID_PATTERN: &str = concat!("^[a-z0-9-]{1,", vm_id_max!(), "}$");
/// The longest path the broker accepts for an image or a binary.
pub const PATH_MAX_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("vm id must be {VM_ID_RULE}, got {0:?}")]
    BadVmId(String),
    #[error("path {0:?} is empty or longer than {PATH_MAX_LEN} bytes")]
    PathLength(String),
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path {0:?} contains {1:?}, which cloud-hypervisor's option parser splits on")]
    ForbiddenChar(String, char),
    #[error("path {0:?} has a '.' or '..' component or an empty one")]
    BadComponent(String),
}

/// Whether `id` is a valid VM id: [`VM_ID_RULE`].
pub fn is_vm_id(id: &str) -> bool {
    (1..=VM_ID_MAX).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn check_vm_id(id: &str) -> Result<(), NameError> {
    if is_vm_id(id) { Ok(()) } else { Err(NameError::BadVmId(id.to_string())) }
}

/// Checks the text of a path that ends up in a cloud-hypervisor option: absolute, bounded,
/// no `,` `=` `"` or control characters, and no `.`, `..` or empty components. Whether the
/// path lies under an image root is checked again by the broker when it opens it.
pub fn check_path_text(path: &str) -> Result<(), NameError> {
    if path.is_empty() || path.len() > PATH_MAX_LEN {
        return Err(NameError::PathLength(path.to_string()));
    }
    if let Some(c) = path.chars().find(|c| matches!(c, ',' | '=' | '"') || c.is_control()) {
        return Err(NameError::ForbiddenChar(path.to_string(), c));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(NameError::NotAbsolute(path.to_string()));
    };
    if rest.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(NameError::BadComponent(path.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids() {
        for good in ["a", "vm-1", "0", &"a".repeat(64)] {
            assert_eq!(check_vm_id(good), Ok(()), "{good}");
        }
        for bad in ["", "A", "vm_1", "vm.1", "../x", "vm 1", &"a".repeat(65), "é"] {
            assert!(check_vm_id(bad).is_err(), "{bad}");
        }
        assert_eq!(VM_ID_RULE, format!("1 to {VM_ID_MAX} characters of [a-z0-9-]"));
        assert_eq!(VM_ID_PATTERN, format!("^[a-z0-9-]{{1,{VM_ID_MAX}}}$"));
    }

    #[test]
    fn paths() {
        assert_eq!(check_path_text("/var/lib/img/a.raw"), Ok(()));
        let cases = [
            ("", "PathLength"),
            ("rel/a", "NotAbsolute"),
            ("/a,b", "ForbiddenChar"),
            ("/a=b", "ForbiddenChar"),
            ("/a\"b", "ForbiddenChar"),
            ("/a\nb", "ForbiddenChar"),
            ("/a/../b", "BadComponent"),
            ("/a/./b", "BadComponent"),
            ("/a//b", "BadComponent"),
            ("/a/", "BadComponent"),
        ];
        for (p, kind) in cases {
            let e = check_path_text(p).unwrap_err();
            assert!(format!("{e:?}").starts_with(kind), "{p:?}: {e:?}");
        }
        assert!(check_path_text(&format!("/{}", "a".repeat(PATH_MAX_LEN))).is_err());
    }
}
