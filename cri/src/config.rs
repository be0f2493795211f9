//! vesseld's configuration: `/etc/vessel/vessel.toml`, then the drop-ins of
//! `<config dir>/vessel.d/*.toml` in lexical order, then command-line flags.
//!
//! Files are merged as TOML tables (tables merge key by key, every other value is
//! replaced), remembering which source set each key so that a bad value can be
//! blamed on the file that holds it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The config file read when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/vessel/vessel.toml";
/// The runtime handler that always exists (used for an empty RuntimeClass).
pub const DEFAULT_HANDLER: &str = "default";

/// The effective configuration of vesseld.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The CRI unix socket.
    pub listen: PathBuf,
    /// Persistent state: blobs, snapshots, `state.redb`.
    pub root: PathBuf,
    /// Volatile state: lock file, per-pod runtime dirs.
    pub run_root: PathBuf,
    /// A tracing filter: a level ("info") or directives ("info,vesseld=debug").
    pub log_level: String,
    pub log_format: LogFormat,
    /// vesseld's own log file (absent: stderr, e.g. for journald).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// The log file is rotated when a write would take it past this size (MiB).
    pub log_max_size_mib: u64,
    /// Rotated log files kept (`<log_file>.1` ... `.N`).
    pub log_max_files: usize,
    pub image: ImageConfig,
    pub network: NetworkConfig,
    pub guest: GuestConfig,
    pub metrics: MetricsConfig,
    /// One entry per RuntimeClass handler; `default` always exists.
    pub runtimes: BTreeMap<String, RuntimeHandlerConfig>,
    /// The Exec/Attach/PortForward server.
    pub streaming: crate::streaming::StreamingConfig,
    /// Confinement of each pod VM's host processes.
    pub jail: JailSettings,
    pub containers: ContainersConfig,
}

/// `[containers]`: what one container may cost the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersConfig {
    /// Most bytes one container log file holds between two rotations (the kubelet
    /// rotates every 10 s at most); output past it is dropped behind one marker
    /// line. 0: no cap.
    pub log_size_max: u64,
    /// Pods' scratch disks are sparse: together they may promise this many times
    /// the free space of the filesystem under `root`; RunPodSandbox is refused past
    /// it (ResourceExhausted).
    pub scratch_overcommit: f64,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        // Far above the kubelet's default rotation size (10 MiB), so only a flood
        // between two of its checks reaches it.
        ContainersConfig {
            log_size_max: 64 << 20,
            scratch_overcommit: vessel_storage::scratch::DEFAULT_OVERCOMMIT,
        }
    }
}

impl ContainersConfig {
    /// The cap, None when off.
    pub fn log_cap(&self) -> Option<u64> {
        (self.log_size_max > 0).then_some(self.log_size_max)
    }
}

/// `[jail]`: the uids and cgroups pod VMs' host processes run in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailSettings {
    /// First uid (= gid) of the range QEMU and vhost-device-vsock run from, one per VM.
    pub uid_base: u32,
    /// Size of the range: the most VMs on the node at once, all instances together.
    pub uid_count: u32,
    /// The node-wide uid registry every vesseld instance shares (keep the default
    /// unless no other instance runs on the node).
    pub uid_registry: PathBuf,
    /// subuid/subgid files whose ranges the uid range must not overlap; vesseld
    /// refuses to start when it does.
    pub subid_files: Vec<PathBuf>,
    /// cgroup parent of pods whose CRI config names none (crictl, pool VMs).
    pub default_cgroup_parent: String,
}

impl Default for JailSettings {
    fn default() -> Self {
        let range = vessel_sandbox::JailConfig::default();
        JailSettings {
            uid_base: range.uid_base,
            uid_count: range.uid_count,
            uid_registry: range.registry,
            subid_files: vessel_sandbox::uids::DEFAULT_SUBID_FILES
                .iter()
                .map(PathBuf::from)
                .collect(),
            default_cgroup_parent: vessel_sandbox::cgroup::DEFAULT_PARENT.to_owned(),
        }
    }
}

