//! Layout rules that the compiler cannot check.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Only the store speaks to etcd: the etcd-client crate is named in no file
/// of the workspace outside `coordinator/src/store/`, except the end-to-end
/// crate (`tests/`), which reads etcd as an outside observer would.
#[test]
fn only_the_store_speaks_to_etcd() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the coordinator crate is in the workspace");
    let store = root.join("coordinator/src/store");
    let end_to_end = root.join("tests");
    // Spelled in two parts so that this file does not name it.
    let crate_name = ["etcd", "_client"].concat();
    let mut files = Vec::new();
    for top in ["agent", "coordinator", "proto"] {
        rust_files(&root.join(top), &mut files);
    }
    assert!(
        files.iter().any(|f| f.starts_with(&store)),
        "the store module is no longer at {}",
        store.display()
    );
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(&store) && !f.starts_with(&end_to_end))
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                .contains(&crate_name)
        })
        .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "{crate_name} used outside coordinator/src/store/ (go through `Store`): {offenders:?}"
    );
}
