//! Whether the service's user may read a file or write a directory, judged by owner, group and mode bits along
//! the path: for `sudo relay check`, which runs as root and can read everything, while the unit runs as
//! `User=relay` (a secret only root may read passed the check, then stopped the service); and for `relay status`,
//! which asks it of the running daemon's own credentials.
//!
//! ACLs are not looked at, either way: a file opened to the user by an ACL alone is said unreadable, and one an
//! ACL closes to it is not said.
//! Users come from `/etc/passwd` and `/etc/group`, where `systemd-sysusers` puts system users; one known only to
//! another NSS source (LDAP) is not found, and nothing is said.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The user the shipped unit runs relay as (`User=relay`); `RELAY_SERVICE_USER` names another (a drop-in's
/// `User=`).
pub const SERVICE_USER: &str = "relay";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    uid: u32,
    /// The primary group and every group listing the user.
    gids: Vec<u32>,
    /// Whose rights these are: the daemon's own (read off the process) or the service's (from its name).
    running: bool,
}

impl User {
    /// The user `name` from the system's files, if it is there.
    pub fn lookup(name: &str) -> Option<User> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Self::from_tables(name, &passwd, &group)
    }

    /// The credentials a running process opens files with (`/proc/PID/status`: its filesystem uid, gid and
    /// supplementary groups), named from `/etc/passwd` when it is there. For `relay status`, which asks what the
    /// daemon itself can write, whatever user it was started as.
    pub fn of_process(pid: u32) -> Option<User> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        Self::from_status(&status, &passwd)
    }

    fn from_status(status: &str, passwd: &str) -> Option<User> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
        };
        // Real, effective, saved, filesystem: the last is what the kernel checks a path against.
        let uid: u32 = field("Uid:")?.get(3)?.parse().ok()?;
        let gid: u32 = field("Gid:")?.get(3)?.parse().ok()?;
        let mut gids = vec![gid];
        gids.extend(
            field("Groups:")
                .unwrap_or_default()
                .iter()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
        let name = passwd
            .lines()
            .find_map(|line| {
                let mut f = line.split(':');
                let name = f.next()?;
                let _password = f.next()?;
                (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
            .unwrap_or_else(|| format!("uid {uid}"));
        Some(User {
            name,
            uid,
            gids,
            running: true,
        })
    }

    fn from_tables(name: &str, passwd: &str, group: &str) -> Option<User> {
        let (uid, gid) = passwd.lines().find_map(|line| {
            let mut f = line.split(':');
            (f.next()? == name).then_some(())?;
            let _password = f.next()?;
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })?;
        let mut gids = vec![gid];
        gids.extend(group.lines().filter_map(|line| {
            let mut f = line.split(':');
            let _name = f.next()?;
            let _password = f.next()?;
            let id: u32 = f.next()?.parse().ok()?;
            f.next()?.split(',').any(|m| m == name).then_some(id)
        }));
        Some(User {
            name: name.to_string(),
            uid,
            gids,
            running: false,
        })
    }

    /// `Err(why)` when the user cannot read the file at `path` (a directory on the way it may not search, or the
    /// file's own bits). A path that cannot be looked at is not judged (`Ok`): the check says what else is wrong.
    pub fn may_read(&self, path: &Path) -> Result<(), String> {
        self.may(path, 0o4, "read")
    }

    /// `Err(why)` when the user cannot make files in the directory at `path`. One that does not exist yet is not
    /// judged: systemd's `StateDirectory=` makes it, owned by the user, when the service starts.
    pub fn may_write_dir(&self, path: &Path) -> Result<(), String> {
        self.may(path, 0o3, "write to")
    }

    /// The directories on the way to `path` (as written and as resolved) searchable, then `want` of its target.
    fn may(&self, path: &Path, want: u32, what: &str) -> Result<(), String> {
        let Ok(real) = std::fs::canonicalize(path) else {
            return Ok(());
        };
        self.may_reach(path)?;
        self.may_reach(&real)?;
        self.allowed(&real, want, what)
    }

    /// Every directory above `path` searchable by the user. Asked of the path as written and of its target: the
    /// directories that hold a link are walked through too (certbot's `live/`, 0700, holds the links to
    /// `archive/`'s keys). A link within a link's target is not followed.
    fn may_reach(&self, path: &Path) -> Result<(), String> {
        for dir in path.ancestors().skip(1) {
            self.allowed(dir, 0o1, "reach anything in")?;
        }
        Ok(())
    }

    fn who(&self) -> String {
        if self.running {
            format!("the daemon's user {}", self.name)
        } else {
            format!("the service's user {}", self.name)
        }
    }

    /// Whether the user's class of `path` (owner, group, others) has every bit of `want` (r=4, w=2, x=1).
    fn allowed(&self, path: &Path, want: u32, what: &str) -> Result<(), String> {
        let Ok(m) = std::fs::metadata(path) else {
            return Ok(());
        };
        if self.uid == 0 {
            return Ok(());
        }
        let mode = m.mode();
        let bits = if m.uid() == self.uid {
            mode >> 6
        } else if self.gids.contains(&m.gid()) {
            mode >> 3
        } else {
            mode
        };
        if bits & want == want {
            return Ok(());
        }
        Err(format!(
            "{} cannot {what} {} (owner uid {}, group gid {}, mode {:04o})",
            self.who(),
            path.display(),
            m.uid(),
            m.gid(),
            mode & 0o7777
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nrelay:x:998:997::/var/lib/relay:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nssl-cert:x:110:relay,www-data\nrelay:x:997:\nadm:x:4:syslog\n";

    #[test]
    fn a_user_is_found_with_its_groups() {
        let user = User::from_tables("relay", PASSWD, GROUP);
        assert_eq!(
            user,
            Some(User {
                name: "relay".into(),
                uid: 998,
                gids: vec![997, 110],
                running: false,
            })
        );
        assert_eq!(User::from_tables("nobody", PASSWD, GROUP), None);
        assert_eq!(User::from_tables("relay", "relay:x:oops:1\n", ""), None);
    }

    #[test]
    fn a_process_is_judged_by_its_filesystem_ids_and_groups() {
        let status =
            "Name:\trelay\nUid:\t0\t998\t998\t998\nGid:\t997\t997\t997\t997\nGroups:\t110 4 \n";
        assert_eq!(
            User::from_status(status, PASSWD),
            Some(User {
                name: "relay".into(),
                uid: 998,
                gids: vec![997, 110, 4],
                running: true,
            })
        );
        let unnamed = "Uid:\t5000\t5000\t5000\t5000\nGid:\t5000\t5000\t5000\t5000\nGroups:\n";
        assert_eq!(User::from_status(unnamed, PASSWD).unwrap().name, "uid 5000");
        assert_eq!(User::from_status("Uid:\t1\n", PASSWD), None);
    }
}
