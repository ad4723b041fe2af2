//! Mount options, as `mount -t fuse.hammer2`, `/etc/fstab` and the command
//! line pass them: `-o opt[,opt]...`, possibly several times; the last of
//! two opposites wins, as with mount(8). Unknown options are an error
//! (a warning with `-s`, mount(8)'s "sloppy" flag), so a typo in fstab
//! does not silently mount with different semantics.

use crate::atime::{self, Mode};
use fuser::{Config, SessionACL};
use nix::mount::MsFlags;
use std::path::PathBuf;
use std::time::Duration;

/// Whether a mount with neither `ro` nor `rw` is read-write: yes, as
/// with other filesystems, now that the freemap allocator is in (it was
/// `false` before; this is the one line that decides).
pub const READ_WRITE_BY_DEFAULT: bool = true;

/// `sync_interval=` default: seconds between background flushes of a
/// read-write mount.
pub const SYNC_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

/// `autobulkfree` default: a read-write mount runs bulkfree by itself
/// when less than this share of the volume (percent) is free.
pub const AUTOBULKFREE_DEFAULT: u8 = 10;

/// The smallest `cache_size=` (the page layer's floor).
pub const CACHE_SIZE_MIN: u64 = 4 << 20;

/// What the options ask for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Who may use the mount besides the user who mounted it.
    pub access: Access,
    /// Let the kernel check permissions from the mode, uid and gid.
    pub default_permissions: bool,
    pub suid: bool,
    pub dev: bool,
    pub exec: bool,
    /// `relatime` (the default), `strictatime`, `noatime`, `nodiratime`:
    /// when reads update access times (read-write; see `atime`).
    pub atime: atime::Policy,
    /// `sync`, `async` or `dirsync`, passed through (nothing is written).
    pub sync: Option<Sync>,
    /// The source name shown in /proc/mounts (default: the image path).
    pub fsname: Option<String>,
    /// `rw`: mount through the write path.
    pub read_write: bool,
    /// `sync_interval=SECONDS`: how often a read-write mount flushes
    /// when something is dirty; `None` (`sync_interval=0`) flushes only
    /// on sync and at unmount (fsync commits its file's group alone;
    /// past the dirty share the data is laundered, not committed).
    pub sync_interval: Option<Duration>,
    /// `cache_size=SIZE`: the mount's memory budget, rounded down to
    /// 2 MiB (`None`: `mount::default_cache_size`). A read-only mount's
    /// buffer cache gets all of it; a read-write mount shares it with
    /// the file data waiting for a flush and decoded metadata
    /// (`mount::Budget`).
    pub cache_size: Option<u64>,
    /// `writeback_cache`: let the kernel keep written pages and send
    /// them later in large writes (FUSE_WRITEBACK_CACHE). Off by
    /// default: see `vnops::Hammer2Fs::lseek`.
    pub writeback_cache: bool,
    /// `snapdir`: the volume's snapshots, read-only, under `.snapshot`
    /// at the mount root (hidden: looked up, not listed).
    pub snapdir: bool,
    /// `log_writes=FILE`: log every write, barrier and mark reaching the
    /// image to FILE (`bufcache::logwrites`), for `hammer2 replay-log`.
    pub log_writes: Option<PathBuf>,
    /// `autobulkfree[=PERCENT]` (the default) / `noautobulkfree`: run
    /// bulkfree in the background when less than PERCENT of the volume
    /// is free, and before failing a write with ENOSPC (`rw::Reclaim`).
    pub autobulkfree: Option<u8>,
    /// `blkdev` (the default) / `noblkdev`: mount read-write as fuseblk,
    /// over the block device named or a loop device over the image file,
    /// so that sync(2) and syncfs(2) reach the daemon and umount waits
    /// for its last flush; `noblkdev` mounts plain FUSE (see `mount`).
    pub blkdev: bool,
    /// `remount`: change the mount already on the mountpoint
    /// (`remount::remount`), as `mount -o remount,...` asks.
    pub remount: bool,
    /// The options named, in order (a remount warns about those it cannot
    /// change).
    pub named: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    Sync,
    Async,
    DirSync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only the user who mounted it (FUSE's default).
    Owner,
    /// `allow_root`: that user and root.
    RootAndOwner,
    /// `allow_other`: everyone, subject to permission checks.
    All,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            access: Access::Owner,
            default_permissions: false,
            // FUSE's defaults: nosuid and nodev, but exec.
            suid: false,
            dev: false,
            exec: true,
            atime: atime::Policy::default(),
            sync: None,
            fsname: None,
            read_write: READ_WRITE_BY_DEFAULT,
            sync_interval: Some(SYNC_INTERVAL_DEFAULT),
            cache_size: None,
            writeback_cache: false,
            snapdir: false,
            log_writes: None,
            autobulkfree: Some(AUTOBULKFREE_DEFAULT),
            blkdev: true,
            remount: false,
            named: Vec::new(),
        }
    }
}

