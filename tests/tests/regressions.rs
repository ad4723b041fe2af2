//! Focused regression tests for library bugs the crash-consistency
//! suite and the fault simulation found (tests/src/ace.rs, sim.rs).

use hammer2::disk::ObjType;
use hammer2::mount::{SetAttr, ROOT_INUM};
use hammer2::Error;
use tests::{new_fs, open, T0};

/// A size change is for regular files only (DragonFly's setattr:
/// EINVAL): truncating a symlink once rewrote its target.
#[test]
fn setattr_size_refuses_non_files() {
    let dev = new_fs(1);
    let mut m = open(&dev);
    let l = m
        .symlink("DATA", ROOT_INUM, b"ln", b"target", 0, 0, T0)
        .unwrap();
    let f = m
        .create(
            "DATA",
            ROOT_INUM,
            b"fifo",
            ObjType::Fifo,
            0o644,
            0,
            0,
            (0, 0),
            T0,
        )
        .unwrap();
    let d = m.mkdir("DATA", ROOT_INUM, b"d", 0o755, 0, 0, T0).unwrap();
    let size = SetAttr {
        size: Some(1),
        ..SetAttr::default()
    };
    assert!(matches!(
        m.setattr("DATA", l, size, T0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        m.setattr("DATA", f, size, T0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        m.setattr("DATA", d, size, T0),
        Err(Error::IsDir { .. })
    ));
    m.flush().unwrap();
    let mut m = open(&dev);
    assert_eq!(m.readlink("DATA", l).unwrap(), b"target");
}
