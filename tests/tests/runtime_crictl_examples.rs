//! The README's crictl walk-through, run for real. The test reads the very files the
//! README includes (docs/examples/pod.json and container.json), turns crictl's JSON
//! into CRI messages with a strict converter (an unknown field fails, so the files
//! cannot drift into something crictl would silently ignore), and makes the CRI calls
//! crictl makes for `runp`, `create`, `start`, `ps`, `logs`, `exec -s`, `stop`, `rm`,
//! `stopp` and `rmp`, checking each step.

mod runtime_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use serde_json::{Map, Value};
use tonic::Code;
use vessel_tests::cri::CriClient;

/// crictl decodes its JSON files with Go's `encoding/json` into the CRI structs, so
/// field names are the proto's snake_case names and enums are numbers. Only the
/// fields the examples need are known here; anything else is an error.
mod crictl_json {
    use super::*;

    type Res<T> = Result<T, String>;

    fn object<'a>(v: &'a Value, at: &str, known: &[&str]) -> Res<&'a Map<String, Value>> {
        let m = v
            .as_object()
            .ok_or_else(|| format!("{at}: expected an object"))?;
        match m.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("{at}.{k}: unknown field (known: {known:?})")),
            None => Ok(m),
        }
    }

    fn string(m: &Map<String, Value>, key: &str, at: &str) -> Res<String> {
        match m.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{at}.{key}: expected a string")),
        }
    }

    fn integer(m: &Map<String, Value>, key: &str, at: &str) -> Res<i64> {
        match m.get(key) {
            None => Ok(0),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| format!("{at}.{key}: expected an integer")),
        }
    }

    fn boolean(m: &Map<String, Value>, key: &str, at: &str) -> Res<bool> {
        match m.get(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("{at}.{key}: expected true or false")),
        }
    }

    fn strings(m: &Map<String, Value>, key: &str, at: &str) -> Res<Vec<String>> {
        let Some(v) = m.get(key) else {
            return Ok(Vec::new());
        };
        let items = v
            .as_array()
            .ok_or_else(|| format!("{at}.{key}: expected a list"))?;
        items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{at}.{key}: expected strings"))
            })
            .collect()
    }

    fn string_map(m: &Map<String, Value>, key: &str, at: &str) -> Res<HashMap<String, String>> {
        let Some(v) = m.get(key) else {
            return Ok(HashMap::new());
        };
        let obj = v
            .as_object()
            .ok_or_else(|| format!("{at}.{key}: expected an object"))?;
        obj.iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(format!("{at}.{key}.{k}: expected a string")),
            })
            .collect()
    }

    fn narrow<T: TryFrom<i64>>(v: i64, what: &str) -> Res<T> {
        T::try_from(v).map_err(|_| format!("{what}: {v} is out of range"))
    }

    /// `crictl runp <file>`: a PodSandboxConfig.
    pub fn pod_sandbox_config(v: &Value) -> Res<cri::PodSandboxConfig> {
        let at = "pod";
        let m = object(
            v,
            at,
            &[
                "metadata",
                "hostname",
                "log_directory",
                "labels",
                "annotations",
                "linux",
            ],
        )?;
        let meta = m.get("metadata").ok_or("pod.metadata is required")?;
        let mm = object(
            meta,
            "pod.metadata",
            &["name", "namespace", "uid", "attempt"],
        )?;
        let linux = match m.get("linux") {
            None => None,
            Some(l) => {
                let lm = object(l, "pod.linux", &["security_context"])?;
                let security_context = match lm.get("security_context") {
                    None => None,
                    Some(sc) => {
                        let at = "pod.linux.security_context";
                        let scm = object(sc, at, &["namespace_options"])?;
                        let namespace_options = match scm.get("namespace_options") {
                            None => None,
                            Some(ns) => {
                                let at = "pod.linux.security_context.namespace_options";
                                let nm = object(ns, at, &["network", "pid", "ipc"])?;
                                Some(cri::NamespaceOption {
                                    network: narrow(integer(nm, "network", at)?, at)?,
                                    pid: narrow(integer(nm, "pid", at)?, at)?,
                                    ipc: narrow(integer(nm, "ipc", at)?, at)?,
                                    ..Default::default()
                                })
                            }
                        };
                        Some(cri::LinuxSandboxSecurityContext {
                            namespace_options,
                            ..Default::default()
                        })
                    }
                };
                Some(cri::LinuxPodSandboxConfig {
                    security_context,
                    ..Default::default()
                })
            }
        };
        Ok(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: string(mm, "name", "pod.metadata")?,
                namespace: string(mm, "namespace", "pod.metadata")?,
                uid: string(mm, "uid", "pod.metadata")?,
                attempt: narrow(integer(mm, "attempt", "pod.metadata")?, "pod.metadata")?,
            }),
            hostname: string(m, "hostname", at)?,
            log_directory: string(m, "log_directory", at)?,
            labels: string_map(m, "labels", at)?,
            annotations: string_map(m, "annotations", at)?,
            linux,
            ..Default::default()
        })
    }

    /// `crictl create <pod> <file> <pod file>`: a ContainerConfig.
    pub fn container_config(v: &Value) -> Res<cri::ContainerConfig> {
        let at = "container";
        let m = object(
            v,
            at,
            &[
                "metadata",
                "image",
                "command",
                "args",
                "working_dir",
                "envs",
                "labels",
                "annotations",
                "log_path",
                "linux",
            ],
        )?;
        let meta = m.get("metadata").ok_or("container.metadata is required")?;
        let mm = object(meta, "container.metadata", &["name", "attempt"])?;
        let image = m.get("image").ok_or("container.image is required")?;
        let im = object(image, "container.image", &["image"])?;
        let envs = match m.get("envs") {
            None => Vec::new(),
            Some(list) => list
                .as_array()
                .ok_or("container.envs: expected a list")?
                .iter()
                .map(|e| {
                    let em = object(e, "container.envs[]", &["key", "value"])?;
                    Ok(cri::KeyValue {
                        key: string(em, "key", "container.envs[]")?,
                        value: string(em, "value", "container.envs[]")?,
                    })
                })
                .collect::<Res<Vec<_>>>()?,
        };
        let linux = match m.get("linux") {
            None => None,
            Some(l) => {
                let lm = object(l, "container.linux", &["security_context"])?;
                let security_context = match lm.get("security_context") {
                    None => None,
                    Some(sc) => {
                        let at = "container.linux.security_context";
                        let scm = object(
                            sc,
                            at,
                            &[
                                "run_as_user",
                                "run_as_username",
                                "readonly_rootfs",
                                "privileged",
                            ],
                        )?;
                        let run_as_user = match scm.get("run_as_user") {
                            None => None,
                            Some(u) => {
                                let um = object(u, "run_as_user", &["value"])?;
                                Some(cri::Int64Value {
                                    value: integer(um, "value", "run_as_user")?,
                                })
                            }
                        };
                        Some(cri::LinuxContainerSecurityContext {
                            run_as_user,
                            run_as_username: string(scm, "run_as_username", at)?,
                            readonly_rootfs: boolean(scm, "readonly_rootfs", at)?,
                            privileged: boolean(scm, "privileged", at)?,
                            ..Default::default()
                        })
                    }
                };
                Some(cri::LinuxContainerConfig {
                    security_context,
                    ..Default::default()
                })
            }
        };
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: string(mm, "name", "container.metadata")?,
                attempt: narrow(
                    integer(mm, "attempt", "container.metadata")?,
                    "container.metadata",
                )?,
            }),
            image: Some(cri::ImageSpec {
                image: string(im, "image", "container.image")?,
                ..Default::default()
            }),
            command: strings(m, "command", at)?,
            args: strings(m, "args", at)?,
            working_dir: string(m, "working_dir", at)?,
            envs,
            labels: string_map(m, "labels", at)?,
            annotations: string_map(m, "annotations", at)?,
            log_path: string(m, "log_path", at)?,
            linux,
            ..Default::default()
        })
    }
}