impl Options {
    /// The defaults when mount(8) runs this program as its helper: it
    /// drops `suid` and `dev` (and `exec`) from the list it passes, as
    /// the VFS defaults they are, so the absence of `nosuid` and `nodev`
    /// means them, as mount.fuse takes it for FUSE filesystems (fuse2fs
    /// mounted with `mount -t fuse.fuse2fs`).
    pub fn mount8_defaults() -> Options {
        Options {
            suid: true,
            dev: true,
            ..Options::default()
        }
    }

    /// The options named that only a new mount can set (a remount
    /// leaves them as they are).
    pub fn daemon_options(&self) -> Vec<&str> {
        self.named
            .iter()
            .map(String::as_str)
            .filter(|o| {
                let key = o.split('=').next().unwrap_or(o);
                [
                    "sync_interval",
                    "cache_size",
                    "writeback_cache",
                    "nowriteback_cache",
                    "autobulkfree",
                    "noautobulkfree",
                    "log_writes",
                    "snapdir",
                    "blkdev",
                    "noblkdev",
                    "allow_other",
                    "allow_root",
                    "default_permissions",
                    "fsname",
                ]
                .contains(&key)
            })
            .collect()
    }
}

/// Options accepted and ignored: mount(8) and fstab bookkeeping that
/// reaches helpers; `norelatime`, which leaves Linux's default
/// (relatime) as it is; `lazytime`, what access times always are here
/// (kept in memory until a flush happens anyway).
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "norelatime",
    "lazytime",
    "nolazytime",
];

/// Parse every `-o` argument. `sloppy` (mount's `-s`) turns unknown
/// options into warnings. Errors are usage errors: the message says what
/// to change.
pub fn parse<S: AsRef<str>>(args: &[S], sloppy: bool) -> Result<Options, String> {
    parse_from(Options::default(), args, sloppy)
}

