//! Resolves a container user ("name", "uid", "name:group", "uid:gid") against the
//! image's `/etc/passwd` and `/etc/group`, as runc-style runtimes do.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Groups that list the user as a member (besides its primary group).
    pub additional_gids: Vec<u32>,
    pub home: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    /// More supplementary groups than setgroups(2) takes; runc refuses these too.
    #[error(
        "user {user:?} is a member of more than {NGROUPS_MAX} groups in the image's \
         /etc/group, the kernel's limit (NGROUPS_MAX); remove memberships from the image \
         or set supplementalGroupsPolicy: Strict"
    )]
    TooManyGroups { user: String },
}

/// Most supplementary groups a Linux process can have.
pub const NGROUPS_MAX: usize = 65536;

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

/// (name, gid, members) per group line; members are read only when asked for.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, &str)> {
    text.lines().filter_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let mut f = line.splitn(4, ':');
        let (name, _, gid) = (f.next()?, f.next()?, f.next()?);
        Some((name, gid.parse().ok()?, f.next().unwrap_or("")))
    })
}

fn is_member(members: &str, name: &str) -> bool {
    members.split(',').any(|m| m == name)
}

/// Resolves `user` ("" means root). A numeric uid missing from passwd is allowed
/// (gid 0 then), a name missing is an error, as in the OCI image spec.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    resolve_with(user, passwd, group, true)
}

/// As [`resolve`], but without the image's group memberships (supplementary
/// groups policy Strict): `/etc/group` is read only for a named primary group,
/// so an image with more memberships than the kernel takes still runs.
pub fn resolve_without_memberships(
    user: &str,
    passwd: &str,
    group: &str,
) -> Result<ResolvedUser, UserError> {
    resolve_with(user, passwd, group, false)
}

fn resolve_with(
    user: &str,
    passwd: &str,
    group: &str,
    memberships: bool,
) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        None => user_part.parse().unwrap_or(0),
    };
    let mut gid = entry.as_ref().map(|e| e.gid).unwrap_or(0);
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        };
    }
    // Supplementary groups come from membership only when no group was forced.
    // One pass, a set for duplicates (a list scan was quadratic: 200,000 groups took
    // 35 s), and no further than the kernel would take.
    let mut additional_gids = Vec::new();
    if memberships && group_part.is_none() {
        if let Some(name) = entry.as_ref().map(|e| e.name) {
            let mut seen = std::collections::HashSet::new();
            for (_, g, members) in group_entries(group) {
                if g != gid && is_member(members, name) && seen.insert(g) {
                    if additional_gids.len() == NGROUPS_MAX {
                        return Err(UserError::TooManyGroups {
                            user: name.to_owned(),
                        });
                    }
                    additional_gids.push(g);
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: entry.map(|e| e.home.to_owned()).filter(|h| !h.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # comment\n\
                          www:x:33:33:www:/var/www:/bin/false\n\
                          app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:app\nstaff:x:50:app,www\napp:x:1000:\n";

    #[test]
    fn names_and_numbers() {
        let r = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 1000));
        assert_eq!(r.additional_gids, vec![33, 50]);
        assert_eq!(r.home.as_deref(), Some("/home/app"));
        let r = resolve("33", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (33, 33));
        assert_eq!(r.additional_gids, vec![50]);
        let r = resolve("", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        // Unknown numeric uid: allowed, gid 0.
        let r = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.home), (4242, 0, None));
    }

    fn group_file(groups: usize, user: &str) -> String {
        (0..groups)
            .map(|i| format!("g{i}:x:{}:other,{user}\n", 10_000 + i))
            .collect()
    }

    #[test]
    fn many_groups_resolve_in_one_pass() {
        let group = group_file(50_000, "app") + "dup:x:10000:app\n";
        let t = std::time::Instant::now();
        let r = resolve("app", PASSWD, &group).unwrap();
        assert_eq!(r.additional_gids.len(), 50_000, "duplicates once");
        assert_eq!(r.additional_gids[..2], [10_000, 10_001], "file order");
        // Linear: milliseconds even in a debug build (the quadratic scan took ~2 s).
        assert!(
            t.elapsed() < std::time::Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn past_the_kernel_limit_is_refused() {
        let t = std::time::Instant::now();
        let err = resolve("app", PASSWD, &group_file(200_000, "app")).unwrap_err();
        assert_eq!(err, UserError::TooManyGroups { user: "app".into() });
        assert!(err.to_string().contains("65536"), "{err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // At the limit exactly is fine.
        let r = resolve("app", PASSWD, &group_file(NGROUPS_MAX, "app")).unwrap();
        assert_eq!(r.additional_gids.len(), NGROUPS_MAX);
    }

    #[test]
    fn duplicate_memberships_once_in_file_order() {
        let group = "a:x:7:app\nb:x:8:app,app\nagain:x:7:app\nown:x:1000:app\nc:x:9:x,app\n";
        let r = resolve("app", PASSWD, group).unwrap();
        assert_eq!(
            r.additional_gids,
            vec![7, 8, 9],
            "primary gid 1000 left out"
        );
    }

    #[test]
    fn without_memberships_ignores_the_group_count() {
        let group = group_file(200_000, "app") + "staff:x:50:\n";
        let r = resolve_without_memberships("app", PASSWD, &group).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 1000));
        assert!(r.additional_gids.is_empty());
        // A named primary group is still looked up.
        let r = resolve_without_memberships("app:staff", PASSWD, &group).unwrap();
        assert_eq!(r.gid, 50);
    }

    #[test]
    fn explicit_groups() {
        let r = resolve("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 50));
        assert!(r.additional_gids.is_empty());
        let r = resolve("1000:7", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 7));
        assert_eq!(
            resolve("nobody", PASSWD, GROUP),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            resolve("app:wheel", PASSWD, GROUP),
            Err(UserError::UnknownGroup("wheel".into()))
        );
    }
}
