//! The man pages in `man/` are generated from the clap definitions; this
//! test fails when they are stale. Regenerate with
//! `VMSHIFT_UPDATE_MAN=1 cargo test -p vmshift --test man_pages`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn read_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn man_pages_match_the_cli_definitions() {
    let man_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../man");
    let fresh = tempfile::tempdir().unwrap();
    clap_mangen::generate_to(vmshift::command(), fresh.path()).unwrap();
    let generated = read_dir(fresh.path());
    assert!(
        generated.contains_key("vmshift-convert.1"),
        "{:?}",
        generated.keys()
    );
    if std::env::var_os("VMSHIFT_UPDATE_MAN").is_some() {
        std::fs::create_dir_all(&man_dir).unwrap();
        for old in read_dir(&man_dir).keys() {
            std::fs::remove_file(man_dir.join(old)).unwrap();
        }
        for (name, bytes) in &generated {
            std::fs::write(man_dir.join(name), bytes).unwrap();
        }
    }
    let committed = read_dir(&man_dir);
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "man/ holds other pages than the CLI defines; run VMSHIFT_UPDATE_MAN=1 cargo test -p vmshift --test man_pages"
    );
    for (name, bytes) in &generated {
        assert!(
            committed.get(name) == Some(bytes),
            "man/{name} is stale; run VMSHIFT_UPDATE_MAN=1 cargo test -p vmshift --test man_pages"
        );
    }
}