/// `parse` over other defaults (`Options::mount8_defaults`).
pub fn parse_from<S: AsRef<str>>(
    defaults: Options,
    args: &[S],
    sloppy: bool,
) -> Result<Options, String> {
    let mut o = defaults;
    for opt in args
        .iter()
        .flat_map(|a| a.as_ref().split(','))
        .filter(|s| !s.is_empty())
    {
        o.named.push(opt.to_string());
        match opt {
            "remount" => o.remount = true,
            "ro" => o.read_write = false,
            "rw" => o.read_write = true,
            "allow_other" => o.access = Access::All,
            "allow_root" => o.access = Access::RootAndOwner,
            "default_permissions" => o.default_permissions = true,
            "suid" => o.suid = true,
            "nosuid" => o.suid = false,
            "dev" => o.dev = true,
            "nodev" => o.dev = false,
            "exec" => o.exec = true,
            "noexec" => o.exec = false,
            // As the kernel takes them: `atime` and `nostrictatime` undo
            // `noatime` and `strictatime`, back to relatime.
            "atime" if o.atime.mode == Mode::Never => o.atime.mode = Mode::Relatime,
            "atime" => {}
            "noatime" => o.atime.mode = Mode::Never,
            "relatime" => o.atime.mode = Mode::Relatime,
            "strictatime" => o.atime.mode = Mode::Strict,
            "nostrictatime" if o.atime.mode == Mode::Strict => o.atime.mode = Mode::Relatime,
            "nostrictatime" => {}
            "diratime" => o.atime.dirs = true,
            "nodiratime" => o.atime.dirs = false,
            "writeback_cache" => o.writeback_cache = true,
            "snapdir" => o.snapdir = true,
            "autobulkfree" => o.autobulkfree = Some(AUTOBULKFREE_DEFAULT),
            "noautobulkfree" => o.autobulkfree = None,
            "blkdev" => o.blkdev = true,
            "noblkdev" => o.blkdev = false,
            "nowriteback_cache" => o.writeback_cache = false,
            "sync" => o.sync = Some(Sync::Sync),
            "async" => o.sync = Some(Sync::Async),
            "dirsync" => o.sync = Some(Sync::DirSync),
            "auto_unmount" => {
                return Err(
                    "auto_unmount is not supported: fuser implements it only through \
                     the setuid fusermount helper, which this mount does not use; \
                     mount.hammer2 unmounts on SIGTERM, SIGINT and SIGHUP"
                        .to_string(),
                )
            }
            _ if IGNORED.contains(&opt)
                || opt.starts_with("x-")
                || opt.starts_with("comment=")
                || opt.starts_with("user_id=")
                || opt.starts_with("group_id=")
                || opt.starts_with("blksize=") =>
            {
                log::debug!("mount option {opt} ignored");
            }
            _ if opt.starts_with("fsname=") => {
                o.fsname = Some(opt["fsname=".len()..].to_string());
            }
            _ if opt.starts_with("sync_interval=") => {
                let v = &opt["sync_interval=".len()..];
                let secs: u64 = v.parse().ok().filter(|&s| s <= 86400).ok_or_else(|| {
                    format!("sync_interval={v}: expected whole seconds, 0 to 86400")
                })?;
                o.sync_interval = (secs > 0).then(|| Duration::from_secs(secs));
            }
            _ if opt.starts_with("cache_size=") => {
                let v = &opt["cache_size=".len()..];
                let bytes = bufcache::parse_cache_size(v)
                    .map(|b| b & !((2 << 20) - 1))
                    .filter(|&b| b >= CACHE_SIZE_MIN)
                    .ok_or_else(|| {
                        format!(
                            "cache_size={v}: expected a size with an optional K, M or G \
                             suffix, at least 4M"
                        )
                    })?;
                o.cache_size = Some(bytes);
            }
            _ if opt.starts_with("autobulkfree=") => {
                let v = &opt["autobulkfree=".len()..];
                let pct: u8 = v
                    .trim_end_matches('%')
                    .parse()
                    .ok()
                    .filter(|&p| (1..=90).contains(&p))
                    .ok_or_else(|| {
                        format!("autobulkfree={v}: expected a percentage of free space, 1 to 90")
                    })?;
                o.autobulkfree = Some(pct);
            }
            _ if opt.starts_with("log_writes=") => {
                let v = &opt["log_writes=".len()..];
                if v.is_empty() {
                    return Err("log_writes=FILE: name the file to log writes to".to_string());
                }
                o.log_writes = Some(PathBuf::from(v));
            }
            _ if sloppy => log::warn!("unknown mount option {opt} ignored (-s)"),
            _ => return Err(format!("unknown mount option {opt:?}")),
        }
    }
    Ok(o)
}

impl Options {
    /// mount(2) flags: read-only unless `rw`; nosuid and nodev unless
    /// asked otherwise (FUSE's defaults).
    pub fn ms_flags(&self) -> MsFlags {
        let mut f = MsFlags::empty();
        let pairs = [
            (!self.read_write, MsFlags::MS_RDONLY),
            (!self.suid, MsFlags::MS_NOSUID),
            (!self.dev, MsFlags::MS_NODEV),
            (!self.exec, MsFlags::MS_NOEXEC),
            (self.atime.mode == Mode::Never, MsFlags::MS_NOATIME),
            (self.atime.mode == Mode::Strict, MsFlags::MS_STRICTATIME),
            (!self.atime.dirs, MsFlags::MS_NODIRATIME),
            (self.sync == Some(Sync::Sync), MsFlags::MS_SYNCHRONOUS),
            (self.sync == Some(Sync::DirSync), MsFlags::MS_DIRSYNC),
        ];
        for (on, flag) in pairs {
            if on {
                f |= flag;
            }
        }
        f
    }

