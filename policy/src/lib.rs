//! Rules, as pure data and logic. Nothing in this crate has a side effect: it opens no file,
//! makes no system call and reads no environment. The broker, the frontend and the VMM
//! launcher all decide through it, so a reviewer can sign the rules in one place.

pub mod acl;
pub mod ch_binary;
pub mod daemon;
pub mod elf;
pub mod frontend;
pub mod journal;
pub mod layout;
pub mod names;
pub mod net;
pub mod notify;
pub mod observed;
pub mod privileges;
pub mod refusal;
pub mod request;
pub mod sandbox;
pub mod seccomp;
pub mod vmm;
pub mod vmm_filter;

pub use names::{NameError, check_path_text, check_vm_id};