impl JailSettings {
    /// The sandbox's view of the uid range.
    pub fn uid_range(&self) -> vessel_sandbox::JailConfig {
        vessel_sandbox::JailConfig {
            uid_base: self.uid_base,
            uid_count: self.uid_count,
            registry: self.uid_registry.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// containerd-style `<host>/hosts.toml` directory (mirrors, TLS, insecure).
    pub certs_dir: PathBuf,
    pub max_concurrent_downloads: usize,
    /// A blob download averaging less than this (KiB/s) over a window fails; 0: off.
    pub min_download_rate_kib: u64,
    /// The window (seconds) the rate is averaged over; a manifest fetch may take two.
    pub download_rate_window_s: u64,
    /// Most bytes the layers of one pull may unpack to (file content, xattrs),
    /// together; a pull crossing it fails (InvalidArgument) and leaves nothing.
    pub max_unpacked_bytes: u64,
    /// Most tar entries (files, directories, links, ...) in the layers of one pull.
    pub max_image_entries: u64,
    /// Most layers an image may have (overlayfs stacks at most 500).
    pub max_layers: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
}

/// vesseld's Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` on (plain HTTP); empty: no endpoint.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeHandlerConfig {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    /// Overrides `[guest] kernel` for this handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Overrides `[guest] initrd` for this handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    pub extra_kernel_args: Vec<String>,
    /// Size of each pod's scratch disk (sparse, on node disk under `root`): the
    /// bound on what its containers write to their rootfs. 0: no disk, writable
    /// layers live in guest memory.
    pub writable_layer_mib: u64,
    /// Pre-booted VMs kept warm for this handler's pods (see
    /// [`RuntimeHandlerConfig::pool_size`]); unset: 1 for the default handler, 0 for
    /// the others. 0 turns the pool off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
}

/// Most warm VMs one handler may keep: each costs its VM's memory.
pub const MAX_POOL_SIZE: u32 = 64;

impl RuntimeHandlerConfig {
    /// How many warm VMs the handler `name` keeps.
    pub fn pool_size(&self, name: &str) -> u32 {
        self.pool_size
            .unwrap_or(if name == DEFAULT_HANDLER { 1 } else { 0 })
    }
}

/// The accelerator a handler asks for: the sandbox's own type (one definition).
pub use vessel_sandbox::Accel;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "/run/vessel/vessel.sock".into(),
            root: "/var/lib/vessel".into(),
            run_root: "/run/vessel".into(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            log_file: None,
            log_max_size_mib: 100,
            log_max_files: 5,
            image: ImageConfig::default(),
            network: NetworkConfig::default(),
            guest: GuestConfig::default(),
            metrics: MetricsConfig::default(),
            runtimes: BTreeMap::from([(
                DEFAULT_HANDLER.to_owned(),
                RuntimeHandlerConfig::default(),
            )]),
            streaming: Default::default(),
            jail: JailSettings::default(),
            containers: ContainersConfig::default(),
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            certs_dir: "/etc/vessel/certs.d".into(),
            max_concurrent_downloads: 3,
            min_download_rate_kib: 10,
            download_rate_window_s: 30,
            max_unpacked_bytes: vessel_image::ImageLimits::DEFAULT_MAX_UNPACKED_BYTES,
            max_image_entries: vessel_image::ImageLimits::DEFAULT_MAX_IMAGE_ENTRIES,
            max_layers: vessel_image::ImageLimits::DEFAULT_MAX_LAYERS,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        }
    }
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: "/usr/share/vessel/vmlinux".into(),
            initrd: "/usr/share/vessel/initrd.img".into(),
        }
    }
}

impl Default for RuntimeHandlerConfig {
    fn default() -> Self {
        RuntimeHandlerConfig {
            vcpus: 1,
            memory_mib: 256,
            accel: Accel::Auto,
            kernel: None,
            initrd: None,
            extra_kernel_args: Vec::new(),
            writable_layer_mib: 10 * 1024,
            pool_size: None,
        }
    }
}

/// Why the configuration could not be loaded. Every variant names its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list drop-in dir {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{source_name}: key `{key}`: {reason}")]
    Invalid {
        source_name: String,
        key: String,
        reason: String,
    },
}

/// Settings given on the command line; they win over every file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub run_root: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub log_file: Option<PathBuf>,
}

