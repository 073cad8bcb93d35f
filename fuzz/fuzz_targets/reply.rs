#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailgate_fuzz::reply(data));
