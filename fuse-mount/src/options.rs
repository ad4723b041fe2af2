//! Mount options, as `mount -t fuse.hammer2`, `/etc/fstab` and the command
//! line pass them: `-o opt[,opt]...`, possibly several times; the last of
//! two opposites wins, as with mount(8). Unknown options are an error
//! (a warning with `-s`, mount(8)'s "sloppy" flag), so a typo in fstab
//! does not silently mount with different semantics.

use fuser::{Config, MountOption, SessionACL};

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
    pub atime: bool,
    /// `sync`, `async` or `dirsync`, passed through (nothing is written).
    pub sync: Option<MountOption>,
    /// The source name shown in /proc/mounts (default: the image path).
    pub fsname: Option<String>,
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
            atime: true,
            sync: None,
            fsname: None,
        }
    }
}

/// Options accepted and ignored: mount(8) and fstab bookkeeping that
/// reaches helpers, and atime policies (a read-only mount updates no
/// times).
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
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
];

/// Parse every `-o` argument. `sloppy` (mount's `-s`) turns unknown
/// options into warnings. Errors are usage errors: the message says what
/// to change.
pub fn parse<S: AsRef<str>>(args: &[S], sloppy: bool) -> Result<Options, String> {
    let mut o = Options::default();
    let mut read_write = false;
    for opt in args
        .iter()
        .flat_map(|a| a.as_ref().split(','))
        .filter(|s| !s.is_empty())
    {
        match opt {
            "ro" => read_write = false,
            "rw" => read_write = true,
            "allow_other" => o.access = Access::All,
            "allow_root" => o.access = Access::RootAndOwner,
            "default_permissions" => o.default_permissions = true,
            "suid" => o.suid = true,
            "nosuid" => o.suid = false,
            "dev" => o.dev = true,
            "nodev" => o.dev = false,
            "exec" => o.exec = true,
            "noexec" => o.exec = false,
            "atime" => o.atime = true,
            "noatime" => o.atime = false,
            "sync" => o.sync = Some(MountOption::Sync),
            "async" => o.sync = Some(MountOption::Async),
            "dirsync" => o.sync = Some(MountOption::DirSync),
            "auto_unmount" => {
                return Err(
                    "auto_unmount is not supported: fuser implements it only through \
                     the setuid fusermount helper, which this mount does not use; \
                     mount.hammer2 unmounts on SIGTERM, SIGINT and SIGHUP"
                        .to_string(),
                )
            }
            _ if IGNORED.contains(&opt) || opt.starts_with("x-") || opt.starts_with("comment=") => {
                log::debug!("mount option {opt} ignored");
            }
            _ if opt.starts_with("fsname=") => {
                o.fsname = Some(opt["fsname=".len()..].to_string());
            }
            _ if sloppy => log::warn!("unknown mount option {opt} ignored (-s)"),
            _ => return Err(format!("unknown mount option {opt:?}")),
        }
    }
    if read_write {
        return Err("read-write mounts are not supported yet: mount with -o ro".to_string());
    }
    Ok(o)
}

impl Options {
    /// The fuser configuration: always read-only; the source shown in
    /// /proc/mounts is `fsname` (the image by default) and the type
    /// `fuse.hammer2`.
    pub fn fuser_config(&self, source: &str, n_threads: usize) -> Config {
        let mut mount_options = vec![
            MountOption::RO,
            MountOption::FSName(self.fsname.clone().unwrap_or_else(|| source.to_string())),
            // Passed to the kernel as is; fuser's own Subtype option only
            // reaches fusermount.
            MountOption::CUSTOM("subtype=hammer2".to_string()),
        ];
        if self.default_permissions {
            mount_options.push(MountOption::DefaultPermissions);
        }
        let flags = [
            (self.suid, MountOption::Suid, MountOption::NoSuid),
            (self.dev, MountOption::Dev, MountOption::NoDev),
            (self.exec, MountOption::Exec, MountOption::NoExec),
            (self.atime, MountOption::Atime, MountOption::NoAtime),
        ];
        for (on, yes, no) in flags {
            mount_options.push(if on { yes } else { no });
        }
        mount_options.extend(self.sync.clone());
        let mut config = Config::default();
        config.mount_options = mount_options;
        config.acl = match self.access {
            Access::Owner => SessionACL::Owner,
            Access::RootAndOwner => SessionACL::RootAndOwner,
            Access::All => SessionACL::All,
        };
        config.n_threads = Some(n_threads.max(1));
        // One /dev/fuse descriptor per thread (Linux 4.5+).
        config.clone_fd = n_threads > 1;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_read_only_owner_only() {
        let o = parse::<&str>(&[], false).unwrap();
        assert_eq!(o, Options::default());
        let c = o.fuser_config("img", 2);
        assert!(c.mount_options.contains(&MountOption::RO));
        assert!(c.mount_options.contains(&MountOption::NoSuid));
        assert!(c.mount_options.contains(&MountOption::NoDev));
        assert_eq!(c.acl, SessionACL::Owner);
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
        let c = o.fuser_config("img", 1);
        assert!(c.mount_options.contains(&MountOption::DefaultPermissions));
        assert_eq!(c.acl, SessionACL::All);
        assert!(!c.clone_fd);
    }

    #[test]
    fn read_write_is_refused_unless_ro_comes_last() {
        let e = parse(&["rw"], false).unwrap_err();
        assert!(e.contains("read-write mounts are not supported yet"), "{e}");
        assert!(parse(&["defaults,rw"], false).is_err());
        assert!(parse(&["rw,ro"], false).is_ok());
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
    fn last_of_two_opposites_wins() {
        let o = parse(&["nosuid,suid,noexec"], false).unwrap();
        assert!(o.suid);
        assert!(!o.exec);
        let o = parse(&["fsname=disk0"], false).unwrap();
        assert_eq!(o.fsname.as_deref(), Some("disk0"));
    }
}