/// Where the config comes from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub file: PathBuf,
    /// False for the implicit default file: then a missing file means defaults.
    pub required: bool,
}

impl ConfigSource {
    /// The drop-in directory belonging to the main file: `<dir>/vessel.d`.
    pub fn dropin_dir(&self) -> PathBuf {
        self.file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("vessel.d")
    }
}

/// Loads, merges, overrides and validates the configuration.
pub fn load(source: &ConfigSource, overrides: &Overrides) -> Result<Config, ConfigError> {
    let mut merged = Merged::default();

    match std::fs::read_to_string(&source.file) {
        Ok(text) => merged.add_file(&source.file, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !source.required => {}
        Err(e) => {
            return Err(ConfigError::Read {
                path: source.file.clone(),
                source: e,
            })
        }
    }

    for path in dropins(&source.dropin_dir())? {
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
            path: path.clone(),
            source: e,
        })?;
        merged.add_file(&path, &text)?;
    }

    merged.add_overrides(overrides);
    merged.finish()
}

/// `*.toml` files of the drop-in dir in lexical order; a missing dir has none.
fn dropins(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigError::ReadDir {
                path: dir.to_owned(),
                source: e,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ConfigError::ReadDir {
            path: dir.to_owned(),
            source: e,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The merged TOML table plus, per dotted key, the source that set it last.
#[derive(Default)]
struct Merged {
    table: Table,
    origins: HashMap<String, String>,
}

impl Merged {
    fn add_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let name = path.display().to_string();
        // Checked alone first so that unknown keys and wrong types name their file.
        deserialize(&table, &name)?;
        merge_into(&mut self.table, table, "", &name, &mut self.origins);
        Ok(())
    }

    fn add_overrides(&mut self, o: &Overrides) {
        let path = |p: &PathBuf| Value::String(p.display().to_string());
        let flags = [
            ("listen", "--listen", o.listen.as_ref().map(path)),
            ("root", "--root", o.root.as_ref().map(path)),
            ("run_root", "--run-root", o.run_root.as_ref().map(path)),
            (
                "log_level",
                "--log-level",
                o.log_level.clone().map(Value::String),
            ),
            (
                "log_format",
                "--log-format",
                o.log_format.clone().map(Value::String),
            ),
            ("log_file", "--log-file", o.log_file.as_ref().map(path)),
        ];
        for (key, flag, value) in flags {
            if let Some(value) = value {
                self.table.insert(key.to_owned(), value);
                self.origins
                    .insert(key.to_owned(), format!("command-line flag {flag}"));
            }
        }
    }

    fn finish(self) -> Result<Config, ConfigError> {
        let mut config = deserialize(&self.table, "merged configuration")?;
        config
            .runtimes
            .entry(DEFAULT_HANDLER.to_owned())
            .or_default();
        validate(&config).map_err(|(key, reason)| {
            let source_name = self
                .origins
                .get(&key)
                .cloned()
                .unwrap_or_else(|| "built-in default".to_owned());
            ConfigError::Invalid {
                source_name,
                key,
                reason,
            }
        })?;
        Ok(config)
    }
}

fn deserialize(table: &Table, source_name: &str) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(Value::Table(table.clone())).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid {
            source_name: source_name.to_owned(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            // toml appends "\nin `<table>`", which the key already says.
            reason: e
                .into_inner()
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    })
}

fn merge_into(
    dst: &mut Table,
    src: Table,
    prefix: &str,
    source_name: &str,
    origins: &mut HashMap<String, String>,
) {
    for (key, value) in src {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (dst.get_mut(&key), value) {
            (Some(Value::Table(d)), Value::Table(s)) => {
                merge_into(d, s, &path, source_name, origins)
            }
            (_, value) => {
                record_origins(&value, &path, source_name, origins);
                dst.insert(key, value);
            }
        }
    }
}

fn record_origins(
    value: &Value,
    path: &str,
    source_name: &str,
    origins: &mut HashMap<String, String>,
) {
    origins.insert(path.to_owned(), source_name.to_owned());
    if let Value::Table(t) = value {
        for (k, v) in t {
            record_origins(v, &format!("{path}.{k}"), source_name, origins);
        }
    }
}

/// Semantic checks serde cannot express. Err((dotted key, reason)).
fn validate(c: &Config) -> Result<(), (String, String)> {
    let err = |key: &str, reason: &str| Err((key.to_owned(), reason.to_owned()));
    for (key, path) in [
        ("listen", &c.listen),
        ("root", &c.root),
        ("run_root", &c.run_root),
        ("image.certs_dir", &c.image.certs_dir),
        ("network.cni_conf_dir", &c.network.cni_conf_dir),
        ("guest.kernel", &c.guest.kernel),
        ("guest.initrd", &c.guest.initrd),
    ] {
        if !path.is_absolute() {
            return err(
                key,
                &format!(
                    "must be an absolute path, got {:?}",
                    path.display().to_string()
                ),
            );
        }
    }
    if c.log_file.as_ref().is_some_and(|p| !p.is_absolute()) {
        return err("log_file", "must be an absolute path");
    }
    if c.log_max_size_mib == 0 {
        return err("log_max_size_mib", "must be at least 1");
    }
    if c.jail.uid_base == 0 || c.jail.uid_count == 0 {
        return err(
            "jail.uid_base",
            "uid_base and uid_count must be at least 1 (uid 0 is root)",
        );
    }
    if c.jail.uid_base.checked_add(c.jail.uid_count).is_none() {
        return err(
            "jail.uid_count",
            "uid_base + uid_count must stay below 2^32",
        );
    }
    if !(c.containers.scratch_overcommit.is_finite() && c.containers.scratch_overcommit > 0.0) {
        return err("containers.scratch_overcommit", "must be a number above 0");
    }
    if !c.jail.uid_registry.is_absolute() {
        return err("jail.uid_registry", "must be an absolute path");
    }
    for (i, dir) in c.network.cni_bin_dirs.iter().enumerate() {
        if !dir.is_absolute() {
            return Err((
                "network.cni_bin_dirs".into(),
                format!("entry {i} ({}) must be an absolute path", dir.display()),
            ));
        }
    }
    if let Err(reason) = check_log_level(&c.log_level) {
        return err("log_level", &reason);
    }
    if c.image.download_rate_window_s == 0 {
        return err("image.download_rate_window_s", "must be at least 1");
    }
    if !c.metrics.address.is_empty() && c.metrics.address.parse::<std::net::SocketAddr>().is_err() {
        return err(
            "metrics.address",
            "must be an IP address and port such as \"127.0.0.1:9300\", or empty for no endpoint",
        );
    }
    if c.image.max_concurrent_downloads == 0 {
        return err("image.max_concurrent_downloads", "must be at least 1");
    }
    for (key, value) in [
        ("image.max_unpacked_bytes", c.image.max_unpacked_bytes),
        ("image.max_image_entries", c.image.max_image_entries),
        ("image.max_layers", c.image.max_layers as u64),
    ] {
        if value == 0 {
            return err(
                key,
                "must be at least 1 (it bounds what one image pull may unpack)",
            );
        }
    }
    if let Some((key, reason)) = c.streaming.problem() {
        return err(key, reason);
    }
    for (name, h) in &c.runtimes {
        let key = |k: &str| format!("runtimes.{name}.{k}");
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !valid_name {
            return Err((
                format!("runtimes.{name}"),
                "handler names may only use letters, digits, '-', '_' and '.'".into(),
            ));
        }
        if !(1..=256).contains(&h.vcpus) {
            return Err((key("vcpus"), format!("must be 1..=256, got {}", h.vcpus)));
        }
        if h.memory_mib < 64 {
            return Err((
                key("memory_mib"),
                format!("must be at least 64 (MiB), got {}", h.memory_mib),
            ));
        }
        if h.pool_size.is_some_and(|n| n > MAX_POOL_SIZE) {
            return Err((
                key("pool_size"),
                format!(
                    "must be 0..={MAX_POOL_SIZE} (warm VMs, each costs its memory), got {}",
                    h.pool_size.unwrap_or(0)
                ),
            ));
        }
        let min_disk = vessel_storage::scratch::MIN_SIZE_MIB;
        if h.writable_layer_mib != 0 && h.writable_layer_mib < min_disk {
            return Err((
                key("writable_layer_mib"),
                format!(
                    "must be 0 (no scratch disk) or at least {min_disk} (MiB), got {}",
                    h.writable_layer_mib
                ),
            ));
        }
        for (k, p) in [("kernel", &h.kernel), ("initrd", &h.initrd)] {
            if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err((key(k), "must be an absolute path".into()));
            }
        }
    }
    Ok(())
}

