//! Replays the fuzz targets' committed seeds (`rust/fuzz/corpus/<target>/seed-*`) through the
//! targets' own checks on every `cargo test`, without libFuzzer or a nightly toolchain: an
//! input a campaign once found interesting keeps being checked after every change, and the
//! targets cannot rot unbuilt between campaigns.

use std::path::{Path, PathBuf};

#[path = "../fuzz/checks/decode_frame.rs"]
mod decode_frame;
#[path = "../fuzz/checks/shm_attach.rs"]
mod shm_attach;

/// The committed seeds of one target, sorted, at least `min` of them (a moved or emptied
/// corpus folder must fail here rather than replay nothing).
fn seeds(target: &str, min: usize) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rust/fuzz/corpus")
        .join(target);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("read a corpus entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= min,
        "{} holds {} seeds, expected at least {min}",
        dir.display(),
        out.len()
    );
    out
}

/// Runs `check` on every seed; the seed's name is printed first, so a failure names it.
fn replay(target: &str, min: usize, check: fn(&[u8])) {
    for path in seeds(target, min) {
        println!("{target}: {}", path.display());
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        check(&data);
    }
}

#[test]
fn decode_frame_seeds_replay_clean() {
    replay("decode_frame", 90, decode_frame::run);
}

#[test]
fn shm_attach_seeds_replay_clean() {
    replay("shm_attach", 1000, shm_attach::run);
    let _ = std::fs::remove_dir_all(shm_attach::dir());
}
