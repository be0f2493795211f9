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
}

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

/// (name, gid, members) per group line.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 || line.starts_with('#') {
            return None;
        }
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `user` ("" means root). A numeric uid missing from passwd is allowed
/// (gid 0 then), a name missing is an error, as in the OCI image spec.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
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
    let mut additional_gids = Vec::new();
    if group_part.is_none() {
        if let Some(name) = entry.as_ref().map(|e| e.name) {
            for (_, g, members) in group_entries(group) {
                if members.contains(&name) && g != gid && !additional_gids.contains(&g) {
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
