//! The user an image task runs as: Docker's `--user` (`""`, `uid`,
//! `uid:gid`, `name`, `name:group`) resolved against the image's
//! `/etc/passwd` and `/etc/group` with runc's rules (those Docker uses):
//!
//! - the user is looked up in `passwd` by name, or by uid when numeric
//!   (`""` looks up uid 0); the first match gives uid, primary gid and
//!   home. A name with no entry is an error; a number with no entry is used
//!   as is (gid 0, home `/`);
//! - an explicit group is looked up in `group` by name, or by gid when
//!   numeric, and replaces the primary gid (a name with no entry is an
//!   error, a number with no entry is used as is); then there are no
//!   supplementary groups;
//! - without an explicit group, the supplementary groups are those of
//!   `group` that list the user's name as a member.
//!
//! Pure text processing: the files are read by the caller.

/// The ids a task's process gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`setgroups`), possibly empty.
    pub groups: Vec<u32>,
    /// The home directory (for `HOME` when the environment has none).
    pub home: String,
}

/// One `passwd` entry (the fields we use).
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One `group` entry.
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// Parses `name:pw:uid:gid:gecos:home:shell` lines; malformed ones are
/// skipped (as runc does).
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = line.split(':').collect();
        Some(PasswdEntry {
            name: f.first()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

/// Parses `name:pw:gid:member,member` lines; malformed ones are skipped.
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let f: Vec<&str> = line.split(':').collect();
        Some(GroupEntry {
            name: f.first()?,
            gid: f.get(2)?.parse().ok()?,
            members: f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    })
}

/// Resolves `spec` (see the module docs) against the content of the
/// image's `/etc/passwd` and `/etc/group` (empty if the image has none).
/// Errors read as Docker's: `unable to find user app: no matching entries
/// in passwd file`.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<ExecUser, String> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, g),
        None => (spec, ""),
    };
    let uid_num: Option<u32> = user_arg.parse().ok();
    let gid_num: Option<u32> = group_arg.parse().ok();
    let mut out = ExecUser {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        home: "/".to_string(),
    };
    let found = passwd_entries(passwd).find(|e| match (user_arg, uid_num) {
        ("", _) => e.uid == 0,
        (_, Some(n)) => e.uid == n,
        (name, None) => e.name == name,
    });
    let mut name = None;
    match found {
        Some(e) => {
            out.uid = e.uid;
            out.gid = e.gid;
            if !e.home.is_empty() {
                out.home = e.home.to_string();
            }
            name = Some(e.name);
        }
        None if user_arg.is_empty() => {}
        None => match uid_num {
            Some(n) => out.uid = n,
            None => {
                return Err(format!(
                    "unable to find user {user_arg}: no matching entries in passwd file"
                ))
            }
        },
    }
    if !group_arg.is_empty() {
        let g = group_entries(group).find(|g| match gid_num {
            Some(n) => g.gid == n,
            None => g.name == group_arg,
        });
        out.gid = match (g, gid_num) {
            (Some(g), _) => g.gid,
            (None, Some(n)) => n,
            (None, None) => {
                return Err(format!(
                    "unable to find group {group_arg}: no matching entries in group file"
                ))
            }
        };
    } else if let Some(name) = name {
        out.groups = group_entries(group)
            .filter(|g| g.members.contains(&name))
            .map(|g| g.gid)
            .collect();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment\n\
                          daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
                          broken line\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
                         wheel:x:10:root,app\n\
                         staff:x:50:app\n\
                         app:x:1000:\n";

    fn r(spec: &str) -> Result<ExecUser, String> {
        resolve(spec, PASSWD, GROUP)
    }

    #[test]
    fn root_by_default() {
        let u = r("").expect("root");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
        assert_eq!(u.groups, vec![10]);
        // No passwd at all.
        let u = resolve("", "", "").expect("root");
        assert_eq!(
            (u.uid, u.gid, u.groups.len(), u.home.as_str()),
            (0, 0, 0, "/")
        );
    }

    #[test]
    fn names_and_numbers() {
        let u = r("app").expect("app");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1000, "/home/app"));
        assert_eq!(u.groups, vec![10, 50]);
        assert_eq!(r("1000").expect("1000"), u);
        let u = r("app:staff").expect("app:staff");
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert!(u.groups.is_empty());
        let u = r("app:0").expect("app:0");
        assert_eq!((u.uid, u.gid), (1000, 0));
        // Unknown numbers are used as they are.
        let u = r("4242:4343").expect("numeric");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 4343, "/"));
        assert!(u.groups.is_empty());
        let u = r("4242").expect("numeric");
        assert_eq!((u.uid, u.gid), (4242, 0));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            r("nobody").err().as_deref(),
            Some("unable to find user nobody: no matching entries in passwd file")
        );
        assert_eq!(
            r("app:nogroup").err().as_deref(),
            Some("unable to find group nogroup: no matching entries in group file")
        );
    }
}