/// Accepts a level or comma-separated `target=level` directives. A bare word that
/// is not a level would silently mean "everything from target <word>", so it is
/// rejected rather than handed to EnvFilter.
fn check_log_level(s: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let ok = !s.trim().is_empty()
        && s.split(',').all(|d| match d.trim().rsplit_once('=') {
            Some((target, level)) => !target.is_empty() && is_level(level),
            None => is_level(d.trim()),
        })
        && tracing_subscriber::EnvFilter::builder().parse(s).is_ok();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a log level; use one of off, error, warn, info, debug, trace, \
             or directives like \"info,vesseld=debug\""
        ))
    }
}

impl Config {
    /// The effective configuration as TOML (what `vesseld config` prints).
    pub fn to_toml(&self) -> String {
        // Serializing plain structs of strings/numbers/paths cannot fail.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Path of the shared embedded database.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.redb")
    }

    /// Path of the single-instance lock file.
    pub fn lock_file(&self) -> PathBuf {
        self.run_root.join("vesseld.lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir {
        dir: tempfile::TempDir,
    }

    impl Dir {
        fn new() -> Self {
            Dir {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn main(&self, text: &str) -> &Self {
            std::fs::write(self.dir.path().join("vessel.toml"), text).unwrap();
            self
        }
        fn dropin(&self, name: &str, text: &str) -> &Self {
            let d = self.dir.path().join("vessel.d");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), text).unwrap();
            self
        }
        fn source(&self) -> ConfigSource {
            ConfigSource {
                file: self.dir.path().join("vessel.toml"),
                required: true,
            }
        }
        fn load(&self) -> Result<Config, ConfigError> {
            load(&self.source(), &Overrides::default())
        }
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let d = Dir::new();
        let src = ConfigSource {
            required: false,
            ..d.source()
        };
        let c = load(&src, &Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen, Path::new("/run/vessel/vessel.sock"));
        assert_eq!(c.image.max_concurrent_downloads, 3);
        assert_eq!(c.image.max_unpacked_bytes, 64 << 30);
        assert_eq!(c.image.max_image_entries, 4_000_000);
        assert_eq!(c.image.max_layers, 500);
        assert_eq!(c.runtimes[DEFAULT_HANDLER].memory_mib, 256);
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let d = Dir::new();
        let e = d.load().unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(e.to_string().contains("vessel.toml"), "{e}");
    }

    #[test]
    fn dropins_merge_in_lexical_order_and_flags_win() {
        let d = Dir::new();
        d.main(
            "root = \"/a\"\nlog_level = \"debug\"\n[runtimes.fast]\nvcpus = 2\nmemory_mib = 512\n",
        )
        .dropin("20-b.toml", "root = \"/c\"\n[runtimes.fast]\nvcpus = 4\n")
        .dropin(
            "10-a.toml",
            "root = \"/b\"\n[image]\nmax_concurrent_downloads = 7\n",
        )
        .dropin("30-ignored.conf", "this is not toml");
        let c = d.load().unwrap();
        assert_eq!(c.root, Path::new("/c"));
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.image.max_concurrent_downloads, 7);
        assert_eq!(c.image.certs_dir, Path::new("/etc/vessel/certs.d"));
        // Tables merge key by key: memory_mib from the main file survives.
        assert_eq!(c.runtimes["fast"].vcpus, 4);
        assert_eq!(c.runtimes["fast"].memory_mib, 512);
        assert!(c.runtimes.contains_key(DEFAULT_HANDLER));

        let o = Overrides {
            root: Some("/flag".into()),
            log_format: Some("json".into()),
            ..Default::default()
        };
        let c = load(&d.source(), &o).unwrap();
        assert_eq!(c.root, Path::new("/flag"));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let d = Dir::new();
        d.main("root = \"/a\"\n")
            .dropin("50-x.toml", "[image]\ncerts_dri = \"/x\"\n");
        let e = d.load().unwrap_err().to_string();
        assert!(e.contains("50-x.toml"), "{e}");
        assert!(e.contains("certs_dri"), "{e}");
        assert!(e.contains("unknown field"), "{e}");

        let d = Dir::new();
        d.main("[runtimes.default]\nvcpu = 2\n");
        let e = d.load().unwrap_err().to_string();
        assert!(e.contains("vessel.toml") && e.contains("vcpu"), "{e}");
    }

