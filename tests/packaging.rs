//! The deployment files name what the binary really serves: the Kubernetes
//! ConfigMap is a config the sidecar accepts, the container's ports are the
//! listeners that config opens, and every probe path answers on the admin
//! listener. The compose file, the image and the systemd unit run commands
//! the CLI has.

use std::path::Path;

use catalog_cache::config::Config;

mod support;

use support::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The TOML document embedded under `catalog-cache.toml: |` in the ConfigMap.
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("catalog-cache.toml: |"));
    let header = lines
        .next()
        .expect("the ConfigMap holds catalog-cache.toml");
    let base = header.len() - header.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > base)
        .map(|l| l.get(base + 2..).unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `(path, port)` of every httpGet probe in the manifest.
fn probes(yaml: &str) -> Vec<(String, String)> {
    yaml.lines()
        .filter_map(|l| {
            let l = l.trim();
            let inner = l.strip_prefix("httpGet: {")?.strip_suffix('}')?;
            let mut path = None;
            let mut port = None;
            for part in inner.split(',') {
                let (k, v) = part.split_once(':')?;
                match k.trim() {
                    "path" => path = Some(v.trim().to_string()),
                    "port" => port = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            Some((path?, port?))
        })
        .collect()
}

/// `name → containerPort` of the catalog-cache container.
fn container_ports(yaml: &str) -> Vec<(String, u16)> {
    let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let name = w[0].strip_prefix("- name: ")?;
            let port = w[1].strip_prefix("containerPort: ")?.parse().ok()?;
            Some((name.to_string(), port))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_manifests_name_the_ports_and_probes_the_binary_serves() {
    let configmap = read("config/kubernetes/configmap.yaml");
    let config = Config::from_toml(&configmap_toml(&configmap))
        .unwrap_or_else(|e| panic!("the ConfigMap's catalog-cache.toml is refused: {e}"));
    let deployment = read("config/kubernetes/deployment.yaml");
    let ports = container_ports(&deployment);
    let admin_port = ports
        .iter()
        .find(|(n, _)| n == "admin")
        .map(|(_, p)| *p)
        .expect("a port named admin");
    assert_eq!(
        admin_port,
        config.listen.admin.port(),
        "containerPort admin = listen.admin"
    );
    assert!(
        config.listen.proxy.ip().is_loopback(),
        "the proxy stays on the pod's loopback"
    );
    let probes = probes(&deployment);
    assert!(
        probes.len() >= 3,
        "startup, readiness and liveness probes: {probes:?}"
    );
    assert!(probes.iter().any(|(p, _)| p == "/readyz"));
    assert!(probes.iter().any(|(p, _)| p == "/livez"));

    let ts = TestSidecar::builder().start().await;
    for (path, port) in &probes {
        assert_eq!(port, "admin", "probes use the admin port");
        let status = ts
            .http
            .get(ts.admin_url(path))
            .send()
            .await
            .expect("admin listener answers")
            .status()
            .as_u16();
        assert_eq!(status, 200, "probe {path} answers 200 on a ready sidecar");
    }
    let service = read("config/kubernetes/service.yaml");
    assert!(service.contains(&format!("port: {admin_port}")));
    assert!(
        !service.contains("7070"),
        "the proxy is never exposed as a Service"
    );
}

#[test]
fn compose_and_systemd_run_commands_the_cli_has() {
    let compose = read("docker-compose.yml");
    assert!(
        compose.contains("fake-catalog"),
        "compose runs the demo catalog"
    );
    assert!(
        compose.contains(r#"["CMD", "catalog-cache", "check"]"#),
        "compose health checks use catalog-cache check"
    );
    let unit = read("config/systemd/catalog-cache.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(exec.contains(" serve --config "), "{exec}");
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("EXPOSE 7070 7071"));
    assert!(
        dockerfile.contains("catalog-cache check"),
        "the image health check is the exec probe"
    );
}