fn example(name: &str) -> Value {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn readme_shows_the_example_files_verbatim() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for name in ["pod.json", "container.json"] {
        let text = std::fs::read_to_string(dir.join("docs/examples").join(name)).unwrap();
        let block = format!("```json\n{}```", text);
        assert!(
            readme.contains(&block),
            "README.md does not show {name} as it is"
        );
    }
}

#[test]
fn examples_convert_and_unknown_fields_are_refused() {
    let pod = crictl_json::pod_sandbox_config(&example("pod.json")).unwrap();
    assert_eq!(pod.metadata.as_ref().unwrap().name, "hello");
    let ctr = crictl_json::container_config(&example("container.json")).unwrap();
    assert_eq!(ctr.metadata.as_ref().unwrap().name, "greeter");
    assert_eq!(ctr.image.as_ref().unwrap().image, "busybox");

    // crictl would silently drop a camelCase name; the converter refuses it.
    let mut bad = example("pod.json");
    bad["logDirectory"] = Value::String("/tmp".into());
    let e = crictl_json::pod_sandbox_config(&bad).unwrap_err();
    assert!(e.contains("logDirectory"), "{e}");
    let mut bad = example("container.json");
    bad["linux"]["security_context"] = serde_json::json!({"runAsUser": {"value": 1}});
    let e = crictl_json::container_config(&bad).unwrap_err();
    assert!(e.contains("runAsUser"), "{e}");
}

