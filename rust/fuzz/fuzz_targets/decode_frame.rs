//! libFuzzer entry point of the `decode_frame` target; the check itself is `checks/decode_frame.rs`, which
//! `cargo test` also replays over the committed seeds (`rust/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../checks/decode_frame.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
