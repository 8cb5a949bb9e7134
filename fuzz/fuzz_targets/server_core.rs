#![no_main]
//! See `udpmsg_fuzz::server_core`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| udpmsg_fuzz::server_core::run(data));
