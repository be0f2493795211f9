//! Tar entry names → safe relative component lists.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// Prefix of OCI whiteout files (`.wh.<name>` deletes `<name>` of lower layers).
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the OCI opaque-directory marker.
pub(crate) const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// Prefix of whiteout-metadata names (aufs) that carry nothing for overlayfs.
pub(crate) const WHITEOUT_META_PREFIX: &str = ".wh..wh.";

/// Splits a tar path into components relative to the layer root.
///
/// Leading `/` and `.` components are dropped (absolute names are taken relative to
/// the root, as tar does); a `..` component is refused outright rather than resolved,
/// because no well-formed layer needs one. An empty result names the root itself.
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&OsStr>, String> {
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path contains a `..` component".into()),
            _ => out.push(OsStr::from_bytes(comp)),
        }
    }
    Ok(out)
}

/// Whether `name` can name a child of a directory (used for whiteout targets).
pub(crate) fn is_plain_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(s: &str) -> Result<Vec<String>, String> {
        components(s.as_bytes())
            .map(|v| v.iter().map(|c| c.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn normalizes() {
        assert_eq!(comps("./a/b/").unwrap(), ["a", "b"]);
        assert_eq!(comps("/etc//passwd").unwrap(), ["etc", "passwd"]);
        assert_eq!(comps("./").unwrap(), Vec::<String>::new());
        assert_eq!(comps("a/./b").unwrap(), ["a", "b"]);
        assert_eq!(comps("..a/b..").unwrap(), ["..a", "b.."]);
    }

    #[test]
    fn refuses_dotdot() {
        assert!(comps("../x").is_err());
        assert!(comps("a/../../x").is_err());
        assert!(comps("a/..").is_err());
        assert!(comps("/..").is_err());
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_name(b"x"));
        assert!(!is_plain_name(b""));
        assert!(!is_plain_name(b".."));
        assert!(!is_plain_name(b"."));
    }
}
