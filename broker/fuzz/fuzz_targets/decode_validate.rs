//! Every datagram the broker receives goes through decode (postcard, exact length, version,
//! fd count) and the stateless request checks. Neither may panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = my_hypervisor_policy::request::decode_and_check(data);
});
