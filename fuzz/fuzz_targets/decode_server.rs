#![no_main]
//! See `udpmsg_fuzz::codec`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| udpmsg_fuzz::codec::decode_server(data));