    #[test]
    fn wrong_types_name_file_and_key() {
        let d = Dir::new();
        d.main("[runtimes.default]\nvcpus = \"two\"\n");
        let e = d.load().unwrap_err().to_string();
        assert!(e.contains("vessel.toml"), "{e}");
        assert!(e.contains("runtimes.default.vcpus"), "{e}");

        let d = Dir::new();
        d.main("[runtimes.x]\naccel = \"hvf\"\n");
        let e = d.load().unwrap_err().to_string();
        assert!(e.contains("runtimes.x.accel") && e.contains("hvf"), "{e}");

        let d = Dir::new();
        d.main("log_format = \"xml\"\n");
        assert!(d.load().unwrap_err().to_string().contains("log_format"));
    }

    #[test]
    fn bad_values_name_the_file_that_set_them() {
        let d = Dir::new();
        d.main("[runtimes.default]\nvcpus = 2\n")
            .dropin("10.toml", "[runtimes.default]\nvcpus = 0\n");
        let e = d.load().unwrap_err();
        let ConfigError::Invalid {
            source_name, key, ..
        } = &e
        else {
            panic!("{e}")
        };
        assert!(source_name.ends_with("vessel.d/10.toml"), "{e}");
        assert_eq!(key, "runtimes.default.vcpus");

        let d = Dir::new();
        d.main("listen = \"relative.sock\"\n");
        let e = d.load().unwrap_err().to_string();
        assert!(e.contains("listen") && e.contains("absolute"), "{e}");

        let d = Dir::new();
        d.main("[image]\nmax_concurrent_downloads = 0\n");
        assert!(d
            .load()
            .unwrap_err()
            .to_string()
            .contains("max_concurrent_downloads"));

        for key in ["max_unpacked_bytes", "max_image_entries", "max_layers"] {
            let d = Dir::new();
            d.main(&format!("[image]\n{key} = 0\n"));
            let e = d.load().unwrap_err().to_string();
            assert!(
                e.contains(&format!("image.{key}")) && e.contains("at least 1"),
                "{e}"
            );
            let d = Dir::new();
            d.main(&format!("[image]\n{key} = 1000\n"));
            d.load().unwrap();
        }

        let d = Dir::new();
        d.main("[runtimes.default]\nwritable_layer_mib = 8\n");
        let e = d.load().unwrap_err().to_string();
        assert!(
            e.contains("writable_layer_mib") && e.contains("at least"),
            "{e}"
        );
        for ok in ["0", "16"] {
            let d = Dir::new();
            d.main(&format!("[runtimes.default]\nwritable_layer_mib = {ok}\n"));
            d.load().unwrap();
        }

        let d = Dir::new();
        d.main("");
        let o = Overrides {
            log_level: Some("loud".into()),
            ..Default::default()
        };
        let e = load(&d.source(), &o).unwrap_err().to_string();
        assert!(e.contains("--log-level") && e.contains("log_level"), "{e}");
    }

    #[test]
    fn syntax_error_names_file() {
        let d = Dir::new();
        d.main("root = \n");
        let e = d.load().unwrap_err().to_string();
        assert!(
            e.contains("vessel.toml") && e.contains("not valid TOML"),
            "{e}"
        );
    }

    #[test]
    fn printed_config_round_trips() {
        let d = Dir::new();
        d.main("[runtimes.big]\nvcpus = 4\nkernel = \"/k\"\nextra_kernel_args = [\"a=1\"]\n");
        let c = d.load().unwrap();
        let text = c.to_toml();
        let d2 = Dir::new();
        d2.main(&text);
        assert_eq!(d2.load().unwrap(), c);
    }
}
