//! libFuzzer entry point of the `shm_attach` target; the check itself is `checks/shm_attach.rs`, which
//! `cargo test` also replays over the committed seeds (`rust/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../checks/shm_attach.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
