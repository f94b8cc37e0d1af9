//! The frame decoder on arbitrary bytes: it must return a message or an error, never
//! panic, hang or allocate past its limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_transport::frame::{self, Request, Response};

fuzz_target!(|data: &[u8]| {
    let _ = frame::decode::<Request>(data);
    let _ = frame::decode::<Response>(data);
    let _ = frame::stated_protocol_version(data);
});
