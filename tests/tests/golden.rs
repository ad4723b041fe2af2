//! Every reference image reads through the library exactly as its
//! manifest says: every PFS, every path, type, mode, owner, mtime, size,
//! content hash and symlink target.

use hammer2::pfs::{pfs_list, Pfs};
use tests::*;

#[test]
fn every_fixture_matches_its_manifest() {
    let names = fixture_names();
    assert!(
        names.len() >= 9,
        "expected the nine reference images, found {names:?}"
    );
    for name in names {
        let vol =
            open_volume(&fixture_image(&name)).unwrap_or_else(|e| panic!("{name}: open: {e}"));
        let want = manifest(&name);
        let labels: Vec<String> = pfs_list(&vol)
            .unwrap()
            .into_iter()
            .map(|p| p.label)
            .collect();
        for (label, tree) in &want {
            assert!(
                labels.contains(label),
                "{name}: PFS {label} not in {labels:?}"
            );
            let pfs = Pfs::open(vol.clone(), label).unwrap();
            let have = describe_pfs(&pfs).unwrap_or_else(|e| panic!("{name}@{label}: {e}"));
            let diffs = diff_manifest(tree, &have);
            assert!(
                diffs.is_empty(),
                "{name}@{label}: {} differences:\n{}",
                diffs.len(),
                diffs.join("\n")
            );
            eprintln!("{name}@{label}: {} entries match", tree.len());
        }
    }
}

#[test]
fn every_fixture_reads_the_same_through_the_buffer_cache() {
    use bufcache::{BlockDevice, BufCache, CachedDevice, FileDevice};
    use std::sync::Arc;
    for name in fixture_names() {
        let file: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open(&fixture_image(&name), false).unwrap());
        // A small budget, so reading a PFS evicts and re-reads buffers.
        let dev: Arc<dyn BlockDevice> =
            Arc::new(CachedDevice::new(BufCache::open(file, 4 << 20).unwrap()));
        let vol = Arc::new(hammer2::Volume::open(dev).unwrap());
        for (label, tree) in &manifest(&name) {
            let pfs = Pfs::open(vol.clone(), label).unwrap();
            let have = describe_pfs(&pfs).unwrap_or_else(|e| panic!("{name}@{label}: {e}"));
            let diffs = diff_manifest(tree, &have);
            assert!(diffs.is_empty(), "{name}@{label}: {}", diffs.join("\n"));
        }
    }
}
