//! Registry `hosts.toml` files: each must parse (a broken one fails every pull from
//! that registry).

use std::path::Path;

use vessel_image::hosts::parse_hosts_toml;

use super::Verdict;

/// Every `<certs_dir>/*/hosts.toml`.
pub fn hosts_files(certs_dir: &Path) -> Vec<Verdict> {
    let item = "registry hosts";
    let entries = match std::fs::read_dir(certs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![Verdict::ok(
                item,
                format!(
                    "no {}: every registry is reached over HTTPS",
                    certs_dir.display()
                ),
            )]
        }
        Err(e) => return vec![Verdict::fail(item, format!("{}: {e}", certs_dir.display()))],
    };
    let mut files: Vec<_> = entries
        .flatten()
        .map(|e| e.path().join("hosts.toml"))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    let mut good = Vec::new();
    for file in files {
        let registry = file
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parsed = std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|text| parse_hosts_toml(&text, &file, &registry).map_err(|e| e.to_string()));
        match parsed {
            Ok(_) => good.push(registry),
            Err(e) => out.push(Verdict::fail(
                format!("registry {registry}"),
                format!("{e}: pulls from {registry} fail until it is fixed"),
            )),
        }
    }
    if out.is_empty() || !good.is_empty() {
        out.insert(
            0,
            Verdict::ok(
                item,
                if good.is_empty() {
                    format!("no hosts.toml in {}", certs_dir.display())
                } else {
                    format!("{} parses: {}", certs_dir.display(), good.join(", "))
                },
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn each_broken_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let v = hosts_files(&dir.path().join("missing"));
        assert_eq!(v[0].level, Level::Ok);

        let good = dir.path().join("docker.io");
        std::fs::create_dir_all(&good).unwrap();
        std::fs::write(
            good.join("hosts.toml"),
            "server = \"https://registry-1.docker.io\"\n",
        )
        .unwrap();
        let bad = dir.path().join("bad.example");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("hosts.toml"), "server = \"ftp://x\"\n").unwrap();
        let v = hosts_files(dir.path());
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].level, Level::Ok);
        assert!(v[0].message.contains("docker.io"), "{v:?}");
        assert_eq!(v[1].level, Level::Fail);
        assert_eq!(v[1].item, "registry bad.example");
        assert!(v[1].message.contains("bad.example/hosts.toml"), "{v:?}");
    }
}