async fn list_running(c: &mut CriClient, pod: &str) -> Vec<cri::Container> {
    c.runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                pod_sandbox_id: pod.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_crictl_workflow() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let mut pod_cfg = crictl_json::pod_sandbox_config(&example("pod.json")).unwrap();
    let mut ctr_cfg = crictl_json::container_config(&example("container.json")).unwrap();
    // The only departures from the files: the image comes from the test registry
    // (no network here) and logs stay in the test's own directory.
    let logs = d.dir().join("logs/hello");
    pod_cfg.log_directory = logs.display().to_string();
    ctr_cfg.image = Some(cri::ImageSpec {
        image: image.clone(),
        ..Default::default()
    });

    // crictl runp pod.json
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("runp");
    let st = pod_status(&mut c, &pod).await.status.unwrap();
    assert_eq!(st.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(st.metadata.unwrap().name, "hello");

    // crictl create $POD container.json pod.json
    let ctr = create(&mut c, &pod, &pod_cfg, ctr_cfg)
        .await
        .expect("create");
    assert_eq!(
        status(&mut c, &ctr).await.state,
        cri::ContainerState::ContainerCreated as i32
    );

    // crictl start $CTR; crictl ps
    start(&mut c, &ctr).await;
    let running = list_running(&mut c, &pod).await;
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].id, ctr);
    assert_eq!(running[0].metadata.as_ref().unwrap().name, "greeter");

    // crictl logs $CTR reads the CRI log file that ContainerStatus names.
    let log_path = PathBuf::from(status(&mut c, &ctr).await.log_path);
    assert_eq!(log_path, logs.join("greeter/0.log"));
    let want = (
        "stdout".to_string(),
        "F".to_string(),
        "hello from hello-pod".to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log(&log_path).contains(&want) {
        assert!(
            Instant::now() < deadline,
            "log so far: {:?}",
            read_log(&log_path)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // crictl exec -s $CTR sh -c 'echo $GREETING from $(hostname)'
    let r = exec(
        &mut c,
        &ctr,
        &["sh", "-c", "echo $GREETING from $(hostname)"],
        0,
    )
    .await
    .expect("exec -s");
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, &b"hello from hello-pod\n"[..])
    );

    // crictl stop --timeout 10 $CTR: the TERM trap exits 0.
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: ctr.clone(),
            timeout: 10,
        })
        .await
        .expect("stop");
    let s = status(&mut c, &ctr).await;
    assert_eq!(
        (s.state, s.exit_code, s.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 0, "Completed")
    );
    assert!(list_running(&mut c, &pod).await.is_empty());

    // crictl rm $CTR
    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .expect("rm");
    let e = c
        .runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: ctr.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // crictl stopp $POD; crictl rmp $POD
    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("stopp");
    let st = pod_status(&mut c, &pod).await.status.unwrap();
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("rmp");
    let e = c
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_no_leaks(&d);
}