    /// The FUSE mount data: the /dev/fuse descriptor, the root's mode
    /// until the first getattr, the owner (whom the kernel lets in
    /// without `allow_other`), and the options the kernel enforces.
    pub fn kernel_data(&self, fd: i32, rootmode: u32, uid: u32, gid: u32) -> String {
        let mut data = format!("fd={fd},rootmode={rootmode:o},user_id={uid},group_id={gid}");
        if self.default_permissions {
            data.push_str(",default_permissions");
        }
        if self.access != Access::Owner {
            // allow_root is allow_other in the kernel; fuser turns away
            // everyone but root and the owner.
            data.push_str(",allow_other");
        }
        data
    }

    /// fuser's session settings: who may use it, and request threads.
    pub fn session_config(&self, n_threads: usize) -> (SessionACL, Config) {
        let acl = match self.access {
            Access::Owner => SessionACL::Owner,
            Access::RootAndOwner => SessionACL::RootAndOwner,
            Access::All => SessionACL::All,
        };
        let mut config = Config::default();
        config.acl = acl;
        config.n_threads = Some(n_threads.max(1));
        // One /dev/fuse descriptor per thread (Linux 4.5+).
        config.clone_fd = n_threads > 1;
        (acl, config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_owner_only() {
        let o = parse::<&str>(&[], false).unwrap();
        assert_eq!(o, Options::default());
        let ro = if READ_WRITE_BY_DEFAULT {
            MsFlags::empty()
        } else {
            MsFlags::MS_RDONLY
        };
        assert_eq!(o.ms_flags(), ro | MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(
            o.kernel_data(5, 0o40755, 0, 0),
            "fd=5,rootmode=40755,user_id=0,group_id=0"
        );
        let (acl, c) = o.session_config(2);
        assert_eq!(acl, SessionACL::Owner);
        assert!(c.clone_fd);
    }

    #[test]
    fn fstab_style_options() {
        let o = parse(
            &[
                "ro,allow_other,default_permissions",
                "noauto,nofail,x-systemd.automount",
            ],
            false,
        )
        .unwrap();
        assert_eq!(o.access, Access::All);
        assert!(o.default_permissions);
        assert!(o
            .kernel_data(3, 0o40700, 0, 0)
            .ends_with(",default_permissions,allow_other"));
        let (acl, c) = o.session_config(1);
        assert_eq!(acl, SessionACL::All);
        assert!(!c.clone_fd);
        let o = parse(&["allow_root,noexec,noatime,suid,ro"], false).unwrap();
        assert_eq!(o.session_config(1).0, SessionACL::RootAndOwner);
        assert!(o.kernel_data(3, 0o40700, 0, 0).ends_with(",allow_other"));
        assert_eq!(
            o.ms_flags(),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME
        );
    }

    #[test]
    fn the_last_of_ro_and_rw_wins() {
        let o = parse(&["rw"], false).unwrap();
        assert!(o.read_write);
        assert!(!o.ms_flags().contains(MsFlags::MS_RDONLY));
        assert!(parse(&["defaults,rw"], false).unwrap().read_write);
        assert!(!parse(&["rw,ro"], false).unwrap().read_write);
        assert_eq!(
            parse(&["defaults"], false).unwrap().read_write,
            READ_WRITE_BY_DEFAULT
        );
    }

    #[test]
    fn autobulkfree() {
        assert_eq!(parse::<&str>(&[], false).unwrap().autobulkfree, Some(10));
        assert_eq!(
            parse(&["noautobulkfree"], false).unwrap().autobulkfree,
            None
        );
        assert_eq!(
            parse(&["noautobulkfree,autobulkfree=25%"], false)
                .unwrap()
                .autobulkfree,
            Some(25)
        );
        assert_eq!(
            parse(&["autobulkfree=5,noautobulkfree,autobulkfree"], false)
                .unwrap()
                .autobulkfree,
            Some(10)
        );
        for bad in [
            "autobulkfree=0",
            "autobulkfree=95",
            "autobulkfree=x",
            "autobulkfree=",
        ] {
            let e = parse(&[bad], false).unwrap_err();
            assert!(e.contains("autobulkfree"), "{bad}: {e}");
        }
    }

    #[test]
    fn sync_interval_and_cache_size() {
        let o = parse::<&str>(&[], false).unwrap();
        assert_eq!(o.sync_interval, Some(SYNC_INTERVAL_DEFAULT));
        assert_eq!(o.cache_size, None);
        assert!(!o.writeback_cache);
        assert!(parse(&["writeback_cache"], false).unwrap().writeback_cache);
        assert!(!o.snapdir);
        assert!(parse(&["snapdir"], false).unwrap().snapdir);
        let o = parse(&["rw,sync_interval=30,cache_size=513M"], false).unwrap();
        assert_eq!(o.sync_interval, Some(Duration::from_secs(30)));
        assert_eq!(o.cache_size, Some(512 << 20));
        assert_eq!(
            parse(&["sync_interval=0"], false).unwrap().sync_interval,
            None
        );
        assert_eq!(
            parse(&["cache_size=4194304"], false).unwrap().cache_size,
            Some(4 << 20)
        );
        for bad in [
            "sync_interval=",
            "sync_interval=-1",
            "sync_interval=1.5",
            "sync_interval=86401",
            "cache_size=",
            "cache_size=3M",
            "cache_size=lots",
        ] {
            let e = parse(&[bad], false).unwrap_err();
            assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn log_writes_names_a_file() {
        assert_eq!(parse::<&str>(&[], false).unwrap().log_writes, None);
        let o = parse(&["rw,log_writes=/tmp/x.log,sync_interval=0"], false).unwrap();
        assert_eq!(o.log_writes, Some(PathBuf::from("/tmp/x.log")));
        assert_eq!(o.sync_interval, None);
        let e = parse(&["log_writes="], false).unwrap_err();
        assert!(e.contains("log_writes"), "{e}");
    }

    #[test]
    fn blkdev_is_the_default_and_noblkdev_turns_it_off() {
        assert!(parse::<&str>(&[], false).unwrap().blkdev);
        assert!(!parse(&["rw,noblkdev"], false).unwrap().blkdev);
        assert!(parse(&["noblkdev", "blkdev"], false).unwrap().blkdev);
    }

    #[test]
    fn unknown_options_are_errors_unless_sloppy() {
        let e = parse(&["ro,frobnicate"], false).unwrap_err();
        assert!(e.contains("frobnicate"), "{e}");
        assert!(parse(&["ro,frobnicate"], true).is_ok());
        let e = parse(&["auto_unmount"], false).unwrap_err();
        assert!(e.contains("auto_unmount"), "{e}");
    }

    #[test]
    fn atime_policies() {
        let p = |s: &str| parse(&[s], false).unwrap().atime;
        assert_eq!(
            parse::<&str>(&[], false).unwrap().atime,
            atime::Policy::default()
        );
        assert_eq!(p("noatime").mode, Mode::Never);
        assert_eq!(p("strictatime").mode, Mode::Strict);
        assert_eq!(p("noatime,relatime").mode, Mode::Relatime);
        assert_eq!(p("noatime,atime").mode, Mode::Relatime);
        assert_eq!(p("strictatime,atime").mode, Mode::Strict);
        assert_eq!(p("strictatime,nostrictatime").mode, Mode::Relatime);
        assert_eq!(p("strictatime,norelatime,lazytime").mode, Mode::Strict);
        assert!(!p("nodiratime").dirs);
        assert!(p("nodiratime,diratime").dirs);
        let o = parse(&["strictatime,nodiratime"], false).unwrap();
        assert!(o
            .ms_flags()
            .contains(MsFlags::MS_STRICTATIME | MsFlags::MS_NODIRATIME));
        assert!(!o.ms_flags().contains(MsFlags::MS_NOATIME));
    }

    #[test]
    fn last_of_two_opposites_wins() {
        let o = parse(&["nosuid,suid,noexec"], false).unwrap();
        assert!(o.suid);
        assert!(!o.exec);
        let o = parse(&["fsname=disk0"], false).unwrap();
        assert_eq!(o.fsname.as_deref(), Some("disk0"));
    }
}
